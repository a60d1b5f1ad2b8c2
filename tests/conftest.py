import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect task retries without their production delay (read when tasks.runtime is first imported)
os.environ.setdefault("AVR_RETRY_DELAY_S", "0")


# The system lane is the directory tests/system/: end-to-end checks that each take minutes because
# they start real servers, a browser, vLLM engines, Ray or several DeepSpeed processes, or run whole
# pipelines. They are not part of the everyday full suite (`pytest`, deselected by addopts in
# pyproject.toml) and run as `pytest -m system`; CI runs both.
SYSTEM = ROOT / "tests" / "system"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SYSTEM in Path(item.path).parents:
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



def _avr_server(tmp_path_factory, database_url: str | None):
    """A real `avr server` (its own PREFECT_HOME, port and process group) on SQLite (database_url
    None: Prefect's embedded default) or on the given database, answering /health before it is
    handed out. Yields {"proc", "port", "url", "env", "log", "database"}; `env` points
    PREFECT_API_URL at it."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from avr_core.backends.net import free_port

    port, home = free_port(), tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for k in ("PREFECT_API_URL", "AVR_SERVER_HOST", "PREFECT_API_DATABASE_CONNECTION_URL"):
        env.pop(k, None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log = home / "server.log"              # a file, not a pipe: a session's worth of output never blocks it
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "avr_cli", "server", "--port", str(port)], env=env,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
        yield {"proc": proc, "port": port, "url": url, "env": {**env, "PREFECT_API_URL": url}, "log": log,
               "database": "postgresql" if database_url else "sqlite"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)    # its own process group: the uvicorn child too
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def avr_server(tmp_path_factory):
    """ONE `avr server` on Prefect's embedded default database, SQLite, for the whole session: the
    security tests check what it listens on, the stop-signal tests record runs on it."""
    yield from _avr_server(tmp_path_factory, None)


@pytest.fixture(scope="session")
def postgres():
    """ONE PostgreSQL server for the session, started by scripts/postgres.sh (the README's "Deploy"
    path); yields its Prefect connection URL. Skips where Debian's server is not installed, or
    fails with AVR_PG_REQUIRED=1 (CI installs it)."""
    import shutil
    import subprocess
    import tempfile

    from avr_core.backends.net import free_port

    # not under pytest's 0700 tmp dirs: as root, the cluster belongs to the `postgres` user
    d = tempfile.mkdtemp(prefix="avr-pg-")
    script = str(ROOT / "scripts" / "postgres.sh")
    r = subprocess.run(["bash", script, "start", d, str(free_port())], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        if r.returncode == 2 and os.environ.get("AVR_PG_REQUIRED") != "1":
            pytest.skip(r.stderr.strip())
        raise RuntimeError(f"scripts/postgres.sh start failed: {r.stderr[-2000:]}")
    try:
        yield r.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", script, "stop", d], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def avr_server_pg(tmp_path_factory, postgres):
    """ONE `avr server` on PostgreSQL for the session, the arrangement docker/compose.yaml deploys:
    the deployment, worker and UI tests run against it (on SQLite, Prefect answers a busy database
    with 503 and the UI's form submit fails under load; issue 35)."""
    yield from _avr_server(tmp_path_factory, postgres)


@pytest.fixture
def deploy_server(avr_server_pg):
    """The session's PostgreSQL `avr server` for a test that registers deployments, left as found:
    afterwards its deployments (with their scheduled runs), work pools and automations are deleted.
    Tests share the server and the deployment names (`avr-synthesis-run-tiny`); without this the
    UI test once ran a deployment a worker test had left, with that test's store and a 60 s zombie
    automation (CI, 7 December 2026)."""
    yield avr_server_pg
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: avr_server_pg["url"]}), get_client(sync_client=True) as c:
        for d in c.read_deployments():
            c.delete_deployment(d.id)
        for p in c.read_work_pools():
            if not p.name.startswith("default"):
                c.delete_work_pool(p.name)
        for a in c.read_automations():
            c.delete_automation(a.id)


@pytest.fixture(autouse=True)
def _no_run_in_progress():
    """Each test starts outside any avr run: a run a test started and left failed must not name
    itself in, or take notes of, the next test's stages (tasks/runtime/ledger.py RUN)."""
    from tasks.runtime.ledger import RUN

    RUN.update(id=None, on_compute=None)
    yield
    RUN.update(id=None, on_compute=None)
