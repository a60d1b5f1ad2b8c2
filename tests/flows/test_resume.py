"""Resume, against the real (temporary) Prefect API of the test harness, on fake backends
(control flow only): a run that fails in a late stage is resumed by its flow-run id; earlier
stages do no work and the final artifact is byte-identical to the one an uninterrupted run
makes. (A failure in the middle of a sharded stage: tests/flows/test_stage1_flow.py.)"""
import os

import pytest

os.environ["AVR_RETRY_DELAY_S"] = "0"

import tasks.synthesis as t  # noqa: E402
from avr_core.store import Store  # noqa: E402
from flows.deploy import resume, synthesis_run  # noqa: E402
from tasks.runtime.ledger import STAGE_LOG  # noqa: E402
from tests.fakes import FakeGenerator, FakeScorer  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def gens(monkeypatch):
    made = []

    def gen(policy, backend):
        made.append(FakeGenerator(critiques=["Needs work. Rating: [[4]]", "Fine. Rating: [[7]]"]))
        return made[-1]
    monkeypatch.setattr(t, "make_generator", gen)
    monkeypatch.setattr(t, "make_scorer", lambda c: FakeScorer())
    return made


def overrides(root):
    return [f"store.root={root}", "data.stage1_sft=[0,10]", "shard_size=3"]


def select_files(root):
    store = Store(str(root))
    [ref] = store.list("select")
    m = store.manifest(ref)
    return ref.key, {f: v["sha256"] for f, v in m["files"].items()}


def failed_run(monkeypatch, root, task):
    monkeypatch.setenv("AVR_FAIL_TASK", task)
    state = synthesis_run({"preset": "tiny", "overrides": overrides(root)}, return_state=True)
    monkeypatch.delenv("AVR_FAIL_TASK")
    assert state.is_failed()
    return str(state.state_details.flow_run_id)


@pytest.mark.slow
def test_resume_after_a_late_failure_redoes_nothing_before_it(tmp_path, monkeypatch, gens):
    synthesis_run({"preset": "tiny", "overrides": overrides(tmp_path / "clean")})
    clean = select_files(tmp_path / "clean")

    run_id = failed_run(monkeypatch, tmp_path / "r", "select")
    gens.clear()
    resume(run_id)
    assert gens == []                                            # no model was even built
    assert {r["task"] for r in STAGE_LOG if not r["cached"]} == {"select"}
    assert select_files(tmp_path / "r") == clean                 # same key, byte-identical files


@pytest.mark.slow
def test_a_failed_run_ends_with_one_line_and_resumes_by_its_run_id(tmp_path, monkeypatch, gens, capsys):
    """`avr run`'s path (avr_cli/run.py `run_flow`): a failure in critique ends with one line naming
    the stage, what is kept and `avr resume <run id>`, its traceback logged once; resuming by that
    id recomputes critique and what follows it, nothing before it."""
    import json
    import logging

    from avr_cli.resume import resumer
    from avr_cli.run import run_flow

    logged = []
    handler = logging.Handler()
    handler.emit = lambda r: logged.append(r) if r.exc_info else None
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addHandler(handler)
    monkeypatch.setenv("AVR_FAIL_TASK", "critique")
    try:
        rc = run_flow(lambda: synthesis_run({"preset": "tiny", "overrides": overrides(tmp_path)}), ["run"])
    finally:
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).removeHandler(handler)
    monkeypatch.delenv("AVR_FAIL_TASK")
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("avr:")]
    [failed] = [p.name for p in (tmp_path / "runs").iterdir()]
    assert rc == 1 and len(logged) == 1                          # the traceback once, not once per flow run
    assert f"avr: run {failed} failed in stage critique (RuntimeError: injected failure" in line
    assert "the artifacts of 2 finished stages" in line and line.endswith(f"avr resume {failed} --store {tmp_path}")
    record = json.loads((tmp_path / "runs" / failed / "run.json").read_text())
    assert record["flow"] == "avr-synthesis-run" and record["flow_run_id"] and record["failed"]["stage"] == "critique"
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:                 # the UI's run list names it as the CLI does
        assert client.read_flow_run(record["flow_run_id"]).name == failed

    again, resumes = resumer(failed[:12], str(tmp_path))         # a unique prefix of the run id
    capsys.readouterr()
    assert resumes == failed and run_flow(again, ["resume", failed], resumes) == 0
    [resumed] = [p.name for p in (tmp_path / "runs").iterdir() if p.name != failed]
    out, err = capsys.readouterr()                               # the end of the run on stdout, logs on stderr
    assert f"run {resumed} finished in" in out and f"run {resumed} finished in" not in err
    summary = json.loads((tmp_path / "runs" / resumed / "summary.json").read_text())
    assert [(s["task"], s["cached"]) for s in summary["stages"]] == [
        ("prompts", True), ("respond", True), ("critique", False), ("refine", False), ("rm_score", False),
        ("select", False)]
    assert json.loads((tmp_path / "runs" / resumed / "run.json").read_text())["resumes"] == failed
