"""A run killed without a word (kill -9) says so in run.json once `avr resume` finds its process
gone (issue 37): the stage it was computing, since when, and how that was found."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from avr_core.store import Store
from run_records.resume import read_record, record_crash


def _run(root, **record) -> tuple[Store, str]:
    run_id = "20261207-101010-abcdef"
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("preset: tiny\n")
    (d / "run.json").write_text(json.dumps({"id": run_id, "host": socket.gethostname(), **record}))
    return Store(str(root)), run_id


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    p.kill()
    p.wait()             # reaped: the pid names no process now
    return p.pid


def test_a_killed_runs_record_gets_crashed_with_its_stage(tmp_path):
    store, run_id = _run(tmp_path, pid=_dead_pid(), stage={"name": "critique", "since": 1.5})
    entry = record_crash(store, run_id, read_record(store, run_id))
    saved = read_record(store, run_id)
    assert saved["crashed"] == entry and entry["stage"] == "critique" and entry["since"] == 1.5
    assert "ended without recording an end" in entry["how"]
    assert record_crash(store, run_id, saved) is None          # recorded once


def test_a_live_run_is_refused_and_an_ended_or_foreign_one_left_alone(tmp_path):
    store, run_id = _run(tmp_path / "a", pid=os.getpid())
    with pytest.raises(ValueError, match=f"run {run_id} is still running"):
        record_crash(store, run_id, read_record(store, run_id))
    store, run_id = _run(tmp_path / "b", pid=_dead_pid(), stopped={"signal": "SIGTERM"})
    assert record_crash(store, run_id, read_record(store, run_id)) is None
    store, run_id = _run(tmp_path / "c", pid=_dead_pid())
    (tmp_path / "c" / "runs" / run_id / "summary.json").write_text("{}")
    assert record_crash(store, run_id, read_record(store, run_id)) is None
    store, run_id = _run(tmp_path / "d", pid=_dead_pid())
    record = {**read_record(store, run_id), "host": "another-node"}
    assert record_crash(store, run_id, record) is None           # its process cannot be checked from here
    assert "crashed" not in read_record(store, run_id)


def test_a_run_prefect_marked_crashed_is_recorded_from_any_host(tmp_path):
    """A dead node: its process cannot be checked from here, but Prefect's zombie detection marked
    the flow run Crashed (`avr resume <flow-run UUID>` passes the state message)."""
    store, run_id = _run(tmp_path, pid=4242, stage={"name": "train_po", "since": 2.0})
    record = {**read_record(store, run_id), "host": "node-7"}
    entry = record_crash(store, run_id, record, prefect_crashed="no heartbeat for 60 s")
    assert entry["stage"] == "train_po"
    assert "Prefect marked its flow run Crashed: no heartbeat for 60 s" in entry["how"]
    assert read_record(store, run_id)["crashed"] == entry
    assert record_crash(Store(str(tmp_path / "none")), run_id, {}, prefect_crashed="x") is None   # no record
