"""Stopping is prompt (issue #23): SIGTERM or Ctrl-C ends a real `avr run` mid-stage within 30 s,
with one line saying how to resume, no tracebacks, no process of the run left behind, and the
flow run recorded Crashed on a server that outlives it (avr_cli/supervisor.py)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.system, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]


def _marked(mark: str) -> list[str]:
    """Command lines of the processes that inherited the test's mark: `avr`, its worker and
    everything they started, whatever their session or parent now."""
    found = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and mark.encode() in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                found.append(Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160])
        except OSError:
            pass
    return found


def _stop_mid_stage(tmp_path, env: dict, sig: int, group: bool) -> tuple[int, float, str]:
    """Start `avr run --preset tiny`, wait until its first sampling stage (respond) is running, send
    `sig` to `avr` alone or to its process group (a terminal's Ctrl-C); the exit status, the seconds
    from the signal to the exit, and the output after the signal."""
    token = uuid.uuid4().hex
    mark = f"AVR_STOP_TEST={token}"
    log = tmp_path / "avr.log"
    with open(log, "wb") as out:   # own session: a group signal reaches this run only, not pytest
        proc = subprocess.Popen([sys.executable, "-m", "avr_cli", "run", "--preset", "tiny",
                                 f"store.root={tmp_path / 'store'}"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**env, "AVR_STOP_TEST": token}, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "store" / ".locks").glob("respond.*.lock")):   # the stage holds its lock
            assert proc.poll() is None, f"avr run ended before its first stage:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no stage running after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        time.sleep(1)
        assert _marked(mark), "the mark is not inherited: the leftover check below would see nothing"
        before = len(log.read_text(errors="replace"))
        t0 = time.monotonic()
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
        assert _marked(mark) == [], "processes of the run left behind"
        return rc, took, log.read_text(errors="replace")[before:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _resume_id(after: str, name: str) -> str:
    """The Prefect flow-run id of the stop line, which names `avr resume <run id> --store ...`."""
    m = re.search(rf"avr: stopped by {name}; .*resume with `avr resume \d{{8}}-\d{{6}}-[0-9a-f]{{6}} --store \S+` "
                  rf"\(Prefect flow run ([0-9a-f-]{{36}})\)", after)
    assert m, after[-3000:]
    assert "Traceback" not in after and "Connection refused" not in after, after[-3000:]
    assert len(after.splitlines()) < 40, after[-3000:]   # a few "Crash detected" lines and the resume line
    return m.group(1)


def test_sigterm_to_avr_ends_it_promptly_and_the_server_records_the_run_crashed(tmp_path, avr_server):
    rc, took, after = _stop_mid_stage(tmp_path, avr_server["env"], signal.SIGTERM, group=False)
    assert rc == 143 and took < 30, (rc, took, after[-3000:])
    flow_run_id = _resume_id(after, "SIGTERM")
    state = httpx.get(f"{avr_server['url']}/flow_runs/{flow_run_id}", timeout=10).json()["state"]["type"]
    assert state == "CRASHED"                      # `avr resume` reads its parameters from here
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "store" / "runs").glob("*/run.json")]
    assert record["stopped"]["signal"] == "SIGTERM" and record["stopped"]["stage"] == "respond", record


def test_ctrl_c_to_the_process_group_ends_it_promptly_with_the_temporary_server(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)               # Prefect's temporary server: it gets the Ctrl-C too
    rc, took, after = _stop_mid_stage(tmp_path, env, signal.SIGINT, group=True)
    assert rc == 130 and took < 30, (rc, took, after[-3000:])
    _resume_id(after, "SIGINT")
