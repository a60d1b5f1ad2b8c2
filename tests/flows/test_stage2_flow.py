"""Stage-2 data tasks under Prefect on fake backends (control flow only): search -> thoughts,
and S sampled thoughts -> final-answer scores -> length-controlled pairs."""
import os

import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

import tasks.stage2 as s2  # noqa: E402
import tasks.synthesis as t  # noqa: E402
from avr_core.config import load_config  # noqa: E402
from avr_core.store import Store  # noqa: E402
from avr_core.thought import parse_thought  # noqa: E402
from flows.stage2 import thought_data  # noqa: E402
from tests.core.test_search import GrowingGenerator  # noqa: E402
from tests.fakes import FakeScorer, ThoughtWriter  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_harness")


def cfg_for(tmp_path):
    return OmegaConf.to_container(load_config("tiny", [f"store.root={tmp_path}", "data.stage2=[0,5]",
                                                       "data.stage2_po=[5,9]", "search.max_rounds=5"]), resolve=True)


def test_search_then_thoughts(tmp_path, monkeypatch):
    monkeypatch.setattr(s2, "make_generator", lambda p, b: GrowingGenerator(cap=4))
    monkeypatch.setattr(s2, "make_scorer", lambda c: FakeScorer())
    cfg = cfg_for(tmp_path)
    out = thought_data(cfg, cfg["policy"])
    store = Store(str(tmp_path))
    traces = store.read_records(out["traces"])
    assert len(traces) == 5 and all(tr["stop"] == "no_improvement" for tr in traces)
    rows = store.read_records(out["thoughts"], "rsft")
    assert len(rows) == 5
    th = parse_thought(rows[0]["messages"][-1]["content"])
    assert th.answer == "An answer." and len(th.steps) == 1 and th.final_critique   # 2 -> 4 words, then stop
    assert store.manifest(out["thoughts"])["counts"]["thoughts"] == 5
    gain = store.manifest(out["traces"])
    assert {"score_gain.json", "score_gain.png"} <= set(gain["files"])      # the per-round plot beside the traces


def test_sampled_thoughts_make_length_controlled_pairs(tmp_path, monkeypatch):
    monkeypatch.setattr(s2, "make_generator", lambda p, b: ThoughtWriter())
    scores = {"a much longer final answer here": 9.0, "fine answer": 1.0, "ok": 4.0}
    monkeypatch.setattr(s2, "make_scorer", lambda c: FakeScorer(fn=scores.get))
    cfg = cfg_for(tmp_path)
    samples = s2.sample_thoughts(cfg, cfg["policy"], t.prompts(cfg, "stage2_po"))
    pairs_ref = s2.thought_pairs(cfg, samples)
    store = Store(str(tmp_path))
    m = store.manifest(samples)
    assert m["counts"]["final_from_final_answer"] == 4 * 3
    pairs = store.read_records(pairs_ref, "pairs")
    assert len(pairs) == 4
    for p in pairs:   # the best-scored final answer is longer than the worst's: the next best is chosen
        assert p["len_chosen_final"] <= p["len_rejected_final"]
        assert parse_thought(p["chosen"][0]["content"]).final_answer == "ok"
        assert parse_thought(p["rejected"][0]["content"]).final_answer == "fine answer"
