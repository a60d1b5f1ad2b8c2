"""Compare two runs from their records in the store (`runs/<id>/summary.json`), no server needed.

    avr compare 20260101-020000-ab12cd 20260102-020000-ef34ab     # run A, run B (unique id prefixes work)
    avr compare 20260102-020000-ef34ab                            # B against the previous run of its deployment

Per stage call (in run order; a stage that runs twice, like synthesis, is `respond#2`): whether
each run computed it or took it from cache, whether both used the same artifact, the counts
that differ (every filter's drops, parse failures, tokens) and the metrics that differ (the
manifest's `result`: learning signal, win rate, ...); then the leaderboard rows of both runs per
(iteration, model). Every run publishes this against the previous run of the same deployment
(`run_records/lifecycle.py::finish_run`), the first thing a nightly user looks at.
"""
from __future__ import annotations

import json
import os

import yaml

from avr_core.store import Store

RUNS = "runs"


def run_ids(store: Store) -> list[str]:
    """Ids of the runs that finished (have a summary), oldest first (ids start with the start time)."""
    ids = []
    for p in store._ls(store.path(RUNS)):
        rid = p.rsplit("/", 1)[-1]
        if store.fs.exists(store.path(RUNS, rid, "summary.json")):
            ids.append(rid)
    return sorted(ids)


def resolve_run(store: Store, prefix: str) -> str:
    """A run id from a unique prefix; ValueError naming the problem."""
    ids = run_ids(store)
    cands = [r for r in ids if r.startswith(prefix)]
    if prefix in ids:
        return prefix
    if len(cands) != 1:
        raise ValueError(f"run {prefix!r}: {'no finished run' if not cands else f'{len(cands)} runs'} match in "
                         f"{store.root}/runs" + (f" (latest: {', '.join(ids[-3:])})" if ids and not cands else ""))
    return cands[0]


def load_run(store: Store, run_id: str) -> dict:
    with store.fs.open(store.path(RUNS, run_id, "summary.json"), "r") as f:
        return json.load(f)


def source(run: dict) -> str:
    """What "the same deployment" means: the deployment's name, or the flow's for a run without one."""
    return run.get("deployment") or run.get("flow") or "avr-pipeline"


def previous_run(store: Store, run: dict) -> str | None:
    """The latest finished run before `run` of the same deployment (None: this is the first).

    Ids carry the start time to the second, then a random suffix: two runs started in the same
    second are ordered by the `started` time their summaries record, not by the suffix."""
    stamp, mine = run["id"][:15], run.get("started", float("inf"))

    def started(rid: str) -> float:
        return load_run(store, rid).get("started", 0.0) if rid[:15] == stamp else 0.0

    before = [r for r in run_ids(store)
              if r != run["id"] and (r[:15] < stamp or (r[:15] == stamp and started(r) < mine))]
    before.sort(key=lambda r: (r[:15], started(r)))
    for rid in reversed(before):
        if source(load_run(store, rid)) == source(run):
            return rid
    return None


def _occurrences(stages: list[dict]) -> dict[str, dict]:
    """`task` -> its record; a task's later calls are `task#2`, `task#3`, ..."""
    out, n = {}, {}
    for r in stages:
        n[r["task"]] = n.get(r["task"], 0) + 1
        out[r["task"] if n[r["task"]] == 1 else f"{r['task']}#{n[r['task']]}"] = r
    return out


def _manifest(store: Store, artifact: str | None) -> dict:
    if not artifact or "/" not in artifact:
        return {}
    ref = store.ref(*artifact.split("/", 1))
    return store.manifest(ref) if store.exists(ref) else {}


def _numbers(d, prefix: str = "") -> dict[str, float]:
    """Numeric scalars of a (nested) dict, dotted keys."""
    out = {}
    for k, v in (d or {}).items() if isinstance(d, dict) else []:
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
    return out


