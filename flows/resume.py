"""`avr resume RUN`: run a failed or stopped run again; its finished stages are cache hits.

    avr resume 20261203-080303-fe9764 [--store DIR]    the run id `avr run` prints (a unique prefix works)
    avr resume 0b0c8e0e-...-5f1f                        a Prefect flow-run id (parameters from the Prefect API)

By run id, nothing is asked of the Prefect server that ran it (`avr run`'s temporary server may
be gone): the run's flow runs again with the run's own resolved config,
`runs/<id>/config.yaml`, against the same store. Every stage whose artifact is in the store is a
cache hit; the stage that failed and everything after it are computed; a half-finished sampling
stage continues from its last committed shard. The new run gets its own id and its run.json
names the run it resumes.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Callable

from avr_core.store import Store

UUID = re.compile(r"^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$", re.IGNORECASE)


def resumer(run: str, store_root: str | None = None) -> tuple[Callable[[], object], str | None]:
    """(what to call to resume `run`, the avr run id it resumes); ValueError naming the problem."""
    if UUID.match(run):
        from flows.deploy import resume
        return lambda: resume(run), None
    from flows.params import RunParams

    store = Store(store_root or os.environ.get("AVR_STORE") or "./artifacts")
    run_id = find_run(store, run)
    record = read_record(store, run_id)
    flow, extra = flow_of(record, store, run_id)
    params = RunParams(preset=local_config(store, run_id), overrides=[f"store.root={store.root}"])
    from avr_core.config import load_config
    from avr_core.hub import apply_mode
    apply_mode(bool(load_config(params.preset, params.overrides).hub.offline))   # as `avr run` did, before HF loads
    return lambda: flow(params=params, **extra), run_id


def find_run(store: Store, prefix: str) -> str:
    """The run id in `<store>/runs/` (with a saved config) from a unique prefix."""
    ids = sorted(p.rsplit("/", 1)[-1] for p in store._ls(store.path("runs"))
                 if store.fs.exists(f"{p}/config.yaml"))
    found = [r for r in ids if r.startswith(prefix)]
    if prefix in ids or len(found) == 1:
        return prefix if prefix in ids else found[0]
    if found:
        raise ValueError(f"run {prefix!r}: {len(found)} runs match in {store.root}/runs: {', '.join(found[:5])}")
    latest = f" (latest: {', '.join(ids[-3:])})" if ids else ""
    raise ValueError(f"run {prefix!r}: no such run in {store.root}/runs{latest}; "
                     "a run in another store needs --store DIR")


def read_record(store: Store, run_id: str) -> dict:
    """runs/<id>/run.json (empty for a run from before it was written)."""
    import json

    path = store.path("runs", run_id, "run.json")
    return json.loads(store.fs.cat_file(path)) if store.fs.exists(path) else {}


def flow_of(record: dict, store: Store, run_id: str) -> tuple[Callable, dict]:
    """The flow the run ran and its parameters besides `params` (a synthesis run's split)."""
    from flows.deploy import evaluate_run, stage1_run, stage2_run, synthesis_run
    from flows.learning_signal import signal_run
    from flows.pipeline import pipeline

    known = {f.name: f for f in (pipeline, signal_run, synthesis_run, stage1_run, stage2_run, evaluate_run)}
    name = record.get("flow")
    if name is None:        # an older run: `avr run` ran the flow its config names
        text = store.fs.cat_file(store.path("runs", run_id, "config.yaml")).decode()
        name = "avr-signal" if re.search(r"^flow: *signal\b", text, re.MULTILINE) else "avr-pipeline"
    if name not in known:
        raise ValueError(f"run {run_id} is a {name!r} run; avr resume knows {sorted(known)}")
    return known[name], dict(record.get("flow_parameters") or {})


def local_config(store: Store, run_id: str) -> str:
    """A local path of runs/<id>/config.yaml (copied out of an object store)."""
    path = store.path("runs", run_id, "config.yaml")
    if not store.remote:
        return path
    fd, local = tempfile.mkstemp(prefix=f"avr-{run_id}-", suffix=".yaml")
    with os.fdopen(fd, "wb") as f:
        f.write(store.fs.cat_file(path))
    return local
