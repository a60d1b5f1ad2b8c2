"""Learning signal: did training move the configured scorer? An honest paired measurement.

    >>> paired_difference({"p1": 5.0, "p2": 6.0}, {"p1": 5.5, "p2": 6.5})  # doctest: +NORMALIZE_WHITESPACE
    {'n': 2, 'mean_a': 5.5, 'mean_b': 6.0, 'mean_diff': 0.5, 'std_diff': 0.0, 'se': 0.0, 'ci95': [0.5, 0.5],
     'b_better': 2, 'a_better': 0, 'ties': 0, 'bootstrap_ci95': [0.5, 0.5], 'sign_test_p': 0.5}

On a 135M model with the judge scorer the difference may be small or negative; report it as is.
"""
from __future__ import annotations

import math
import random


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
            "b_better": sum(x > 0 for x in d), "a_better": sum(x < 0 for x in d), "ties": sum(x == 0 for x in d),
            "bootstrap_ci95": [r(x) for x in bootstrap_ci(d)],
            "sign_test_p": r(sign_test(sum(x > 0 for x in d), sum(x < 0 for x in d)))}


def bootstrap_ci(d: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% CI of the mean of `d` over prompt resamples (seeded: the same every time).
    Scores are bounded and ties dominate, so the normal CI is checked against this one.

    >>> bootstrap_ci([0.0, 0.0, 1.0, 1.0])
    (0.0, 1.0)
    """
    rng, n = random.Random(seed), len(d)
    means = sorted(sum(rng.choices(d, k=n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test (ties dropped): P(a split at least this uneven | no effect).

    >>> round(sign_test(9, 1), 4)
    0.0215
    """
    n, k = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def refinement_outcomes(records: list[dict]) -> dict:
    """How often the refinements of stage-1 synthesis beat their y0, from `rm_score` records
    (``answer_score`` = r(y0), every refinement's ``score``).

    >>> refs = lambda *s: [{"refinements": [{"score": x} for x in s]}]
    >>> o = refinement_outcomes([{"answer_score": 0.5, "critiques": refs(1.0, 0.5)},
    ...                          {"answer_score": 1.0, "critiques": refs(0.0)}])
    >>> o["better"], o["equal"], o["worse"], o["prompts_with_better"], o["mean_y0"], o["mean_best_gain"]
    (1, 1, 1, 1, 0.75, -0.25)
    """
    out = {"prompts": len(records), "mean_y0": 0.0, "refinements": 0, "better": 0, "equal": 0, "worse": 0,
           "prompts_with_better": 0, "mean_best_gain": 0.0}
    gains = []
    for r in records:
        s0 = r["answer_score"]
        scores = [f["score"] for c in r.get("critiques", []) for f in c.get("refinements", []) if "score" in f]
        out["refinements"] += len(scores)
        out["better"] += sum(s > s0 for s in scores)
        out["equal"] += sum(s == s0 for s in scores)
        out["worse"] += sum(s < s0 for s in scores)
        out["prompts_with_better"] += any(s > s0 for s in scores)
        gains.append(max(scores, default=s0) - s0)
    if records:
        out["mean_y0"] = round(sum(r["answer_score"] for r in records) / len(records), 6)
        out["mean_best_gain"] = round(sum(gains) / len(gains), 6)
    return out


def per_constraint(verdicts: list[tuple[str, bool]]) -> dict[str, list[int]]:
    """(constraint id, satisfied) pairs -> {id: [satisfied, total]}.

    >>> per_constraint([("a", True), ("a", False), ("b", True)])
    {'a': [1, 2], 'b': [1, 1]}
    """
    out: dict[str, list[int]] = {}
    for cid, ok in verdicts:
        c = out.setdefault(cid, [0, 0])
        c[0] += bool(ok)
        c[1] += 1
    return dict(sorted(out.items()))


def _ci(d: dict) -> str:
    lo, hi = d["ci95"]
    verdict = "CI excludes 0" if lo > 0 or hi < 0 else "CI includes 0: no evidence"
    return f"{d['mean_diff']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {verdict}"


def cut_at_cap(manifests: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """artifact -> (answers cut at the token cap, samples) for every sampling stage among
    `manifests` (artifact -> manifest), from the backend counters each stage records.

    >>> cut_at_cap({"refine/ab": {"counts": {"backend_samples": 8, "backend_cut_at_cap": 6}},
    ...             "select/cd": {"counts": {}}})
    {'refine/ab': (6, 8)}
    """
    return {a: (m["counts"].get("backend_cut_at_cap", 0), m["counts"]["backend_samples"])
            for a, m in manifests.items() if m["counts"].get("backend_samples")}


def signal_markdown(report: dict) -> str:
    """The `signal` preset's report: held-out comparisons, test-time scaling, synthesis counts."""
    lines = [f"### Learning signal (scorer: {report['scorer']}, {report['heldout']} held-out prompts)", "",
             "| comparison | n | mean A | mean B | B − A | 95% CI | reading | B better / A better / ties |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for name, d in report["comparisons"].items():
        lines.append(f"| {name} | {d['n']} | {d['mean_a']:.4f} | {d['mean_b']:.4f} | {_ci(d)} | "
                     f"{d['b_better']} / {d['a_better']} / {d['ties']} |")
    lines += ["", "The same comparisons checked two more ways (scores are bounded and ties dominate):", "",
              "| comparison | paired bootstrap 95% CI (10,000 resamples) | sign test p (B better vs A better) |",
              "|---|---|---:|"]
    for name, d in report["comparisons"].items():
        if "bootstrap_ci95" in d:
            lo, hi = d["bootstrap_ci95"]
            lines.append(f"| {name} | [{lo:+.4f}, {hi:+.4f}] | {d['sign_test_p']:.4f} |")
    if report.get("training"):
        lines += ["", "Training, as it ran (optimizer steps taken; planned = epochs x examples / global batch):", "",
                  "| model | examples or pairs | optimizer steps | planned | final loss |", "|---|---:|---:|---:|---:|"]
        for name, t in report["training"].items():
            lines.append(f"| {name} | {t['examples']} | {t['steps']} | {t['planned_steps']} | {t['final_loss']} |")
    if not report["tts"]:
        lines += ["", "Test-time scaling: not part of this run (tts.rounds = 0); run it on its own with "
                  "`tts.rounds=3` added to this run's command (every other stage comes from the cache)."]
        return _constraints_and_synthesis(lines, report)
    lines += ["", "Test-time scaling of the Stage-1 model (greedy; R refinement rounds; paired vs R = 0):", "",
              "| R | n | mean | R − R0 | 95% CI | reading | better / worse than R0 | mean words |",
              "|---:|---:|---:|---:|---|---|---|---:|"]
    for row in report["tts"]:
        d = row["vs_r0"]
        lines.append(f"| {row['R']} | {row['n']} | {row['mean']:.4f} | {_ci(d)} | {d['b_better']} / {d['a_better']} | "
                     f"{row['mean_words']:.1f} |")
    return _constraints_and_synthesis(lines, report)


def _constraints_and_synthesis(lines: list[str], report: dict) -> str:
    lines += ["", "Per constraint on the held-out prompts (satisfied / total):", "",
              "| constraint | " + " | ".join(report["per_constraint"]) + " |",
              "|---|" + "---:|" * len(report["per_constraint"])]
    ids = sorted({c for v in report["per_constraint"].values() for c in v})
    for c in ids:
        cells = [f"{v[c][0]}/{v[c][1]}" if c in v else "-" for v in report["per_constraint"].values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Stage-1 synthesis: how often refinements beat y0, and what selection kept:", "",
              "| synthesis | prompts | mean r(y0) | refinements | better / equal / worse than y0 | "
              "prompts with a better one | mean best gain |", "|---|---:|---:|---:|---|---:|---:|"]
    for name, s in report["synthesis"].items():
        o = s["outcomes"]
        lines.append(f"| {name} | {o['prompts']} | {o['mean_y0']:.4f} | {o['refinements']} | "
                     f"{o['better']} / {o['equal']} / {o['worse']} | {o['prompts_with_better']} | "
                     f"{o['mean_best_gain']:+.4f} |")
    for name, s in report["synthesis"].items():
        kept = ", ".join(f"{k}={v}" for k, v in sorted(s["select_counts"].items()) if not k.startswith("backend_"))
        lines.append(f"\n`select` ({name}): {kept}")
    if report.get("cut_at_cap"):
        lines += ["", "Answers cut at their token cap (stopped by max_new_tokens, not finished), per sampling stage:",
                  "", "| stage | artifact | cut / samples | share |", "|---|---|---:|---:|"]
        for art, (cut, n) in report["cut_at_cap"].items():
            lines.append(f"| {art.split('/')[0]} | {art} | {cut} / {n} | {cut / n:.0%} |")
    return "\n".join(lines) + "\n"