def diff(a: dict, b: dict) -> dict[str, tuple]:
    """Keys whose values differ: key -> (a, b); a key missing on one side is None there.

    >>> diff({"x": 1, "y": 2}, {"x": 1, "y": 3, "z": 1})
    {'y': (2, 3), 'z': (None, 1)}
    """
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def status(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["cached"]:
        return "cached"
    return f"computed ({r['why']})" if r.get("why") else "computed"


def compare(store: Store, a_id: str, b_id: str) -> dict:
    """Everything `to_markdown` prints, as data."""
    a, b = load_run(store, a_id), load_run(store, b_id)
    sa, sb = _occurrences(a.get("stages", [])), _occurrences(b.get("stages", []))
    stages = []
    for name in list(sb) + [n for n in sa if n not in sb]:
        ra, rb = sa.get(name), sb.get(name)
        ma, mb = _manifest(store, ra and ra["artifact"]), _manifest(store, rb and rb["artifact"])
        stages.append({"stage": name, "a": status(ra), "b": status(rb),
                       "same_artifact": bool(ra and rb and ra["artifact"] == rb["artifact"]),
                       "artifact_b": (rb or ra)["artifact"],
                       "counts": diff(ma.get("counts") or {}, mb.get("counts") or {}) if ma and mb else {},
                       "metrics": diff(_numbers(ma.get("result")), _numbers(mb.get("result"))) if ma and mb else {},
                       "wall_s": ((ra or {}).get("wall_s"), (rb or {}).get("wall_s"))})
    return {"a": a_id, "b": b_id, "a_wall_s": a.get("wall_s"), "b_wall_s": b.get("wall_s"),
            "config": diff(resolved_config(store, a_id, a), resolved_config(store, b_id, b)),
            "stages": stages, "leaderboard": leaderboard_deltas(store, a_id, b_id)}


def resolved_config(store: Store, run_id: str, run: dict) -> dict:
    """The run's resolved config (runs/<id>/config.yaml) as dotted keys, so two runs of the same
    config compare equal however they were given: a preset and overrides, or a resume's saved
    config.yaml. A local store root counts by its absolute path. A run without config.yaml (older
    records): the parameters it was given.

    >>> flat_config({"critique": {"k": 3, "tags": ["a"]}, "store": {"root": "x"}})
    {'critique.k': 3, 'critique.tags': '["a"]', 'store.root': 'x'}
    """
    try:
        cfg = yaml.safe_load(store.fs.cat_file(store.path(RUNS, run_id, "config.yaml")))
    except FileNotFoundError:
        return _flat(run.get("params") or {"overrides": run.get("overrides")})
    flat = flat_config(cfg or {})
    root = flat.get("store.root")
    if isinstance(root, str) and "://" not in root:
        flat["store.root"] = os.path.abspath(root)
    return flat


def flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flat_config(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def _flat(d: dict) -> dict:
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in d.items()}


def leaderboard_deltas(store: Store, a_id: str, b_id: str) -> list[dict]:
    """Per (iteration, model) of either run: win rate and average length in A and B and the change."""
    from avr_core.evaluation.leaderboard import read

    rows = read(store)
    by = {run: {(int(r.get("iteration") or 0), r["model"]): r for r in rows if r["run"] == run} for run in (a_id, b_id)}
    out = []
    for key in sorted(set(by[a_id]) | set(by[b_id])):
        ra, rb = by[a_id].get(key, {}), by[b_id].get(key, {})
        wa, wb = ra.get("win_rate"), rb.get("win_rate")
        out.append({"iteration": key[0], "model": key[1], "wr_a": wa, "wr_b": wb,
                    "wr_delta": None if wa is None or wb is None else wb - wa,
                    "len_a": ra.get("avg_len"), "len_b": rb.get("avg_len")})
    return out


def _fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _changes(d: dict[str, tuple], limit: int = 6) -> str:
    items = [f"{k}: {_fmt(a)} → {_fmt(b)}" for k, (a, b) in d.items()]
    return "; ".join(items[:limit]) + (f"; (+{len(items) - limit} more)" if len(items) > limit else "")


def to_markdown(c: dict) -> str:
    """The comparison as markdown: the run-level line, the config difference, one row per stage
    call, and the leaderboard deltas.

    >>> print(to_markdown({"a": "r1", "b": "r2", "a_wall_s": 10.0, "b_wall_s": 2.0, "config": {},
    ...     "stages": [{"stage": "respond", "a": "computed", "b": "cached", "same_artifact": True,
    ...                 "artifact_b": "respond/ab", "counts": {}, "metrics": {}, "wall_s": (8.0, 0.1)}],
    ...     "leaderboard": [{"iteration": 0, "model": "stage1", "wr_a": 40.0, "wr_b": 50.0, "wr_delta": 10.0,
    ...                      "len_a": 100.0, "len_b": 90.0}]}))
    ### Run r2 compared with r1
    <BLANKLINE>
    wall time 10 s → 2 s; same parameters; 1 stage call(s): 0 computed in r2, 0 with different counts
    <BLANKLINE>
    | stage | r1 | r2 | artifact | wall s | counts that differ | metrics that differ |
    |---|---|---|---|---|---|---|
    | respond | computed | cached | same `respond/ab` | 8 → 0.1 | — | — |
    <BLANKLINE>
    **Leaderboard** (win rate %, avg length)
    <BLANKLINE>
    | iteration | model | r1 | r2 | Δ WR | avg len r1 → r2 |
    |---|---|---|---|---|---|
    | 0 | stage1 | 40 | 50 | +10 | 100 → 90 |
    <BLANKLINE>
    """
    a, b = c["a"], c["b"]
    n_comp = sum(s["b"].startswith("computed") for s in c["stages"])
    n_diff = sum(bool(s["counts"]) for s in c["stages"])
    params = "same parameters" if not c["config"] else f"parameters: {_changes(c['config'])}"
    lines = [f"### Run {b} compared with {a}", "",
             f"wall time {_fmt(c['a_wall_s'])} s → {_fmt(c['b_wall_s'])} s; {params}; {len(c['stages'])} stage "
             f"call(s): {n_comp} computed in {b}, {n_diff} with different counts", "",
             f"| stage | {a} | {b} | artifact | wall s | counts that differ | metrics that differ |",
             "|---|---|---|---|---|---|---|"]
    for s in c["stages"]:
        art = f"same `{s['artifact_b']}`" if s["same_artifact"] else f"new `{s['artifact_b']}`"
        wall = f"{_fmt(s['wall_s'][0])} → {_fmt(s['wall_s'][1])}"
        lines.append(f"| {s['stage']} | {s['a']} | {s['b']} | {art} | {wall} | {_changes(s['counts']) or '—'} | "
                     f"{_changes(s['metrics']) or '—'} |")
    lines += ["", "**Leaderboard** (win rate %, avg length)", ""]
    if c["leaderboard"]:
        lines += [f"| iteration | model | {a} | {b} | Δ WR | avg len {a} → {b} |", "|---|---|---|---|---|---|"]
        for r in c["leaderboard"]:
            d = "—" if r["wr_delta"] is None else f"{r['wr_delta']:+.3g}"
            lines.append(f"| {r['iteration']} | {r['model']} | {_fmt(r['wr_a'])} | {_fmt(r['wr_b'])} | {d} | "
                         f"{_fmt(r['len_a'])} → {_fmt(r['len_b'])} |")
    else:
        lines.append("(neither run evaluated a model)")
    return "\n".join(lines) + "\n"


def plot_wall_times(stages: list[dict]) -> bytes:
    """PNG: one bar per computed stage call of a run (wall seconds, orange) and ONE bar for all
    its cache hits together (blue): a nightly run that was mostly cache hits shows what it computed,
    not forty bars of lookups. The wall-time table beside it keeps every call."""
    from avr_core.scaling import _png, _pyplot

    plt = _pyplot()
    computed = [(name, r["wall_s"]) for name, r in zip(_occurrences(stages), stages) if not r["cached"]]
    hits = [r["wall_s"] for r in stages if r["cached"]]
    bars = computed + ([(f"from cache ({len(hits)} calls)", sum(hits))] if hits else [])
    bars = bars or [("(no stages)", 0.0)]
    colors = ["tab:orange"] * len(computed) + ["tab:blue"] * bool(hits) or ["tab:gray"]
    fig, ax = plt.subplots(figsize=(8, max(2.2, 0.28 * len(bars) + 1)))
    ax.barh(range(len(bars)), [w for _, w in bars], color=colors)
    ax.set_yticks(range(len(bars)), [n for n, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="wall time (s)", title=f"{len(computed)} computed (orange), {len(hits)} from cache (blue)")
    return _png(fig)
