"""One stage with 1 and with 2 workers: the `respond` stage (tasks/synthesis.py) over 8 shards,
sequentially (`scale.engine=local`) and on a local Ray cluster (`scale.engine=ray`) with
`scale.workers` 1 and 2; prints every shard's time, which worker ran it, the stage's wall time
and the ratios. The generator is scripted and spends a fixed `--shard-s` per shard sleeping, so
the 2 cores of this machine do not hide the mechanism (a real model here is CPU-bound and a
second worker on the same 2 cores gains nothing). Keys and data files are checked to be equal.

    .venv/bin/python bench/scale_out.py                 # ~2 min here (Ray's start: ~25 s of it)
    .venv/bin/python bench/scale_out.py --shards 16 --shard-s 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the flows' ephemeral Prefect server: 20 s (the default) is not enough on 2 loaded cores
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


class TimedGen:
    """Scripted: answers from the prompt and seed; sleeps `shard_s` per call; logs each call."""

    def __init__(self, log: str, shard_s: float):
        from avr_core.backends.base import BackendStats

        self.log, self.shard_s, self.stats = Path(log), shard_s, BackendStats()

    def generate(self, conversations, params):
        t0 = time.time()
        time.sleep(self.shard_s)
        out = [[f"answer to {c[-1]['content']} (seed {params.seed})"] for c in conversations]
        with open(self.log, "a") as f:
            f.write(json.dumps({"first": conversations[0][-1]["content"], "pid": os.getpid(), "t0": t0,
                                "s": round(time.time() - t0, 3)}) + "\n")
        return out


def run(tmp: Path, name: str, engine: str, workers: int, shards: int, shard_s: float) -> dict:
    from prefect import flow

    import tasks.synthesis as t
    from avr_core.config import load_config
    from avr_core.store import Store

    log = tmp / f"{name}.calls.jsonl"
    t.make_generator = lambda policy, backend: TimedGen(str(log), shard_s)   # shipped to the workers by value
    cfg = load_config("tiny", [f"store.root={tmp / name}", f"data.prompts={tmp / 'prompts.jsonl'}",
                               f"data.stage1_sft=[0,{2 * shards}]", "shard_size=2", f"scale.engine={engine}",
                               f"scale.workers={workers}", "respond.use_dataset_answer=false"])

    @flow(name=f"bench-scale-out-{name}")
    def f():
        p = t.prompts(cfg, "stage1_sft")
        t0 = time.perf_counter()
        ref = t.respond(cfg, dict(cfg["policy"]), p)
        return ref, time.perf_counter() - t0
    ref, wall = f()
    store = Store(cfg["store"]["root"])
    m = store.manifest(ref)
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    data = {rel: store.read_file(ref, rel, m) for rel in m["files"]}
    return {"name": name, "key": ref.key, "wall_s": wall, "compute_s": m["compute_s"], "calls": calls,
            "workers": m.get("workers", {"driver": len(calls)}), "data": data}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-s", type=float, default=1.0)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="avr-bench-scale-"))
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{j:03d}", "prompt": f"q{j:03d}"}) + "\n"
                                               for j in range(2 * args.shards)))
    from tasks.runtime.ray_workers import ensure_ray, settings

    t0 = time.perf_counter()
    ensure_ray(settings({"engine": "ray", "workers": 2}))
    ray_start = time.perf_counter() - t0
    runs = [run(tmp, "sequential", "local", 1, args.shards, args.shard_s),
            run(tmp, "ray-1", "ray", 1, args.shards, args.shard_s),
            run(tmp, "ray-2", "ray", 2, args.shards, args.shard_s)]
    base = runs[0]
    print(f"\nrespond, {args.shards} shards x 2 prompts, scripted generator {args.shard_s:g} s/shard; "
          f"{os.cpu_count()} cores; Ray local cluster start {ray_start:.1f} s (once, not in the times below)")
    print("\n| run | shards per worker | shard times (s) | first shard start -> last shard end (s) "
          "| stage compute_s | stage wall_s | speed-up vs sequential (compute_s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        shard_times = ", ".join(f"{c['s']:.2f}" for c in sorted(r["calls"], key=lambda c: c["first"]))
        per = "/".join(str(v) for v in sorted(r["workers"].values(), reverse=True))
        span = max(c["t0"] + c["s"] for c in r["calls"]) - min(c["t0"] for c in r["calls"])
        print(f"| {r['name']} | {per} | {shard_times} | {span:.2f} | {r['compute_s']:.2f} | {r['wall_s']:.2f} | "
              f"{base['compute_s'] / r['compute_s']:.2f}x |")
    print("(compute_s - the shard span: on Ray, mostly the actors' start: a new process per worker that "
          "imports the stage's modules)")
    same = all(r["key"] == base["key"] and r["data"] == base["data"] for r in runs)
    print(f"\nsame key and byte-identical data files in all three runs: {same}")
    print(f"ray-2 vs ray-1 (compute_s): {runs[1]['compute_s'] / runs[2]['compute_s']:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
