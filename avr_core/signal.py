"""Learning signal: did training move the configured scorer? An honest paired measurement.

    >>> paired_difference({"p1": 5.0, "p2": 6.0}, {"p1": 5.5, "p2": 6.5})
    {'n': 2, 'mean_a': 5.5, 'mean_b': 6.0, 'mean_diff': 0.5, 'std_diff': 0.0, 'se': 0.0, 'ci95': [0.5, 0.5], 'b_better': 2, 'a_better': 0, 'ties': 0}

On a 135M model with the judge scorer the difference may be small or negative; report it as is.
"""
from __future__ import annotations

import math


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict:
    """Mean of b - a over prompts scored in both, with its standard error and a normal 95% CI."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("no prompt was scored for both models")
    d = [b[i] - a[i] for i in ids]
    n = len(d)
    mean = sum(d) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    se = std / math.sqrt(n)
    r = lambda x: round(x, 6)  # noqa: E731
    return {"n": n, "mean_a": r(sum(a[i] for i in ids) / n), "mean_b": r(sum(b[i] for i in ids) / n),
            "mean_diff": r(mean), "std_diff": r(std), "se": r(se), "ci95": [r(mean - 1.96 * se), r(mean + 1.96 * se)],
            "b_better": sum(x > 0 for x in d), "a_better": sum(x < 0 for x in d), "ties": sum(x == 0 for x in d)}
