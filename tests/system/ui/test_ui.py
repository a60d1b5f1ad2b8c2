"""The Prefect UI as a user clicks it, in headless Chromium (Debian's `chromium` package driven by
Playwright; no browser download): `avr server` on PostgreSQL + `avr serve --preset tiny`, then

1. open the synthesis deployment from the Deployments page and its run form;
2. fill the form: pick the preset in its dropdown, set the store root, add one override;
3. submit, open the run, wait until it is Completed;
4. open its Artifacts: the counts table and the wall-time plot (a data: PNG) render.

And a bad override (`critique.kk=3`) fails the run at once, the key named on the run's page.
Screenshots of every step land in tests/system/ui/screenshots/ (or $AVR_UI_SCREENSHOTS); the README's
docs/ui-form.png and docs/ui-artifacts.png are two of them. Slow (a real run of the tiny
synthesis on 2 prompts), so the fast lane (`-m 'not slow'`) skips it; `.ci/run` installs the
browser and sets AVR_UI_REQUIRED=1, so there a missing browser fails instead of skipping.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows.params import PRESETS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
SHOTS = Path(os.environ.get("AVR_UI_SCREENSHOTS") or ROOT / "tests" / "ui" / "screenshots")
CHROMIUM = os.environ.get("AVR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
DEPLOYMENT = "avr-synthesis-run-tiny"
SUBMITS = 20
QUICK = "data.stage1_sft=[0,2]"         # the one override the user adds: 2 prompts
# the deployments' own defaults (shown in the form's Overrides list): short answers, one critique,
# one refinement, so the tiny synthesis takes a minute or two on 2 busy cores
SERVE = ["respond.sampling.max_new_tokens=16", "critique.k=1", "critique.sampling.max_new_tokens=16", "refine.m=1",
         "refine.sampling.max_new_tokens=16"]


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("AVR_UI_REQUIRED") == "1":
            pytest.fail(f"UI test required (AVR_UI_REQUIRED=1) but {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser_ok():
    """Skip (or, with AVR_UI_REQUIRED=1, fail) before any server starts when there is no browser."""
    _need(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _need(False, "playwright is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def ui(browser_ok, request, tmp_path_factory):
    """`avr serve --preset tiny` against the session's `avr server` on PostgreSQL (as deployed; on
    SQLite a busy database answers the form's submit with 503), or on SQLite with
    AVR_UI_DATABASE=sqlite (the README's figure for the embedded default); yields the UI's base URL."""
    sqlite = os.environ.get("AVR_UI_DATABASE") == "sqlite"
    avr_server = request.getfixturevalue("avr_server" if sqlite else "avr_server_pg")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "avr_cli", "serve", "--preset", "tiny", *SERVE], cwd=ROOT,
                                 env={**avr_server["env"], "AVR_STORE": str(tmp_path_factory.mktemp("default-store"))},
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{avr_server['port']}"
    try:
        for _ in range(480):
            r = httpx.get(f"{base}/api/deployments/name/avr-synthesis-run/{DEPLOYMENT}", timeout=5)
            if r.status_code == 200 and r.json()["parameters"]["params"]["overrides"] == SERVE:
                break                      # registered by this `avr serve`, not one a test before left
            assert serve.poll() is None, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        else:
            raise RuntimeError(f"avr serve did not register {DEPLOYMENT}: {log.read_text(errors='replace')[-3000:]}")
        yield {"base": base, "log": log}
    finally:
        stop_serve(serve)


def stop_serve(serve: subprocess.Popen) -> None:
    """SIGTERM to `avr serve`'s process group (its runs too); SIGKILL if it is not gone in 30 s."""
    os.killpg(serve.pid, signal.SIGTERM)
    try:
        serve.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait()


@pytest.fixture
def page(ui):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 2200})   # the whole form in one screenshot
        pg.set_default_timeout(60_000)
        # what the UI's own API calls got back: a failed submit ("Oops. Something went wrong.")
        # names its request, status and body in the test's failure, not only in a screenshot
        pg.failed_api = []
        pg.on("response", lambda r: "/api/" in r.url and r.status >= 400 and pg.failed_api.append(
            f"{r.request.method} {r.url} -> {r.status} {_body(r)[:500]}"))
        pg.on("requestfailed", lambda r: "/api/" in r.url and pg.failed_api.append(
            f"{r.method} {r.url} -> failed: {r.failure}"))
        try:
            yield pg
        finally:
            browser.close()


def _body(response) -> str:
    try:
        return response.text()
    except Exception as e:          # a body already gone: say so instead
        return f"(no body: {e})"


def shot(page, name: str, full: bool = True) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full)
    return path


def field(page, label: str):
    """The form field whose label is `label` (the schema form prints "(Optional)" after it)."""
    return page.locator(".schema-form-property",
                        has=page.locator(".schema-form-property__label", has_text=f"{label} (Optional)")).last


def open_form(page, base: str) -> None:
    """Deployments -> the synthesis deployment -> Run -> Custom run: the typed form."""
    page.goto(f"{base}/deployments")
    page.get_by_role("link", name=DEPLOYMENT).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.get_by_text("Store root (Optional)").wait_for()


