"""Finding the run `avr resume RUN` runs again (avr_cli/resume.py), in the store's run records.

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

import json
import os
import re
import socket
import tempfile
import time

from avr_core.store import Store

UUID = re.compile(r"^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$", re.IGNORECASE)
RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")          # run_records/record.py RunRecord.begin


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
    path = store.path("runs", run_id, "run.json")
    return json.loads(store.fs.cat_file(path)) if store.fs.exists(path) else {}


def flow_name(record: dict, store: Store, run_id: str) -> tuple[str, dict]:
    """The name of the flow the run ran and its parameters besides `params` (a synthesis run's split)."""
    name = record.get("flow")
    if name is None:        # an older run: `avr run` ran the flow its config names
        text = store.fs.cat_file(store.path("runs", run_id, "config.yaml")).decode()
        name = "avr-signal" if re.search(r"^flow: *signal\b", text, re.MULTILINE) else "avr-pipeline"
    return name, dict(record.get("flow_parameters") or {})


def local_config(store: Store, run_id: str) -> str:
    """A local path of runs/<id>/config.yaml (copied out of an object store)."""
    path = store.path("runs", run_id, "config.yaml")
    if not store.remote:
        return path
    fd, local = tempfile.mkstemp(prefix=f"avr-{run_id}-", suffix=".yaml")
    with os.fdopen(fd, "wb") as f:
        f.write(store.fs.cat_file(path))
    return local


def record_crash(store: Store, run_id: str, record: dict, prefect_crashed: str | None = None) -> dict | None:
    """Before `avr resume` runs `run_id` again: a run with no end in its record (no summary, not
    failed or stopped) that was killed without a word (kill -9, the OOM killer, a reboot, a dead
    node) gets `crashed` in its run.json: the stage it was computing, since when, and how that was
    found. Found two ways: its process on this host is gone, or (`prefect_crashed`, the state
    message) Prefect's zombie detection marked its flow run Crashed, which works across hosts.
    Returns that entry; None when the run had ended or cannot be judged from here (a run of another
    host that Prefect has not marked). A run whose process still lives is refused: two runs of
    one config would only wait on each other's locks.

    ValueError: the run is still running."""
    if not record or _ended(store, run_id, record):     # no record to write to (an older run), or it ended
        return None
    here = record.get("host") == socket.gethostname() and record.get("pid")
    if prefect_crashed is not None:
        how = f"Prefect marked its flow run Crashed: {prefect_crashed or 'no message'}"
    elif not here:
        return None
    elif _alive(int(record["pid"])):
        raise ValueError(f"run {run_id} is still running (process {record['pid']} on this host); "
                         f"stop it (kill -TERM {record['pid']}) or let it finish")
    else:
        how = f"its process {record['pid']} on {record['host']} ended without recording an end"
    stage = record.get("stage") or {}
    entry = {"stage": stage.get("name"), "since": stage.get("since"), "found_at": time.time(),
             "how": f"{how} (found by avr resume)"}
    path = store.path("runs", run_id, "run.json")
    store.write_atomic(path, json.dumps({**record, "crashed": entry}, indent=2, default=str).encode())
    return entry


def _ended(store: Store, run_id: str, record: dict) -> bool:
    return (any(k in record for k in ("failed", "stopped", "crashed"))
            or store.fs.exists(store.path("runs", run_id, "summary.json")))


def _alive(pid: int) -> bool:
    """A process of this id exists and is not a zombie awaiting its parent's wait."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
