"""Test-time scaling (docs/DESIGN.md step 11): how the score and the answer length move with the
number R of critique/refine rounds a Stage-1 model runs at inference.

One inference run at R = max gives every R' <= max (`inference.answer_prompts` keeps the answer
after each round), so the curve costs one run, not six. Input records, one per prompt::

    {"id": "p1", "answers": ["y0", "y1", ..., "y5"], "scores": [3.1, 3.4, ..., 3.6]}

    >>> rows = scaling_table([{"id": "a", "answers": ["x", "xyz"], "scores": [1.0, 2.0]},
    ...                       {"id": "b", "answers": ["xy", "xy"], "scores": [3.0, 3.0]}])
    >>> rows[1]   # doctest: +NORMALIZE_WHITESPACE
    {'R': 1, 'n': 2, 'mean': 2.5, 'std': 0.707107, 'se': 0.5, 'mean_chars': 2.5, 'mean_words': 1.0,
     'gain_vs_R0': 0.5, 'better_than_R0': 1, 'changed': 1}
"""
from __future__ import annotations

import io
import math

from avr_core.backends.base import Generator, SamplingParams, Scorer
from avr_core.inference import answer_prompts

COLUMNS = ["R", "n", "mean", "std", "se", "mean_chars", "mean_words", "gain_vs_R0", "better_than_R0", "changed"]


def scored_rounds(records: list[dict], gen: Generator, scorer: Scorer, rounds: int,
                  params: SamplingParams) -> tuple[list[dict], dict]:
    """Answer every prompt, refine it `rounds` times (`inference.answer_prompts`: one generator
    call per step for the whole batch), then score the answer after EVERY round of every
    prompt in ONE scorer call, as the assistant turn of [x, answer]. Returns (records, counts).

    Input record (a prompt record)::

        {"id": "p1", "messages": [{"role": "user", "content": "2+2?"}]}

    Output record (`answers[r]`, `scores[r]`: after r rounds; `trace`: one entry per round)::

        {"id": "p1", "messages": [{"role": "user", "content": "2+2?"}], "answers": ["5", "4"],
         "scores": [2.0, 8.0], "trace": [{"critique": "Wrong. Rating: [[2]]", "refinement": "4"}]}

    Counts: ``{"answers_scored": <number of answers scored>}``, and ``dropped_unscored_prompts``
    where the scorer returned None for any of a prompt's answers.
    """
    outs = answer_prompts([r["messages"] for r in records], gen, "refine", rounds, params)
    convs = [[*r["messages"], {"role": "assistant", "content": a}] for r, o in zip(records, outs) for a in o["answers"]]
    scores = iter(scorer.score(convs))
    recs = [{"id": r["id"], "messages": r["messages"], "answers": o["answers"],
             "scores": [next(scores) for _ in o["answers"]], "trace": o["trace"]} for r, o in zip(records, outs)]
    # an answer the scorer would not score (`scorer.over_long=skip`) leaves its prompt out of the
    # curve: every R must average over the same prompts
    kept = [r for r in recs if None not in r["scores"]]
    counts = {"answers_scored": len(convs)}
    if len(kept) < len(recs):
        counts["dropped_unscored_prompts"] = len(recs) - len(kept)
    return kept, counts


def scaling_table(records: list[dict]) -> list[dict]:
    """Per R: mean score, its spread (std, se), mean answer length, and how many prompts moved."""
    if not records:
        raise ValueError("no scored records: the test-time-scaling table needs at least one prompt")
    depth = min(len(r["scores"]) for r in records)
    r6 = lambda x: round(x, 6)  # noqa: E731
    rows = []
    for R in range(depth):
        s = [r["scores"][R] for r in records]
        n = len(s)
        mean = sum(s) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1)) if n > 1 else 0.0
        answers = [r["answers"][R] for r in records]
        rows.append({"R": R, "n": n, "mean": r6(mean), "std": r6(std), "se": r6(std / math.sqrt(n)),
                     "mean_chars": r6(sum(len(a) for a in answers) / n),
                     "mean_words": r6(sum(len(a.split()) for a in answers) / n),
                     "gain_vs_R0": r6(mean - rows[0]["mean"] if rows else 0.0),
                     "better_than_R0": sum(r["scores"][R] > r["scores"][0] for r in records),
                     "changed": sum(r["answers"][R] != r["answers"][R - 1] for r in records) if R else 0})
    return rows


