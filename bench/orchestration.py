"""What orchestration costs, measured: Prefect's overhead per stage task, a fully cached rerun of
the real pipeline, and the work redone when a sharded stage resumes.

    .venv/bin/python bench/orchestration.py                              # overhead + resume (~30 s)
    .venv/bin/python bench/orchestration.py --store artifacts            # + a cached rerun of the tiny
                                                                         #   pipeline on a store that has one

1. Overhead per task: the same stage function (a sharded stage whose artifact exists, so it
   returns at once) called N times directly and N times as our Prefect `StageTask` inside a flow
   (cache lookup, task run bookkeeping, state changes against the local API). Printed side by
   side; the difference per call is Prefect's overhead (target <= 50 ms).
2. Cached rerun: `pipeline(preset, store.root=STORE)` on a store where the run is complete; wall
   time and the number of stage calls that were NOT cache hits (target <= 15 s, 0 computed).
3. Resume: a 10-shard stage that fails in shard 7, then runs again: how many shards the rerun
   computed that had been committed before the failure (target 0).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prefect import flow  # noqa: E402

from avr_core.store import Store  # noqa: E402
from tasks.runtime.ledger import STAGE_LOG, Spec, stage  # noqa: E402


def _spec(cfg, i):
    return Spec("bench", {"i": i})


@stage(_spec, retries=0)
def bench_stage(out, cfg: dict, i: int):
    out.shards(lambda: [{"id": i}], 1, lambda shard, j: ({"records": shard}, Counter()))


_stage_body = bench_stage.fn      # the same stage without Prefect: the skeleton alone


def overhead(n: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        cfg = {"store": {"root": root}}
        for i in range(n):                       # every artifact exists: both sides measure a cache hit
            _stage_body(cfg, i)
        t0 = time.perf_counter()
        for i in range(n):
            _stage_body(cfg, i)
        direct = (time.perf_counter() - t0) / n

        @flow(name="bench-overhead")
        def many():
            t = time.perf_counter()
            for i in range(n):
                bench_stage(cfg, i)
            return (time.perf_counter() - t) / n
        many()                                   # warm: temporary server start, first task registration
        prefect = many()
    return {"direct_ms": direct * 1e3, "prefect_ms": prefect * 1e3, "overhead_ms": (prefect - direct) * 1e3}


_RESUME = {"fail_at": None, "calls": []}


@stage(lambda cfg: Spec("bench_resume", {}), retries=0)
def bench_resume(out, cfg: dict):
    def work(shard, i):
        if i == _RESUME["fail_at"]:
            raise RuntimeError("injected failure")
        _RESUME["calls"].append(i)
        return {"records": shard}, Counter()
    out.shards(lambda: [{"id": j} for j in range(10)], 1, work)


def resume() -> dict:
    with tempfile.TemporaryDirectory() as root:
        cfg = {"store": {"root": root}}
        _RESUME.update(fail_at=7, calls=[])
        try:
            bench_resume.fn(cfg)
        except RuntimeError:
            pass
        before = set(_RESUME["calls"])
        _RESUME.update(fail_at=None, calls=[])
        ref = bench_resume.fn(cfg)
        calls = _RESUME["calls"]
        return {"committed_before": len(before), "recomputed_committed": len(before & set(calls)),
                "computed_on_resume": len(calls), "records": len(Store(root).read_records(ref))}


def cached_rerun(store: str, preset: str) -> dict:
    from flows.pipeline import pipeline

    t0 = time.perf_counter()
    pipeline({"preset": preset, "overrides": [f"store.root={store}"]})
    return {"wall_s": time.perf_counter() - t0, "stage_calls": len(STAGE_LOG),
            "computed": sum(not r["cached"] for r in STAGE_LOG)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help="task calls per side for the overhead figure")
    p.add_argument("--store", default=None, help="a store holding a complete run of --preset: time its cached rerun")
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    o = overhead(args.n)
    print(f"overhead per stage task ({args.n} cache-hit calls each): direct {o['direct_ms']:.2f} ms, "
          f"as a Prefect task {o['prefect_ms']:.1f} ms -> "
          f"Prefect adds {o['overhead_ms']:.1f} ms per task (target <= 50)")
    r = resume()
    print(f"resume: {r['committed_before']} shards committed before the failure, {r['recomputed_committed']} of them "
          f"recomputed on resume (target 0); {r['computed_on_resume']} shards computed on resume; "
          f"{r['records']} records, each once")
    if args.store:
        c = cached_rerun(args.store, args.preset)
        print(f"cached rerun of the {args.preset} pipeline: {c['wall_s']:.1f} s wall (target <= 15), "
              f"{c['stage_calls']} stage calls, {c['computed']} computed (target 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
