"""The end-of-run report: what a finished run prints last (`end_of_run`, about a screen) and its
wall-time tables (runs/<id>/timings.md). Text only: run_records/lifecycle.py `finish_run` writes
and publishes them."""
from __future__ import annotations


def end_of_run(summary: dict, table: str, smoke: bool = False) -> str:
    """What a finished run prints last, about a screen: where its outputs are, the per-stage
    wall times, the learning signal and test-time scaling as numbers, THIS run's leaderboard rows
    and where the rest is. The store keeps everything (summary.json, compare.md, leaderboard.md)."""
    root, rid = summary["store"], summary["id"]
    lines = [f"\nrun {rid} finished in {summary['wall_s']:.0f} s; its outputs, in the store {root}:"]
    lines += [f"  {name:18} {o['path']}" for name, o in summary["outputs"].items()]
    lines.append(f"  {'run record':18} {root}/runs/{rid}/ (summary.json, timings.md, compare.md)")
    lines.append(f"\nwall time per stage (every call: {root}/runs/{rid}/timings.md):\n{table}")
    for name, o in summary["outputs"].items():
        lines += _result_lines(name, o.get("result"))
    if summary.get("leaderboard") is not None:
        from avr_core.evaluation import leaderboard as lb
        from tasks.evaluate import SMOKE_TITLE
        lines.append(f"leaderboard: this run's {len(summary['leaderboard'])} rows (every run's: `avr eval`, "
                     f"or {root}/leaderboard/leaderboard.md)\n")
        lines.append(lb.to_markdown(summary["leaderboard"], SMOKE_TITLE if smoke else None))
    prev = summary.get("compare")
    lines.append(f"compared with the previous run {prev}: {root}/runs/{rid}/compare.md (`avr compare {rid}`)"
                 if prev else "the first finished run of its kind in this store: nothing to compare with yet")
    return "\n".join(lines)


def _result_lines(name: str, result) -> list[str]:
    """An output's result as numbers: a learning signal (mean difference, 95% CI) or a
    test-time-scaling curve (its table); nothing for outputs without one."""
    from avr_core.scaling import to_markdown

    if isinstance(result, dict) and {"mean_diff", "ci95", "n"} <= result.keys():
        return [_signal_line(name, result), ""]
    if isinstance(result, dict) and "comparisons" in result:      # the signal preset's report
        return [*(_signal_line(f"{name} {c}", r) for c, r in result["comparisons"].items()), ""]
    if isinstance(result, list) and result and "R" in result[0]:
        return [f"{name}: mean score per refinement round R", to_markdown(result)]
    return []


def _signal_line(name: str, r: dict) -> str:
    """
    >>> _signal_line("learning_signal", {"mean_diff": 0.0123, "ci95": [-0.01, 0.0346], "n": 4, "b_better": 3,
    ...                                  "scorer": "reward_model"})
    'learning_signal (reward_model scorer, n=4): mean difference +0.0123, 95% CI [-0.0100, +0.0346]; better on 3 of 4'
    """
    (lo, hi), scorer = r["ci95"], f"{r['scorer']} scorer, " if r.get("scorer") else ""
    return (f"{name} ({scorer}n={r['n']}): mean difference {r['mean_diff']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]; "
            f"better on {r.get('b_better', '?')} of {r['n']}")


def _engine_cells(rows: list[dict]) -> tuple[str, str]:
    """The "starts (s)" and "reloads (s)" cells of some stage calls: models loaded or vLLM engines
    started, and new weights put into a running engine (issue 31), each with their seconds."""
    def cell(n, key):
        s = sum(r.get(key, 0.0) for r in rows)
        return f"{n} ({s:.1f})" if n else ""
    return (cell(sum(r.get("loads", 0) for r in rows), "load_s"),
            cell(sum(r.get("reloads", 0) for r in rows), "reload_s"))


def per_stage_table(log: list[dict], wall_s: float) -> str:
    """`wall_time_table` with one row per stage rather than per call (a tiny run calls respond
    five times): what the end of a run prints, so it fits on a screen.

    >>> print(per_stage_table([{"task": "respond", "cached": False, "wall_s": 30.0, "loads": 1, "load_s": 25.0},
    ...                        {"task": "respond", "cached": False, "wall_s": 2.0, "reloads": 1, "reload_s": 1.0},
    ...                        {"task": "respond", "cached": True, "wall_s": 0.5}], 33.0))
    | stage | calls | computed | cached | wall s | starts (s) | reloads (s) |
    |---|---|---|---|---|---|---|
    | respond | 3 | 2 | 1 | 32.5 | 1 (25.0) | 1 (1.0) |
    | **total** | 3 | 2 | 1 | **33.0** | **1 (25.0)** | **1 (1.0)** |
    <BLANKLINE>
    """
    by_task: dict[str, list[dict]] = {}
    for r in log:
        by_task.setdefault(r["task"], []).append(r)

    def counts(rows):
        c = sum(not r["cached"] for r in rows)
        return f"{len(rows)} | {c} | {len(rows) - c}"
    lines = ["| stage | calls | computed | cached | wall s | starts (s) | reloads (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {t} | {counts(rows)} | {sum(r['wall_s'] for r in rows):.1f} | {' | '.join(_engine_cells(rows))} |"
              for t, rows in by_task.items()]
    starts, reloads = _engine_cells(log)
    lines.append(f"| **total** | {counts(log)} | **{wall_s:.1f}** | **{starts or 0}** | **{reloads or 0}** |")
    return "\n".join(lines) + "\n"


def wall_time_table(log: list[dict], wall_s: float) -> str:
    """Markdown: one row per stage call in run order, with the models it loaded (vLLM engines
    started, HF models loaded) and the new weights it put into running engines, with their
    seconds, then the run's total and what the stages do not account for (Prefect flow
    bookkeeping, config and input checks).

    >>> print(wall_time_table([{"task": "respond", "artifact": "respond/ab", "cached": False, "wall_s": 30.0,
    ...                         "why": "changed config", "loads": 1, "load_s": 25.0}], 31.5))
    | stage | artifact | status | wall s | starts (s) | reloads (s) |
    |---|---|---|---|---|---|
    | respond | respond/ab | computed (changed config) | 30.0 | 1 (25.0) |  |
    | (outside stages) | | | 1.5 | | |
    | **total** | | 1 computed, 0 cached | **31.5** | **1 (25.0)** | **0** |
    <BLANKLINE>
    """
    def status(r):
        return "cached" if r["cached"] else f"computed ({r['why']})" if r.get("why") else "computed"

    lines = ["| stage | artifact | status | wall s | starts (s) | reloads (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['artifact']} | {status(r)} | {r['wall_s']:.1f} | {' | '.join(_engine_cells([r]))} |"
              for r in log]
    inside = sum(r["wall_s"] for r in log)
    n_cached = sum(r["cached"] for r in log)
    starts, reloads = _engine_cells(log)
    lines.append(f"| (outside stages) | | | {max(0.0, wall_s - inside):.1f} | | |")
    lines.append(f"| **total** | | {len(log) - n_cached} computed, {n_cached} cached | **{wall_s:.1f}** | "
                 f"**{starts or 0}** | **{reloads or 0}** |")
    return "\n".join(lines) + "\n"
