import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect task retries without their production delay (read when tasks.common is first imported)
os.environ.setdefault("AVR_RETRY_DELAY_S", "0")


# The system lane: end-to-end checks that each take minutes because they start real servers, a
# browser, vLLM engines, Ray or several DeepSpeed processes, or run whole pipelines. They are not
# part of the everyday full suite (`pytest`, deselected by addopts in pyproject.toml) and run as
# `pytest -m system`; CI runs both. Listed here, by file, so the lane is visible in one place.
SYSTEM_TESTS = (
    "tests/test_chaos.py", "tests/test_e2e_pipeline.py", "tests/test_e2e_pipeline_s3.py",
    "tests/backends/test_vllm_cpu.py", "tests/backends/test_vllm_rm.py",
    "tests/backends/test_vllm_judge.py", "tests/backends/test_vllm_reload.py",
    "tests/ui/", "tests/flows/test_scale_out.py", "tests/flows/test_deployments.py",
    "tests/training/test_multirank.py", "tests/training/test_multinode.py", "tests/training/test_launcher.py",
    "tests/training/test_smollm2.py", "tests/training/test_kill_resume.py",
)


def pytest_collection_modifyitems(config, items):
    root = str(config.rootpath)
    for item in items:
        rel = str(item.path)[len(root) + 1:]
        if rel.startswith(SYSTEM_TESTS):
            item.add_marker(pytest.mark.system)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's test harness (a throwaway database) plus throwaway result storage: the
    harness alone still writes cache records under ~/.prefect/storage (docs/ENVIRONMENT.md "Prefect")."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(tmp_path_factory.mktemp("prefect-results"))}):
        with prefect_test_harness(server_startup_timeout=120):
            yield



@pytest.fixture(scope="session")
def avr_server(tmp_path_factory):
    """ONE real `avr server` (its own PREFECT_HOME, port and process group) for the whole session,
    answering /health before it is handed out: the deployment tests register against it, the
    security tests check what it listens on. Yields {"proc", "port", "url", "env"}; `env` points
    PREFECT_API_URL at it."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    from avr_core.backends.net import free_port

    port, home = free_port(), tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env.pop("AVR_SERVER_HOST", None)
    log = home / "server.log"              # a file, not a pipe: a session's worth of output never blocks it
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port)], env=env,
                                cwd=Path(__file__).resolve().parents[1], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(480):               # 0.5 s apart: a bound against hanging, not a performance check
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"avr server exited: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"avr server did not answer /health: {log.read_text(errors='replace')[-2000:]}")
        yield {"proc": proc, "port": port, "url": url, "env": {**env, "PREFECT_API_URL": url}, "log": log}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)    # its own process group: the uvicorn child too
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
