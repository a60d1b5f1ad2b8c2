"""Test-time-scaling flow under Prefect on fake backends (control flow only): one inference
run at R = max gives every R, one scorer call per shard, the curve lands in the store and on
the Prefect run as artifacts, and a rerun is a cache hit."""
import os

import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

import tasks.scaling as sc  # noqa: E402
from avr_core.config import load_config  # noqa: E402
from avr_core.store import Store  # noqa: E402
from flows.evaluate import test_time_scaling as tts_flow  # noqa: E402
from tests.core.test_inference import TrainedFake  # noqa: E402
from tests.fakes import FakeScorer  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_curve_from_one_run(tmp_path, monkeypatch):
    gens, scorers = [], []
    # one cached backend per kind, as the real factories hand out (the stage asks them on every use)
    monkeypatch.setattr(sc, "make_generator", lambda p, b: gens[0] if gens else gens.append(TrainedFake()) or gens[0])
    monkeypatch.setattr(sc, "make_scorer", lambda c: scorers[0] if scorers else
                        scorers.append(FakeScorer(fn=lambda t: float(len(t)))) or scorers[0])
    cfg = OmegaConf.to_container(load_config("tiny", [f"store.root={tmp_path}", "data.heldout=[0,5]",
                                                      "tts.rounds=3", "shard_size=3"]), resolve=True)
    ref = tts_flow(cfg, cfg["policy"])
    store = Store(str(tmp_path))
    rows = store.manifest(ref)["result"]
    assert [r["R"] for r in rows] == [0, 1, 2, 3] and all(r["n"] == 5 for r in rows)
    assert [r["mean_chars"] for r in rows] == [6.0, 7.0, 8.0, 9.0]         # "answer" + one "!" per round
    assert [r["gain_vs_R0"] for r in rows] == [0.0, 1.0, 2.0, 3.0]
    # 2 shards: per shard one answer call + (critique, refine) per round; one scorer call
    assert [n for n, _ in gens[0].calls] == [3] * 7 + [2] * 7 and scorers[0].calls == 2
    files = store.manifest(ref)["files"]
    assert {"scaling.png", "scaling.csv", "scaling.md", "scaling.json"} <= set(files)
    assert (tmp_path / "tts_curve" / ref.key / "scaling.png").read_bytes().startswith(b"\x89PNG")
    md = (tmp_path / "tts_curve" / ref.key / "scaling.md").read_text()
    assert md.startswith("SMOKE RUN") and "NOT a benchmark result" in md    # tiny: the leaderboard's banner

    keys = {a.key for a in latest("tts-curve", "tts-curve-report", "tts-curve-dir", "tts-answers",
                                  "tts-answers-report", "tts-answers-dir", "prompts")}
    assert {"tts-curve", "tts-curve-report"} <= keys
    # every sharded stage publishes a pair: its counts and a sample of records; no file:// link
    assert {"tts-answers", "tts-answers-report", "prompts"} <= keys and not any(k.endswith("-dir") for k in keys)
    [counts] = latest("tts-answers", table=True, n=1)
    assert "answers_scored" in str(counts.data) and "from cache" not in str(counts.data)

    gens.clear()
    assert tts_flow(cfg, cfg["policy"]) == ref and gens == []               # cache hit: no model built
    [again] = latest("tts-answers", table=True, n=1)   # ... and the cached run's page still shows each stage
    assert again.id != counts.id and "from cache: computed by run" in str(again.data)
    # one report per stage on a run, the plot in it, computed or cached: a plot published beside the
    # stage's pair under the same key once made two `tts-curve-report`s on one run (the UI showed either)
    for run_id in (counts.flow_run_id, again.flow_run_id):
        [report] = of_run(run_id, "tts-curve-report")
        assert "data:image/png;base64," in report.data and "gain_vs_R0" in report.data, report.data[:300]
        assert [a.type for a in of_run(run_id, "tts-curve")] == ["table"]


def latest(*keys: str, table: bool = False, n: int = 50) -> list:
    """The newest artifacts of these keys (the session's Prefect database holds every test's:
    an unfiltered read stops at the API's page size)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort

    f = ArtifactFilter(key=ArtifactFilterKey(any_=list(keys)),
                       type=ArtifactFilterType(any_=["table"]) if table else None)
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=f, sort=ArtifactSort.CREATED_DESC, limit=n)


def of_run(flow_run_id, key: str) -> list:
    """Every artifact `key` of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    f = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=f)
