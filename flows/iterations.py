"""Iterative AvR in the flows (README "Iterations"): where a run's iterations start, the config
of iteration t (fresh prompt slices), and the record of each completed iteration.

    <store>/iterations/<chain>/iter-0003.json      one completed iteration: run, starting model, models, signal
    <store>/iterations/<chain>/iterations.{json,md,png}   every completed iteration of the chain: table + plot

`iterate.continue_last` starts after the last record of the chain, from its model, so the
nightly deployment adds `iterate.count` iterations a night. The plain-Python part is
`avr_core/iterations.py`.
"""
from __future__ import annotations

import json

from avr_core import iterations as core
from avr_core.config import ConfigError
from avr_core.store import ArtifactRef, Store
from run_records.record import RunRecord
from tasks.runtime import publish_plot
from tasks.training import policy_of

ITER = "iterations"


def completed(store: Store, chain: str) -> list[dict]:
    """The chain's completed iterations, in order."""
    out = []
    for p in sorted(store.fs.glob(store.path(ITER, chain, "iter-*.json"))):
        with store.fs.open(p, "r") as f:
            out.append(json.load(f))
    return sorted(out, key=lambda r: r["iteration"])


def start(cfg: dict, prompt_rows: int) -> tuple[dict, range]:
    """(the policy iteration `first` starts from, the iterations this run does). Checks, before
    any work, that every one of them has fresh prompts inside the file and clear of held-out ones."""
    store, it = Store.of(cfg), cfg["iterate"]
    seed, first = cfg["policy"], 0
    if it["continue_last"] and (done := completed(store, core.chain_id(cfg))):
        last = done[-1]
        ref = store.ref(*last["next_model"].split("/", 1))
        if not store.exists(ref):
            raise ConfigError(f"key 'iterate.continue_last': iteration {last['iteration']}'s model {ref} is not in "
                              f"the store any more; rebuild it or set iterate.continue_last=false")
        seed, first = policy_of(cfg, ref), last["iteration"] + 1
    todo = range(first, first + it["count"])
    if todo.stop > 1:                              # iteration 0 alone: preflight (run_records/preflight.py) checked it
        core.check_slices(cfg["data"], prompt_rows, todo, core.stride(cfg["data"], it["prompt_stride"]),
                          source=cfg["data"]["prompts"])
    print(f"iterations {list(todo)} of chain {core.chain_id(cfg)}, starting from "
          f"{seed.get('artifact') or seed['path']}")
    return seed, todo


def config_for(cfg: dict, t: int) -> dict:
    """Iteration t's config: the training slices moved to fresh prompts (iteration 0: unchanged)."""
    if t == 0:
        return cfg
    return {**cfg, "data": core.shifted(cfg["data"], t, core.stride(cfg["data"], cfg["iterate"]["prompt_stride"]))}


def next_seed(cfg: dict, stage1: dict, stage2: dict) -> dict:
    """The model iteration t+1 starts from (`iterate.model`)."""
    return stage1["model"] if cfg["iterate"]["model"] == "stage1" else stage2["model"]


def record(cfg: dict, run: RunRecord, t: int, seed: dict, stage1: dict, stage2: dict, signal: ArtifactRef) -> str:
    """Write iteration t's record, then the chain's per-iteration table and plot (store + a
    Prefect artifact); returns the table as markdown."""
    from tasks.evaluate import SMOKE_LABEL, read_leaderboard, smoke_title

    store, chain = Store.of(cfg), core.chain_id(cfg)
    nxt = next_seed(cfg, stage1, stage2)
    rec = {"iteration": t, "run": run.id, "chain": chain, "seed": seed.get("artifact") or seed["path"],
           "stage1_model": str(stage1["model_ref"]), "stage2_model": str(stage2["model_ref"]),
           "next_model": nxt["artifact"], "model": cfg["iterate"]["model"],
           "slices": {s: cfg["data"][s] for s in core.TRAIN_SLICES},
           "signal_artifact": str(signal), "signal": store.manifest(signal).get("result")}
    path = store.path(ITER, chain, f"iter-{t:04d}.json")
    if store.fs.exists(path):                      # a cached rerun: the iteration stays the run's that computed it
        old = json.loads(store.fs.cat_file(path))
        if all(old.get(k) == rec[k] for k in ("seed", "stage1_model", "stage2_model", "next_model", "signal_artifact")):
            rec["run"] = old["run"]
    store.write_atomic(path, json.dumps(rec, indent=2).encode())
    rows = core.table(completed(store, chain), read_leaderboard(cfg["store"]["root"]))
    md = core.to_markdown(rows, smoke_title(cfg))   # the leaderboard's rule: tiny numbers say they are a smoke run
    png = core.plot(rows, SMOKE_LABEL if smoke_title(cfg) else None)
    for name, data in (("iterations.json", json.dumps(rows, indent=2).encode()), ("iterations.md", md.encode()),
                       ("iterations.png", png)):
        store.write_atomic(store.path(ITER, chain, name), data)
    publish_plot(store.ref(ITER, chain), "avr-iterations", png, rows, "win rate and scorer score per iteration", md)
    print(f"iteration {t} done (chain {chain}; every iteration: {store.path(ITER, chain, 'iterations.md')}):\n"
          f"{core.to_markdown([r for r in rows if r['iteration'] == t])}")
    return md