def fill_form(page, store_root: str, override: str) -> None:
    preset = field(page, "Preset").locator("button.p-select-button__control")
    preset.focus()
    page.keyboard.press("ArrowDown")                                    # the dropdown of shipped presets
    options = page.locator(".p-select-option")
    options.filter(has_text="paper").wait_for()
    assert options.all_inner_texts() == list(PRESETS) and "tiny" in PRESETS    # every shipped preset
    options.filter(has_text="tiny").click()
    field(page, "Store root").locator("textarea").fill(store_root)
    items = field(page, "Overrides").locator("input, textarea")
    n = items.count()                                                   # the deployment's own overrides
    field(page, "Overrides").get_by_role("button", name="Add item").click()
    for _ in range(40):                                                 # the new, empty item has rendered
        if items.count() == n + 1 and not items.nth(n).input_value():
            break
        page.wait_for_timeout(250)
    for _ in range(5):                                                  # typed into the item, not lost to a re-render
        items.nth(n).fill(override)
        page.wait_for_timeout(300)
        if items.nth(n).input_value() == override:
            break
    assert items.nth(n).input_value() == override


def submit_and_open_run(page) -> str:
    """Submit, then open the new run from the deployment's Runs list by the name the form gave it."""
    name = page.locator(".p-label", has=page.get_by_text("Run Name", exact=True)).locator("input").first.input_value()
    assert name                                                         # the form's "Run Name"
    page.get_by_role("button", name="Submit").click()
    try:
        page.wait_for_url("**/deployments/deployment/**tab=Runs**", wait_until="commit")
        page.get_by_role("link", name=name, exact=True).first.click()
    except Exception as e:
        shot(page, "submit-failed")
        raise AssertionError(f"the submit did not open the deployment's runs; the UI's failed API calls: "
                             f"{page.failed_api or 'none'}") from e
    page.wait_for_url("**/runs/flow-run/**")
    page.get_by_text(name, exact=True).first.wait_for()                 # this run's page, not an earlier run's
    return name


def wait_for_state(page, states: tuple[str, ...], timeout_s: float) -> str:
    """Reload the run page until its state badge shows one of `states` (what a user watches)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        page.reload()                          # a fresh run page: no badge of the list we came from
        page.wait_for_load_state("networkidle")
        page.get_by_text("Artifacts", exact=True).first.wait_for()         # the run page's tabs have rendered
        for s in states:
            if page.locator(".state-badge", has_text=s).first.is_visible():
                return s
        time.sleep(5)
    shot(page, "timeout")
    raise AssertionError(f"the run did not reach {states} in {timeout_s:.0f} s")


def test_a_user_runs_the_synthesis_deployment_from_its_form_and_reads_its_artifacts(ui, page, tmp_path):
    open_form(page, ui["base"])
    for text in ("Preset (Optional)", "Prompt file (Optional)", "Policy model path (Optional)", "Iterations (Optional)",
                 "Continue from (Optional)", "the artifact store"):            # typed fields, each described
        assert page.get_by_text(text).first.is_visible(), text
    fill_form(page, str(tmp_path / "store"), QUICK)
    shot(page, "ui-form")
    submit_and_open_run(page)
    assert wait_for_state(page, ("Completed", "Failed", "Crashed"), 1200) == "Completed", \
        ui["log"].read_text(errors="replace")[-3000:]
    assert (tmp_path / "store" / "select").is_dir()                      # the form's store root was used

    run_page = page.url
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("avr-run-outputs", exact=True).first.wait_for()
    shot(page, "ui-artifacts-list")
    page.get_by_text("avr-run-outputs", exact=True).first.click()          # the counts table
    table = page.locator("table").first
    table.wait_for()
    text = table.inner_text()
    assert "input_records" in text and "rows:" in text, text[:2000]
    shot(page, "ui-counts")
    page.goto(run_page)
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("avr-run-timings-report", exact=True).first.click()  # the wall-time plot (markdown + PNG)
    img = page.locator("img[src^='data:image/png;base64,']").first
    img.wait_for()
    assert img.evaluate("i => i.complete && i.naturalWidth > 0")          # decoded, not a broken image
    shot(page, "ui-artifacts")


def test_a_bad_override_fails_the_run_at_once_naming_the_key(ui, page, tmp_path):
    open_form(page, ui["base"])
    fill_form(page, str(tmp_path / "store"), "critique.kk=3")
    t0 = time.time()
    submit_and_open_run(page)
    assert wait_for_state(page, ("Failed", "Completed", "Crashed"), 300) == "Failed"
    assert time.time() - t0 < 240                                         # at once: no stage ran
    page.get_by_text("critique.kk").first.wait_for()                     # the key, on the run's page
    shot(page, "ui-bad-override")
    assert not (tmp_path / "store").exists()                             # nothing was written


def test_the_form_holds_under_load(ui, page, tmp_path):
    """Issue 35: the form submitted 20 times in a row while the first run computes (`avr serve` runs
    one at a time, `schedule.max_runs`; the others queue): every submit creates its run and no API
    call of the UI fails. README "Deploy" gives the figure for SQLite."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    store, t0 = str(tmp_path / "store"), time.time()
    for _ in range(SUBMITS):
        open_form(page, ui["base"])
        fill_form(page, store, QUICK)
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url("**/deployments/deployment/**tab=Runs**", wait_until="commit")
    # requests the browser itself cancels when the test navigates to the next form are not failures
    failed = [f for f in page.failed_api if not f.endswith("net::ERR_ABORTED")]
    print(f"{SUBMITS} submits in {time.time() - t0:.0f} s; failed API calls: {len(failed)}", flush=True)
    assert failed == []
    with temporary_settings({PREFECT_API_URL: f"{ui['base']}/api"}), get_client(sync_client=True) as c:
        runs = c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT])))
    assert sum(r.parameters["params"].get("store_root") == store for r in runs) == SUBMITS
    assert sum(r.state.type.value == "RUNNING" for r in runs) <= 1              # one at a time
