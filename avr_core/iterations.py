"""Iterative AvR, the plain-Python part (no Prefect): which prompts iteration t uses, which chain
of iterations a run belongs to, and the per-iteration table and plot (README "Iterations").

Iteration t runs the whole method again, starting from iteration t-1's model (`iterate.model`:
the Stage-1 or the Stage-2 model) on fresh prompts: the training slices `data.stage1_sft ..
data.stage2_po` move by t * stride rows. `data.heldout` and the eval set do not move, so every
iteration is measured with the same yardstick. A *chain* is the iterations that go back to one
seed: same preset, seed policy and prompt file (`chain_id`); `iterate.continue_last` continues it.
"""
from __future__ import annotations

import hashlib
import json

from avr_core.config import ConfigError

TRAIN_SLICES = ("stage1_sft", "stage1_po", "stage2", "stage2_po")
ALL_SLICES = (*TRAIN_SLICES, "heldout")


def stride(data: dict, prompt_stride: int) -> int:
    """Rows iteration t+1 moves the training slices by: `prompt_stride`, or (0) their span, so
    consecutive iterations never share a prompt.

    >>> stride({"stage1_sft": [0, 4], "stage1_po": [6, 10], "stage2": [12, 16], "stage2_po": [20, 24]}, 0)
    24
    >>> stride({"stage1_sft": [0, 4], "stage1_po": [6, 10], "stage2": [12, 16], "stage2_po": [20, 24]}, 5)
    5
    """
    if prompt_stride:
        return prompt_stride
    ends = [data[s][1] for s in TRAIN_SLICES]
    if any(e is None for e in ends):
        raise ConfigError("key 'iterate.prompt_stride': a training slice ends at null (the end of the file), so "
                          "the slices have no span: set iterate.prompt_stride to the rows each iteration moves by")
    return max(ends) - min(data[s][0] for s in TRAIN_SLICES)


def shifted(data: dict, t: int, rows: int) -> dict:
    """The `data` section of iteration t: training slices moved by t * rows (a null end stays null).

    >>> shifted({"prompts": "p.jsonl", "stage1_sft": [0, 4], "stage1_po": [6, None], "stage2": [12, 16],
    ...          "stage2_po": [20, 24], "heldout": [40, 44]}, 2, 10)["stage1_po"]
    [26, None]
    """
    out = dict(data)
    for s in TRAIN_SLICES:
        a, b = data[s]
        out[s] = [a + t * rows, None if b is None else b + t * rows]
    return out


def check_slices(data: dict, n_rows: int, iterations: range, rows: int, used: tuple = ALL_SLICES,
                 source: str = "the prompt file") -> None:
    """Every slice in `used` (the slices the flow reads) of every iteration this run will do,
    iteration 0 included, is non-empty and inside the prompt file (`source`, `n_rows` prompts),
    and the moved training slices stay clear of `data.heldout`; otherwise a ConfigError naming
    the key, before any work.

    >>> d = {"stage1_sft": [0, 4], "stage1_po": [6, 10], "stage2": [12, 16], "stage2_po": [20, 24], "heldout": [40, 44]}
    >>> check_slices(d, 48, range(0, 2), 24)
    >>> try:
    ...     check_slices(d, 48, range(0, 3), 24)
    ... except ConfigError as e:
    ...     print(str(e)[:83])
    key 'iterate.count': iteration 2 would use data.stage1_sft = [48, 52], past the end
    >>> try:
    ...     check_slices(d, 10, range(0, 1), 0, source="my_prompts.jsonl")
    ... except ConfigError as e:
    ...     print(str(e)[:78])
    key 'data.stage2': [12, 16] runs past the end of my_prompts.jsonl (10 prompts)
    """
    h0, h1 = data["heldout"]
    for t in iterations:
        d = shifted(data, t, rows)                       # iteration 0: the config's own slices
        for s in used:
            a, b = d[s]
            end = n_rows if b is None else b
            if end > n_rows or a >= n_rows:
                if t == 0 or s == "heldout":               # the config itself, not the iterations, is at fault
                    raise ConfigError(f"key 'data.{s}': {d[s]} runs past the end of {source} ({n_rows} prompts): "
                                      "move or shrink the slice, or use a longer prompt file")
                raise ConfigError(f"key 'iterate.count': iteration {t} would use data.{s} = {d[s]}, past the end of "
                                  f"the prompt file ({n_rows} rows): fewer iterations, a smaller "
                                  "iterate.prompt_stride, or more prompts")
            if end <= a:                                 # e.g. [12, 12]: the stage would run on no prompts
                raise ConfigError(f"key 'data.{s}': {d[s]} is empty: this run reads it, so give it at least one "
                                  "prompt")
            if t and s != "heldout" and a < h1 and h0 < end:
                raise ConfigError(f"key 'iterate.prompt_stride': iteration {t} would use data.{s} = {d[s]}, which "
                                  f"overlaps data.heldout = {[h0, h1]} (the prompts every iteration is measured on)")


