"""Progress you can watch (issue 35): a long stage updates a Prefect progress artifact as its shards
complete, read here from the API WHILE the flow runs (its generator is held after the first
shard), and training reports its steps through the file the recipe writes."""
import json
import os
import threading
import time

import pytest
from omegaconf import OmegaConf
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.runtime import flow_run

import tasks.synthesis as t
from avr_core.config import load_config
from tasks.runtime.supervision import _report_steps
from tests.fakes import FakeGenerator

pytestmark = pytest.mark.usefixtures("prefect_harness")


class HeldGenerator(FakeGenerator):
    """A scripted generator (control flow only) that waits at its second call until released."""

    def __init__(self):
        super().__init__()
        self.held, self.release = threading.Event(), threading.Event()

    def generate(self, conversations, params):
        if len(self.calls) == 1:
            self.held.set()
            assert self.release.wait(60), "the test never released the generator"
        return super().generate(conversations, params)


def progress_values(key: str, flow_run_id) -> list[float]:
    """The progress artifacts `key` of one flow run (other tests' runs share the harness's database)."""
    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                               flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return [a.data for a in arts if a.type == "progress"]


def test_a_sharded_stage_shows_its_progress_while_it_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("AVR_PROGRESS_INTERVAL_S", "0")
    gen = HeldGenerator()
    monkeypatch.setattr(t, "make_generator", lambda policy, backend: gen)
    cfg = OmegaConf.to_container(load_config("tiny", [f"store.root={tmp_path}", "data.stage1_sft=[0,6]",
                                                      "shard_size=2", "respond.use_dataset_answer=false"]),
                                 resolve=True)

    result = {}

    @flow(name="progress-test")
    def answers():
        result["flow_run_id"] = flow_run.id
        return t.respond(cfg, cfg["policy"], t.prompts(cfg, "stage1_sft"))

    runner = threading.Thread(target=lambda: result.update(ref=answers()), daemon=True)
    runner.start()
    assert gen.held.wait(120), "the stage never reached its second shard"
    seen = []
    for _ in range(100):                                   # a bound against hanging, not a timing check
        seen = progress_values("progress-respond", result["flow_run_id"])
        if seen:
            break
        time.sleep(0.2)
    gen.release.set()
    runner.join(120)
    assert seen == [pytest.approx(100 / 3, abs=0.1)], seen    # 1 of 3 shards, while the 2nd was held
    assert result["ref"] and progress_values("progress-respond", result["flow_run_id"]) == [100.0]


def test_training_steps_reach_the_progress_hook(tmp_path):
    calls = []
    _report_steps(tmp_path / "progress.json", lambda done, total: calls.append((done, total)))
    assert calls == []                                     # not written yet: nothing, no error
    (tmp_path / "progress.json").write_text(json.dumps({"step": 3, "of": 8}))
    _report_steps(tmp_path / "progress.json", lambda done, total: calls.append((done, total)))
    assert calls == [(3, 8)] and os.path.exists(tmp_path / "progress.json")
