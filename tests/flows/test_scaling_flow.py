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

    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts()
    keys = {a.key for a in arts}
    assert {"tts-curve", "tts-curve-report"} <= keys
    # every sharded stage publishes a pair: its counts and a sample of records; no file:// link
    assert {"tts-answers", "tts-answers-report", "prompts"} <= keys and not any(k.endswith("-dir") for k in keys)
    counts = next(a for a in arts if a.key == "tts-answers" and a.type == "table")
    assert "answers_scored" in str(counts.data) and "from cache" not in str(counts.data)

    gens.clear()
    assert tts_flow(cfg, cfg["policy"]) == ref and gens == []               # cache hit: no model built
    with get_client(sync_client=True) as client:   # ... and the cached run's page still shows each stage
        again = [a for a in client.read_artifacts() if a.key == "tts-answers" and a.type == "table"]
    assert len(again) == 2 and sum("from cache: computed by run" in str(a.data) for a in again) == 1
