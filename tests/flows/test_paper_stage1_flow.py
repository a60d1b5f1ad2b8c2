"""The paper preset's stage-1 switches wired through the synthesis flow (fake backends, control flow
only): the refine conversation's judge text, max_new_tokens null, the whole split, the RSFT mix."""
import json
import os

import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

import tasks.synthesis as t  # noqa: E402
from avr_core.config import load_config  # noqa: E402
from avr_core.prompts import JUDGE_REFINE_CONVERSATION, REFINE_SAMPLING  # noqa: E402
from avr_core.store import Store  # noqa: E402
from flows.stage1 import synthesis  # noqa: E402
from tests.fakes import FakeGenerator, FakeScorer  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_harness")

PAPER_STAGE1 = ["refine.conversation_judge=refine", "refine.sampling.max_new_tokens=null",
                "data.stage1_sft=[0,null]", "select.drop_unchanged=false", "select.ties=authors",
                "select.record_gate=true", "select.refinement_needs_critique=true",
                "select.refinement_skip_at_answer=true", "select.group_critiques_by_text=true",
                "select.rsft_redundancy=false", "select.rsft_judge=sft", "select.rsft_mix_chosen=true"]


def test_paper_stage1_switches_reach_the_flow(tmp_path, monkeypatch):
    prompts = tmp_path / "armorm.jsonl"          # the hub dataset's row format, exported
    prompts.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": [
        {"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}) + "\n" for i in range(7)))
    cfg = OmegaConf.to_container(load_config("tiny", [f"store.root={tmp_path / 'st'}", f"data.prompts={prompts}",
                                                      "shard_size=3", *PAPER_STAGE1]), resolve=True)
    gens = []

    class Recording(FakeGenerator):
        def generate(self, conversations, params):
            gens.append((conversations, params))
            return super().generate(conversations, params)
    monkeypatch.setattr(t, "make_generator", lambda policy, backend: Recording(critiques=["Meh. Rating: [[4]]"]))
    monkeypatch.setattr(t, "make_scorer", lambda cfg: FakeScorer())
    ref = synthesis(cfg, cfg["policy"], "stage1_sft")
    refine_calls = [(c, p) for c, p in gens if c and c[0][-1]["content"] == REFINE_SAMPLING]
    assert refine_calls and all(conv[-3]["content"] == JUDGE_REFINE_CONVERSATION for c, _ in refine_calls for conv in c)
    assert {p.max_new_tokens for _, p in refine_calls} == {cfg["generator"]["max_model_len"]}   # hf: the context
    store = Store(str(tmp_path / "st"))
    rsft = store.read_records(ref, "rsft")
    mixed = [r for r in rsft if r.get("source") == "dataset_chosen"]
    assert len(mixed) == 7 and store.manifest(ref)["counts"]["mix_examples"] == 7   # y0 is the policy's: none used
    assert mixed[0]["messages"][-1] == {"role": "assistant", "content": "A0."}
