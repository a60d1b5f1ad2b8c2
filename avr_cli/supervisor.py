"""`avr run` and `avr resume` stop promptly on SIGTERM or Ctrl-C (issue #23, docs/RELIABILITY.md
"Stopping a run").

The run itself happens in a worker process, in a session of its own; `avr` stays behind as a
small supervisor that only waits. Why: Prefect's temporary API server (when PREFECT_API_URL is
unset) is a child in the caller's process group, so a terminal's Ctrl-C, `timeout` or a group kill
stopped it together with the run, and the run then spent minutes retrying to report its crash to
a server that was gone. Now a group signal reaches only the supervisor, which

1. sends the worker SIGTERM: Prefect marks the flow runs Crashed on its server, still up, in a
   second or two, and the worker ends its own process group (the temporary server, training
   subprocesses, vLLM engine cores);
2. waits for that at most GRACE_S, and not at all once the run's API server stops answering;
3. ends every process the run started, whatever its session (each carries the run's token in its
   environment), prints one line saying how to resume (`avr resume <run id>`), and exits
   128 + the signal (130, 143).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

TOKEN_ENV = "AVR_RUN_TOKEN"   # "<supervisor pid>:<random hex>", set in the worker and inherited by its children
GRACE_S = 20.0                # for the worker to record the crash; the sweep adds at most SWEEP_S: under 30 s
SWEEP_S = 3.0


def is_worker() -> bool:
    return TOKEN_ENV in os.environ


def supervise(argv: list[str]) -> int:
    """Run `avr <argv>` as the worker and wait; on SIGTERM/SIGINT stop it as described above."""
    token = f"{os.getpid()}:{uuid.uuid4().hex}"
    got: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda sig, _frame: got.append(sig))
    worker = subprocess.Popen([sys.executable, "-m", "avr_cli", *argv], env={**os.environ, TOKEN_ENV: token},
                              start_new_session=True)
    try:
        while worker.poll() is None and not got:
            time.sleep(0.2)
        if not got:                                   # the run ended by itself: its exit status
            return worker.returncode if worker.returncode >= 0 else 128 - worker.returncode
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        # a second Ctrl-C, or a server that is gone (the run cannot be recorded there), ends the wait
        while worker.poll() is None and time.monotonic() < deadline and len(got) == 1 and _api_up(token):
            time.sleep(0.2)
        if worker.poll() is None:   # past its grace, or its server is gone: no more retries, no more output
            worker.kill()
        _sweep(token, worker.pid)
        worker.wait()
        run = _info(token)
        name = signal.Signals(got[0]).name
        if run.get("resume"):
            print(f"avr: stopped by {name}; finished stages are kept: resume with `{run['resume']}` "
                  f"(Prefect flow run {run.get('flow_run_id')})", file=sys.stderr, flush=True)
        else:
            print(f"avr: stopped by {name} before the run started", file=sys.stderr, flush=True)
        return 128 + got[0]
    finally:
        _info_path(token).unlink(missing_ok=True)


@contextlib.contextmanager
def worker():
    """The worker's side, around the flow call. While a flow runs, Prefect's own SIGTERM handler
    records the crash of every flow run inside the outermost one, then hands the signal back to
    the handler installed before it: this one, which raises it on so that the outermost flow run
    is recorded Crashed too. Then the worker ends its process group and exits 143."""
    from prefect.exceptions import TerminationSignal

    if sys.platform == "linux":
        # die with the supervisor even if it is SIGKILLed: in its own session no group kill reaches us
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG
        if str(os.getppid()) != os.environ[TOKEN_ENV].partition(":")[0]:
            _end_worker(signal.SIGTERM)                # it died before the line above

    def on_sigterm(sig, _frame):
        raise TerminationSignal(signal=sig)
    signal.signal(signal.SIGTERM, on_sigterm)
    previous, sys.unraisablehook = sys.unraisablehook, lambda u: redeliver_signal(u, previous)
    try:
        yield
    except TerminationSignal as e:
        _end_worker(e.signal)
    finally:
        sys.unraisablehook = previous


def redeliver_signal(unraisable, fallback) -> None:
    """`sys.unraisablehook` for the worker. A SIGTERM that lands while a finalizer (`__del__`) runs
    raises TerminationSignal there, where Python swallows it and prints "Exception ignored in ..."
    with a traceback; the run then went on until the supervisor killed it (CI, 7 December 2026).
    Send the signal again, shortly, from another thread: raised here, its handler would run inside
    this hook and be swallowed too; 0.1 s later the main thread is in ordinary code (or in another
    finalizer, and this hook sends it again). Anything else goes to `fallback`, the hook before."""
    import threading

    from prefect.exceptions import TerminationSignal

    if isinstance(unraisable.exc_value, TerminationSignal):
        again = threading.Timer(0.1, os.kill, (os.getpid(), unraisable.exc_value.signal))
        again.daemon = True
        again.start()
    else:
        fallback(unraisable)


def _end_worker(sig: int) -> None:
    # The rest of this process group ends with the worker: the temporary Prefect server, training
    # subprocesses, vLLM engine cores. os._exit: atexit would wait on Prefect's log and event
    # workers, which retry against the server just stopped.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.killpg(os.getpgid(0), signal.SIGTERM)
    os._exit(128 + sig)


def record_run(flow_run_id: str | None, resume: str) -> None:
    """Called as a run starts (run_records/lifecycle.py start_run, through the launch that
    avr_cli/run.py `run_flow` opens): tell the supervisor, if any, the resume command and flow run
    id (for the stop line) and the API the run reports to (whether waiting on it makes sense)."""
    if not is_worker():
        return
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    api = str(ctx.client.api_url) if ctx else ""
    info = {"flow_run_id": str(flow_run_id) if flow_run_id else None, "resume": resume, "api_url": api}
    _info_path(os.environ[TOKEN_ENV]).write_text(json.dumps(info))


def _info_path(token: str) -> Path:
    return Path(tempfile.gettempdir()) / f"avr-run-{token.replace(':', '-')}.json"


def _info(token: str) -> dict:
    try:
        return json.loads(_info_path(token).read_text())
    except (OSError, ValueError):
        return {}


def _api_up(token: str) -> bool:
    """Does the run's API server still accept connections? (Unknown yet: assume so.)"""
    url = urlsplit(_info(token).get("api_url") or "")
    if not url.hostname:
        return True
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 0.5):
            return True
    except OSError:
        return False


def _tagged(token: str) -> list[int]:
    """Processes whose environment carries the run's token: the worker and everything it started,
    in any session or process group, reparented or not (Linux /proc; elsewhere none found)."""
    mark, pids = f"{TOKEN_ENV}={token}".encode(), []
    with contextlib.suppress(OSError):
        for d in os.listdir("/proc"):
            with contextlib.suppress(OSError):
                if d.isdigit() and mark in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                    pids.append(int(d))
    return pids


def _sweep(token: str, worker_pid: int) -> None:
    """SIGTERM (a vLLM engine or a training process may end cleanly), then SIGKILL after SWEEP_S,
    to every process of the run still alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(OSError):
            os.killpg(worker_pid, sig)                # the worker's group, also where /proc is missing
        for pid in _tagged(token):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + SWEEP_S
        while time.monotonic() < deadline and _tagged(token):
            time.sleep(0.1)
        if not _tagged(token):
            return
