"""The nightly deployment as users run it (issue 35, README "Deploy"): Prefect's server on PostgreSQL
(tests/conftest.py, scripts/postgres.sh), `avr deploy` onto a process work pool, and a real
`prefect worker` pulling the runs, as docker/compose.yaml arranges it.

1. A run submitted like the UI's form, a second one right behind it, and one fired by the nightly
   schedule (set to fire within the test) are all pulled by the worker and complete; the pool's
   limit (`schedule.max_runs: 1`) holds the second while the first runs; their artifacts are the
   ones the same flow computes in this process (a full cache hit) and each has its run record.
2. A worker killed with SIGKILL mid-stage (its whole process group: a lost node) leaves a run that
   Prefect itself marks Crashed (flow-run heartbeats + the zombie automation `avr deploy` creates),
   and `avr resume <flow-run id>` completes it, recomputing only shards that were not committed.

Each step prints its time (pytest -s shows them). The worker polls every 2 s instead of 10 and
the run's heartbeat is 30 s (`schedule.zombie_after_s=60`: the deployment sets a third, at least
30), so the test waits seconds where a night waits minutes.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow
CHEAP = ["respond.sampling.max_new_tokens=16", "critique.k=1", "critique.sampling.max_new_tokens=16", "refine.m=1",
         "refine.sampling.max_new_tokens=16", "data.stage1_sft=[0,2]", "shard_size=1"]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def avr(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "avr_cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def start_worker(env: dict, pool: str, log: Path, **extra: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
        return subprocess.Popen(cmd, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2", **extra}, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Api:
    """The few reads and writes the UI makes, through Prefect's client."""

    def __init__(self, url: str):
        self.url = url

    @contextlib.contextmanager
    def get_client(self, sync_client: bool = True):
        """A client of the test's server (this process's settings point elsewhere: Prefect's harness)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings
        with temporary_settings({PREFECT_API_URL: self.url}), get_client(sync_client=sync_client) as c:
            yield c

    def deployment(self, name: str):
        with self.get_client(sync_client=True) as c:
            return c.read_deployment_by_name(name)

    def submit(self, deployment_id, parameters: dict | None = None):
        with self.get_client(sync_client=True) as c:     # the UI's "Run" form posts the same request
            return c.create_flow_run_from_deployment(deployment_id, parameters=parameters).id

    def runs(self, deployment_id) -> list:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        with self.get_client(sync_client=True) as c:
            return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

    def state(self, run_id) -> str:
        with self.get_client(sync_client=True) as c:
            return c.read_flow_run(run_id).state.type.value

    def wait(self, run_id, states: set, bound_s: float, note: str) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < bound_s:          # a bound against hanging, not a timing check
            s = self.state(run_id)
            if s in states:
                print(f"  {note}: {s} after {time.monotonic() - t0:.0f} s", flush=True)
                return s
            time.sleep(1)
        raise AssertionError(f"{note}: still {self.state(run_id)} after {bound_s} s")


def test_a_worker_runs_submitted_and_scheduled_runs_one_at_a_time(deploy_server, tmp_path):
    env = {**deploy_server["env"], "AVR_STORE": str(tmp_path / "store")}
    pool, api = "avr-worker-test", Api(deploy_server["url"])
    t0 = time.monotonic()
    # the nightly schedule, set to fire within the test: every minute, on the synthesis deployment
    avr(env, "deploy", "--preset", "tiny", "--pool", pool, f"store.root={tmp_path / 'store'}", *CHEAP,
        "schedule.active=true", "schedule.cron='* * * * *'", "schedule.flow=synthesis")
    dep = api.deployment("avr-synthesis-run/avr-synthesis-run-tiny")
    assert dep.work_pool_name == pool
    worker = start_worker(env, pool, tmp_path / "worker.log")
    try:
        first = api.submit(dep.id)
        second = api.submit(dep.id)
        print(f"deployed and submitted two runs in {time.monotonic() - t0:.0f} s", flush=True)
        both_running = 0
        while api.state(first) not in FINAL:             # the pool's limit: never two at once
            both_running += api.state(first) == "RUNNING" and api.state(second) == "RUNNING"
            time.sleep(1)
        api.wait(first, {"COMPLETED"}, 1, "the first run")
        assert both_running == 0
        api.wait(second, {"COMPLETED"}, 600, "the second run (it waited for the first)")
        t1, scheduled = time.monotonic(), []
        while not scheduled and time.monotonic() - t1 < 180:   # the next minute's run, once Prefect schedules it
            scheduled = sorted((r for r in api.runs(dep.id) if r.auto_scheduled), key=lambda r: r.expected_start_time)
            time.sleep(2)
        assert scheduled, "the schedule created no run in 3 minutes"
        api.wait(scheduled[0].id, {"COMPLETED"}, 300, "the first scheduled run")
    finally:
        stop(worker)
    # the same flow in this process finds every stage in the store: the worker computed what avr computes
    from flows.deploy import synthesis_run
    from flows.params import RunParams
    from tasks.runtime.ledger import STAGE_LOG
    synthesis_run.fn(RunParams(preset="tiny", overrides=[f"store.root={tmp_path / 'store'}", *CHEAP]))
    assert STAGE_LOG and all(r["cached"] for r in STAGE_LOG), STAGE_LOG   # a run's table starts empty
    records = [json.loads(p.read_text()) for p in (tmp_path / "store" / "runs").glob("*/run.json")]
    flow_runs = {str(r.get("flow_run_id")) for r in records}
    assert {str(first), str(second), str(scheduled[0].id)} <= flow_runs, records


def test_a_killed_worker_leaves_a_crashed_run_that_resumes(deploy_server, tmp_path):
    env = {**deploy_server["env"], "AVR_STORE": str(tmp_path / "store")}
    pool, api = "avr-crash-test", Api(deploy_server["url"])
    store = tmp_path / "store"
    avr(env, "deploy", "--preset", "tiny", "--pool", pool, f"store.root={store}", *CHEAP,
        "data.stage1_sft=[0,4]", "schedule.zombie_after_s=60")
    dep = api.deployment("avr-synthesis-run/avr-synthesis-run-tiny")
    worker = start_worker(env, pool, tmp_path / "worker.log")   # the deployment sets the heartbeat: 30 s
    run = api.submit(dep.id)
    try:
        t0 = time.monotonic()
        while not list(store.glob("critique/*/shards/*.json")):   # a stage with a committed shard
            assert api.state(run) not in FINAL and time.monotonic() - t0 < 600, api.state(run)
            time.sleep(0.5)
        print(f"  a critique shard committed after {time.monotonic() - t0:.0f} s: SIGKILL the worker", flush=True)
    finally:
        stop(worker, signal.SIGKILL)                   # the worker and the run it started: a lost node
    t_kill = time.monotonic()
    assert api.state(run) == "RUNNING"
    api.wait(run, {"CRASHED"}, 300, "marked Crashed by the zombie automation")
    assert time.monotonic() - t_kill < 300
    r = avr(env, "resume", str(run))
    print(f"  resumed in {time.monotonic() - t_kill:.0f} s after the kill", flush=True)
    assert "already committed" in r.stdout + r.stderr
    records = {p.parent.name: json.loads(p.read_text()) for p in (store / "runs").glob("*/run.json")}
    [crashed] = [i for i, rec in records.items() if rec.get("flow_run_id") == str(run)]
    assert [rec["resumes"] for rec in records.values() if rec.get("resumes")] == [crashed]   # whom it resumed
    entry = records[crashed]["crashed"]                  # the killed run's record says so, and where it was
    assert entry["stage"] in ("critique", "refine") and "Prefect marked its flow run Crashed" in entry["how"], entry
    assert UUID(str(run))
