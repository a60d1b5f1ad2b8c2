"""Deployments against a REAL Prefect server (`avr server` on PostgreSQL, as deployed; the registration
test also on Prefect's embedded SQLite): `avr serve`'s deployments
register with their parameters (preset + overrides) and the nightly schedule from config; a bad
override is refused before anything is registered, naming the key."""
import json
import os
import subprocess
import sys

import pytest

from avr_core.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(params=["postgresql"])
def server(request):
    """A real `avr server` (tests/conftest.py), already answering: on PostgreSQL, the deployed
    arrangement, unless a test asks for Prefect's embedded SQLite too."""
    return request.getfixturevalue("deploy_server" if request.param == "postgresql" else "avr_server")


REGISTER = """
import json, sys
from prefect.client.orchestration import get_client
from flows.deploy import deployments
ids = [d.apply() for d in deployments("tiny", sys.argv[1:])]
with get_client(sync_client=True) as c:
    out = [c.read_deployment(i) for i in ids]
print(json.dumps([{"name": d.name, "parameters": d.parameters,
                   "schedules": [{"cron": s.schedule.cron, "tz": s.schedule.timezone, "active": s.active}
                                 for s in d.schedules]} for d in out]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("server", ["postgresql", "sqlite"], indirect=True)
def test_deployments_register_with_parameters_and_nightly_schedule(server):
    import json
    r = subprocess.run([sys.executable, "-c", REGISTER, "critique.k=3", "schedule.active=true",
                        "schedule.timezone=Europe/Berlin"], env=server["env"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    deps = {d["name"]: d for d in json.loads(r.stdout.strip().splitlines()[-1])}
    assert set(deps) == {"avr-tiny", "avr-synthesis-run-tiny", "avr-stage1-run-tiny", "avr-stage2-run-tiny",
                         "avr-evaluate-run-tiny"}
    assert deps["avr-tiny"]["parameters"]["params"] == {
        "preset": "tiny", "prompts": "", "policy": "", "store_root": "", "iterations": 0, "iterate_model": "preset",
        "continue_from": "preset",
        "overrides": ["critique.k=3", "schedule.active=true", "schedule.timezone=Europe/Berlin"]}
    assert deps["avr-tiny"]["schedules"] == [{"cron": "0 2 * * *", "tz": "Europe/Berlin", "active": True}]
    assert deps["avr-stage2-run-tiny"]["schedules"] == []


POOL = """
import json
from prefect.client.orchestration import get_client
from flows.deploy import deploy_to_pool
ids = deploy_to_pool("tiny", [], "avr-test-pool")
with get_client(sync_client=True) as c:
    print(json.dumps({"pool": c.read_work_pool("avr-test-pool").type,
                      "deps": [c.read_deployment(i).work_pool_name for i in ids],
                      "env": [c.read_deployment(i).job_variables["env"] for i in ids]}))
"""


@pytest.mark.slow
def test_deployments_on_a_work_pool_for_workers(server):
    import json
    r = subprocess.run([sys.executable, "-c", POOL], env=server["env"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # the runs beat three times per `schedule.zombie_after_s` (600 s), whatever the worker's machine says
    assert out == {"pool": "process", "deps": ["avr-test-pool"] * 5,
                   "env": [{"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "200"}] * 5}


def test_bad_override_is_refused_before_registering():
    from flows.deploy import deployments
    with pytest.raises(ConfigError, match="critique.kk"):
        deployments("tiny", ["critique.kk=3"])
    with pytest.raises(ConfigError, match="schedule.cron"):
        deployments("tiny", ["schedule.cron=every night"])


TRIGGER = """
import json, time
from prefect.deployments import run_deployment
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:          # wait for `avr serve` to have registered its deployments
    for _ in range(240):
        try:
            c.read_deployment_by_name("avr-pipeline/avr-tiny")
            break
        except Exception:
            time.sleep(0.5)
run = run_deployment("avr-pipeline/avr-tiny", parameters={"params": {"preset": "tiny", "overrides": ["critique.kk=3"]}},
                     timeout=240)
with get_client(sync_client=True) as c:
    logs = c.read_logs()
print(json.dumps({"state": run.state.type.value, "message": run.state.message,
                  "logs": [l.message for l in logs if "critique.kk" in l.message][:3]}))
"""


@pytest.mark.slow
def test_a_run_triggered_like_the_ui_validates_its_parameters_first(server, tmp_path):
    """`avr serve` executes runs created through the API (what the UI's Run button does); a bad
    override fails that run at once, naming the key, before any stage."""
    root = ROOT
    env = {**server["env"], "AVR_STORE": str(tmp_path / "store")}
    serve = subprocess.Popen([sys.executable, "-m", "avr_cli", "serve", "--preset", "tiny"], env=env, cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        r = subprocess.run([sys.executable, "-c", TRIGGER], env=env, capture_output=True, text=True, timeout=400,
                           cwd=root)
    finally:
        serve.terminate()
        serve.wait(timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["state"] == "FAILED" and "critique.kk" in (out["message"] + " ".join(out["logs"]))
    assert not (tmp_path / "store").exists()          # nothing was written