def chain_id(cfg: dict) -> str:
    """The chain a run's iterations belong to: its preset, seed policy and prompt file.

    >>> len(chain_id({"preset": "tiny", "policy": {"path": "embedded:m"}, "data": {"prompts": "p.jsonl"}}))
    15
    """
    ident = {"preset": cfg["preset"], "seed": {k: v for k, v in cfg["policy"].items() if k != "trust_remote_code"},
             "prompts": cfg["data"]["prompts"]}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return f"{cfg['preset']}-{digest[:10]}"


def table(records: list[dict], leaderboard: list[dict]) -> list[dict]:
    """One row per completed iteration: the scorer's mean score on the held-out prompts of the
    iteration's starting model and of its Stage-1 model (the learning signal), and each evaluated
    model's AlpacaEval win rate (the leaderboard row of that run and iteration).

    >>> recs = [{"iteration": 0, "run": "r1", "seed": "embedded:m", "stage1_model": "po/a",
    ...          "signal": {"mean_a": 5.0, "mean_b": 5.5, "mean_diff": 0.5, "se": 0.1}}]
    >>> table(recs, [{"run": "r1", "iteration": 0, "model": "stage1", "win_rate": 40.0}])[0]["wr_stage1"]
    40.0
    """
    rows = []
    for r in sorted(records, key=lambda r: r["iteration"]):
        sig = r.get("signal") or {}
        row = {"iteration": r["iteration"], "run": r["run"], "start": r["seed"], "stage1_model": r["stage1_model"],
               "stage2_model": r.get("stage2_model"), "score_start": sig.get("mean_a"),
               "score_stage1": sig.get("mean_b"), "score_gain": sig.get("mean_diff"), "score_gain_se": sig.get("se")}
        for lb in leaderboard:
            if lb["run"] == r["run"] and int(lb.get("iteration") or 0) == r["iteration"]:
                row[f"wr_{lb['model']}"] = lb["win_rate"]
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], title: str | None = None) -> str:
    """The per-iteration table, under `title` (the smoke-run banner) when given.

    >>> print(to_markdown([{"iteration": 0, "run": "r1", "start": "embedded:m", "stage1_model": "po/a",
    ...                     "score_start": 5.0, "score_stage1": 5.5, "score_gain": 0.5, "score_gain_se": 0.1,
    ...                     "wr_stage1": 40.0}]))
    | iteration | run | starts from | score: start → Stage-1 | gain ± se | WR seed | WR stage1 | WR stage2 |
    |---|---|---|---|---|---|---|---|
    | 0 | r1 | embedded:m | 5 → 5.5 | 0.5 ± 0.1 | — | 40 | — |
    <BLANKLINE>
    """
    def f(v):
        return "—" if v is None else f"{v:.3g}"
    lines = ["| iteration | run | starts from | score: start → Stage-1 | gain ± se | WR seed | WR stage1 | WR stage2 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['iteration']} | {r['run']} | {r['start']} | {f(r['score_start'])} → {f(r['score_stage1'])} "
                     f"| {f(r['score_gain'])} ± {f(r['score_gain_se'])} | {f(r.get('wr_seed'))} | "
                     f"{f(r.get('wr_stage1'))} | {f(r.get('wr_stage2'))} |")
    return (f"{title}\n\n" if title else "") + "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str | None = None) -> bytes:
    """PNG: win rate per evaluated model (left) and the scorer's mean held-out score of each
    iteration's starting and Stage-1 model (right), against the iteration; `title` above both
    (the smoke-run label) when given."""
    from avr_core.scaling import _png, _pyplot

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    its = [r["iteration"] for r in rows]
    for model in ("seed", "rsft", "stage1", "stage2"):
        ys = [r.get(f"wr_{model}") for r in rows]
        if any(y is not None for y in ys):
            ax1.plot(its, [float("nan") if y is None else y for y in ys], marker="o", label=model)
    ax1.set(title="AlpacaEval win rate", xlabel="iteration", ylabel="win rate %")
    for key, label in (("score_start", "starting model"), ("score_stage1", "Stage-1 model")):
        ax2.plot(its, [float("nan") if r[key] is None else r[key] for r in rows], marker="o", label=label)
    ax2.set(title="scorer: mean held-out score", xlabel="iteration", ylabel="score")
    for ax in (ax1, ax2):
        ax.set_xticks(its)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _png(fig)
