"""`avr resume RUN`: run a failed or stopped run again; its finished stages are cache hits.

The run is found in the store's run records (run_records/resume.py); here it is mapped to the flow
that runs it again, supervised as `avr run` is (avr_cli/run.py)."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable

from avr_cli import supervisor
from avr_cli.run import run_flow

if TYPE_CHECKING:
    from avr_core.store import Store

RESUME_HELP = """\
Runs a failed or stopped run again; what it had finished is not recomputed.

By run id (printed by `avr run` at its start and in its failure line): the run's flow runs again
with the run's own config, runs/<id>/config.yaml, against the same store. No Prefect server is
needed (the temporary one of `avr run` may be gone). Every stage whose artifact is in the store
is a cache hit; the stage that failed and everything after it are computed; a half-finished
sampling stage continues from its last committed shard. The new run gets its own id, and its
runs/<id>/run.json names the run it resumes.

By Prefect flow-run UUID: the parameters are read from the Prefect API that ran it
(PREFECT_API_URL), then the same happens.
"""


def add_parser(subparsers) -> None:
    rs = subparsers.add_parser("resume", help="run a failed or stopped run again: finished stages are cache hits",
                               description=RESUME_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    rs.add_argument("run", metavar="RUN_ID", help="the run id `avr run` printed (e.g. 20261203-080303-fe9764; a "
                                                  "unique prefix works), or a Prefect flow-run UUID")
    rs.add_argument("--store", default=None, help="the run's artifact store (default: AVR_STORE or ./artifacts)")


def run(args) -> int:
    if not supervisor.is_worker():   # stops promptly on SIGTERM / Ctrl-C, as `avr run` does
        return supervisor.supervise(args.argv)
    try:
        again, run_id = resumer(args.run, args.store)
    except ValueError as e:
        print(f"avr: error: {e}", file=sys.stderr)
        return 2
    with supervisor.worker():
        return run_flow(again, args.argv, run_id)


def resumer(run: str, store_root: str | None = None) -> tuple[Callable[[], object], str | None]:
    """(what to call to resume `run`, the avr run id it resumes); ValueError naming the problem."""
    from avr_core.config import default_store_root
    from avr_core.store import Store
    from avr_core.store.probe import probe
    from run_records.resume import UUID, find_run, local_config, read_record, record_crash

    if UUID.match(run):
        from flows.deploy import resume, resumed_run
        return lambda: resume(run), resumed_run(run)
    from flows.params import RunParams

    root = store_root or default_store_root()
    if problem := probe(root) if "://" in root and not root.startswith("file://") else None:
        raise ValueError(problem)                  # before any read retries against a store that is not there
    store = Store(root)
    run_id = find_run(store, run)
    record = read_record(store, run_id)
    if crashed := record_crash(store, run_id, record):
        print(f"run {run_id} crashed (its process is gone) in stage {crashed['stage'] or 'unknown'}: "
              "recorded in its run.json", file=sys.stderr)
    flow, extra = flow_of(record, store, run_id)
    params = RunParams(preset=local_config(store, run_id), overrides=[f"store.root={store.root}"])
    from avr_cli.presets import apply_hub_mode
    apply_hub_mode(params)                         # as `avr run` did, before HF loads
    return lambda: flow(params=params, **extra), run_id


def flow_of(record: dict, store: Store, run_id: str) -> tuple[Callable, dict]:
    """The flow the run ran and its parameters besides `params` (a synthesis run's split)."""
    from flows.deploy import evaluate_run, stage1_run, stage2_run, synthesis_run
    from flows.learning_signal import signal_run
    from flows.pipeline import pipeline
    from run_records.resume import flow_name

    known = {f.name: f for f in (pipeline, signal_run, synthesis_run, stage1_run, stage2_run, evaluate_run)}
    name, extra = flow_name(record, store, run_id)
    if name not in known:
        raise ValueError(f"run {run_id} is a {name!r} run; avr resume knows {sorted(known)}")
    return known[name], extra
