"""The Monday-morning look at a nightly run (issue 37): a run of the pipeline deployment started as
the schedule starts one (the deployment's own parameters), on a store where an earlier run computed
everything, so every stage is a cache hit. Opened in headless Chromium, as a user would:

1. the run's page: Completed, and its flow-run name is the avr run id;
2. its test-time-scaling subflow's Artifacts: the curve's plot in `tts-curve-report` renders (a
   data: PNG), the run's only report of that stage;
3. its synthesis subflow's Artifacts: the `select` counts table, marked "from cache: computed by
   run <the earlier run>".

Real: `avr server` on PostgreSQL, `avr serve --preset tiny` in its own process (no fakes there: a
stage that missed the cache would try to compute with the tiny random model and the run would show
it), the store, the UI. Scripted: the earlier, computing run's generator and scorer, as in
tests/system/test_e2e_pipeline_s3.py (the test is about what the UI shows, not the models).
"""
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.system.test_e2e_pipeline import SMALL
from tests.system.test_e2e_pipeline_s3 import scripted  # noqa: F401 (a fixture)
from tests.system.ui.test_ui import CHROMIUM, ROOT, SHOTS, _need, shot, stop_serve

pytestmark = pytest.mark.slow


@pytest.fixture
def browser_page():
    _need(os.path.exists(CHROMIUM), f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install -e '.[dev]')")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        try:
            yield page
        finally:
            browser.close()


@pytest.mark.usefixtures("scripted")
def test_a_cached_nightly_run_shows_its_stages_and_the_tts_curve(deploy_server, browser_page, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline
    from tests.tiny_models import tiny_llama

    model = tiny_llama(str(tmp_path / "tiny-llama"))
    store = tmp_path / "store"
    overrides = [f"store.root={store}", *SMALL, f"policy.path={model}", f"eval.judge.local_model={model}"]
    api = deploy_server["url"]
    with temporary_settings({PREFECT_API_URL: api}):
        first = pipeline({"preset": "tiny", "overrides": overrides})       # the run that computes everything

    log = tmp_path / "serve.log"
    env = {**deploy_server["env"], "AVR_RETRY_DELAY_S": "0"}
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "avr_cli", "serve", "--preset", "tiny", *overrides], cwd=ROOT,
                                 env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _registered(api, "avr-pipeline/avr-tiny", overrides, serve, log)
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("avr-pipeline/avr-tiny")
            run = client.create_flow_run_from_deployment(deployment.id)   # as the scheduler does: its defaults
            run = _finished(client, run.id, serve, log)
            assert run.state.type.value == "COMPLETED", log.read_text(errors="replace")[-3000:]
            subflows = _descendants(client, run.id)
    finally:
        stop_serve(serve)

    summary = json.loads((store / "runs" / run.name / "summary.json").read_text())   # named with its avr run id
    assert summary["stages"] and all(s["cached"] for s in summary["stages"]), summary["stages"]
    # what the UI will show, read from the API first, so a failure below is about rendering only:
    # one report per stage on the run, the curve's plot in it (a second `tts-curve-report` on the
    # same run, a plot published beside the stage's pair, once made the UI show either; CI, 7 December 2026)
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        [curve] = _artifacts(client, subflows["avr-test-time-scaling"], "tts-curve-report")
        assert "data:image/png;base64," in curve.data and "from cache: computed by run" in curve.data

    page, base = browser_page, deploy_server["url"].removesuffix("/api")
    try:
        page.goto(f"{base}/runs/flow-run/{run.id}")
        page.get_by_text(run.name, exact=True).first.wait_for()
        page.locator(".state-badge", has_text="Completed").first.wait_for()

        _open_artifact(page, base, subflows["avr-test-time-scaling"], "tts-curve-report")
        img = page.locator("img[src^='data:image/png;base64,']").first
        img.wait_for()
        assert img.evaluate("i => i.complete && i.naturalWidth > 0")          # decoded, not a broken image
        shot(page, "ui-nightly-tts-curve")

        _open_artifact(page, base, subflows["avr-synthesis"], "select")
        table = page.locator("table").first
        table.wait_for()
        text = table.inner_text()
        assert f"from cache: computed by run {first['id']}" in text and "rows:" in text, text[:2000]
        shot(page, "ui-nightly-cached-stage")
    except Exception:
        shot(page, "ui-nightly-failed")          # what the browser showed, beside the failure
        raise


def _artifacts(client, flow_run_id: str, key: str) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    return client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _registered(api: str, name: str, overrides: list[str], serve, log) -> None:
    """Wait until this `avr serve` has registered `name` with these overrides."""
    flow, _, dep = name.partition("/")
    for _ in range(480):
        r = httpx.get(f"{api}/deployments/name/{flow}/{dep}", timeout=5)
        if r.status_code == 200 and r.json()["parameters"]["params"]["overrides"] == overrides:
            return
        assert serve.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"avr serve did not register {name}: {log.read_text(errors='replace')[-3000:]}")


def _finished(client, run_id, serve, log, timeout_s: float = 900):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert serve.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(3)
    raise AssertionError(f"the deployment run did not finish in {timeout_s:.0f} s: "
                         f"{log.read_text(errors='replace')[-3000:]}")


def _descendants(client, run_id) -> dict[str, str]:
    """{flow name: flow-run id} of every subflow under the run (one of each name is enough here)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found, todo = {}, [run_id]
    while todo:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[todo.pop()])))
        for c in children:
            found.setdefault(client.read_flow(c.flow_id).name, str(c.id))
            todo.append(c.id)
    return found


def _open_artifact(page, base: str, flow_run_id: str, key: str) -> None:
    """A subflow run's page -> its Artifacts tab -> the artifact `key`."""
    page.goto(f"{base}/runs/flow-run/{flow_run_id}")
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text(key, exact=True).first.click()