def to_markdown(rows: list[dict], title: str | None = None) -> str:
    """The table as GitHub markdown (what the Prefect artifact and `scaling.md` show), under
    `title` (the smoke-run banner) when given; floats to 4 significant digits, for reading
    (`scaling.csv` and `scaling.json` keep them exact)."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return (f"{title}\n\n" if title else "") + head + "".join(
        "| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def _cell(v) -> str:
    """A table cell: a float to 4 significant digits.

    >>> _cell(4.729722), _cell(0.013730), _cell(161.5), _cell(4)
    ('4.73', '0.01373', '161.5', '4')
    """
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def to_csv(rows: list[dict]) -> str:
    return ",".join(COLUMNS) + "\n" + "".join(",".join(str(r[c]) for c in COLUMNS) + "\n" for r in rows)


def plot_scaling(rows: list[dict], title: str = "test-time scaling") -> bytes:
    """PNG: mean score ± se against R (left) and mean answer length against R (right)."""
    plt = _pyplot()

    R = [r["R"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.errorbar(R, [r["mean"] for r in rows], yerr=[r["se"] for r in rows], marker="o", capsize=3)
    a.set(xlabel="refinement rounds R", ylabel="mean score (± se)", xticks=R)
    b.plot(R, [r["mean_chars"] for r in rows], marker="o", color="tab:orange")
    b.set(xlabel="refinement rounds R", ylabel="mean answer length (chars)", xticks=R)
    fig.suptitle(f"{title} (n={rows[0]['n']})")
    return _png(fig)


def search_gain_table(traces: list[dict]) -> list[dict]:
    """Per greedy-search round: prompts still searching, how many improved, and the mean gain of
    the round's best refinement over the answer it refined (docs/DESIGN.md step 7).

    >>> rows = search_gain_table([{"answer_score": 1.0, "rounds": [{"best": {"score": 2.0}, "improved": True},
    ...                                                            {"best": {"score": 1.5}, "improved": False}]}])
    >>> rows[0], rows[1]["mean_gain"]
    ({'round': 1, 'active': 1, 'improved': 1, 'mean_gain': 1.0}, -0.5)
    """
    rows = []
    depth = max((len(t["rounds"]) for t in traces), default=0)
    for i in range(depth):
        gains, improved = [], 0
        for t in traces:
            if len(t["rounds"]) <= i or not t["rounds"][i].get("best"):
                continue
            before = t["answer_score"]
            for r in t["rounds"][:i]:         # the answer this round refined: the last improvement so far
                if r["improved"]:
                    before = r["best"]["score"]
            gains.append(t["rounds"][i]["best"]["score"] - before)
            improved += bool(t["rounds"][i]["improved"])
        rows.append({"round": i + 1, "active": len(gains), "improved": improved,
                     "mean_gain": round(sum(gains) / len(gains), 6) if gains else 0.0})
    return rows


def plot_search_gain(rows: list[dict]) -> bytes:
    """PNG: mean score gain of each search round's best refinement, and prompts still active."""
    plt = _pyplot()

    x = [r["round"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.bar(x, [r["mean_gain"] for r in rows])
    a.axhline(0, color="grey", lw=0.8)
    a.set(xlabel="search round", ylabel="mean score gain of the best refinement", xticks=x)
    b.plot(x, [r["active"] for r in rows], marker="o", label="searching")
    b.plot(x, [r["improved"] for r in rows], marker="o", label="improved")
    b.set(xlabel="search round", ylabel="prompts", xticks=x)
    b.legend()
    return _png(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()
