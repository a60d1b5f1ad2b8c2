"""The paper preset's stage-2 search switches wired through the `search` stage (fake backends,
control flow only; issue 21): every conversation the greedy search sends is the authors' v2
layout, word for word (`individual_judge` / `individual_refine`, src/actions.py:8-56, called by
src/cot_data_generation_greedy.py:39,48), and an empty refinement is kept and scored
(:61-71: only a failed request, None, is skipped). The `tiny` preset keeps ours."""
import json
import os

import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

import tasks.stage2 as s2  # noqa: E402
import tasks.synthesis as t  # noqa: E402
from avr_core.config import load_config  # noqa: E402
from avr_core.store import Store  # noqa: E402
from tests.core.test_paper_parity import ACTIONS_JUDGE_SYSTEM, ACTIONS_REFINE_JUDGE, ACTIONS_REFINE_SYSTEM  # noqa: E402
from tests.fakes import FakeGenerator, FakeScorer  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_harness")
V2 = lambda text: text.replace("below", "above")     # noqa: E731  actions.py:17,53-55 (template v2)


def paper_stage2_switches() -> list[str]:
    """The switches the search reads, as conf/paper.yaml sets them (read, not restated)."""
    p = load_config("paper")
    return [f"refine.conversation_judge={p.refine.conversation_judge}", f"refine.keep_empty={p.refine.keep_empty}",
            f"respond.keep_empty={p.respond.keep_empty}", f"search.start={p.search.start}",
            f"search.k={p.search.k}", f"search.m={p.search.m}", "search.max_rounds=2"]


def run_search(tmp_path, monkeypatch, preset_switches):
    prompts = tmp_path / "armorm.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": [
        {"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}) + "\n" for i in range(3)))
    cfg = OmegaConf.to_container(load_config("tiny", [f"store.root={tmp_path / 'st'}", f"data.prompts={prompts}",
                                                      "data.stage2=[0,3]", *preset_switches]), resolve=True)
    sent = []

    class Recording(FakeGenerator):
        def generate(self, conversations, params):
            sent.extend(conversations)
            return super().generate(conversations, params)
    # refinement 0 of every critique is empty, refinement 1 grows the answer (scored by its length)
    gen = Recording(critiques=["Short. Rating: [[4]]"], refinements=lambda conv, j: "" if j == 0 else
                    conv[-4]["content"] + " more")
    monkeypatch.setattr(s2, "make_generator", lambda policy, backend: gen)
    monkeypatch.setattr(s2, "make_scorer", lambda cfg: FakeScorer())
    ref = s2.search(cfg, cfg["policy"], t.prompts(cfg, "stage2"))
    store = Store(str(tmp_path / "st"))
    return sent, store.read_records(ref), store.manifest(ref)["counts"]


def test_paper_search_sends_the_authors_conversations_and_scores_empty_refinements(tmp_path, monkeypatch):
    sent, traces, counts = run_search(tmp_path, monkeypatch, paper_stage2_switches())
    judges = [c for c in sent if c[-1]["content"] == V2(ACTIONS_JUDGE_SYSTEM)]
    refines = [c for c in sent if c[-1]["content"] == V2(ACTIONS_REFINE_SYSTEM)]
    assert len(judges) + len(refines) == len(sent) and judges and refines   # search.start=dataset: no respond
    for c in judges:                    # [x, y] + judge: individual_judge v2 (actions.py:16-18)
        assert [m["role"] for m in c] == ["user", "assistant", "user"]
    for c in refines:                   # [x, y, JUDGE("Your"), c, REFINE]: individual_refine v2 (actions.py:52-56)
        assert [m["role"] for m in c] == ["user", "assistant", "user", "assistant", "user"]
        assert c[2]["content"] == V2(ACTIONS_REFINE_JUDGE) and c[3]["content"] == "Short. Rating: [[4]]"
    first = traces[0]["rounds"][0]["critiques"][0]["refinements"]
    assert [f["text"] for f in first] == ["", "A0. more"] and first[0]["score"] == 0.0   # kept and scored
    assert not counts.get("dropped_empty_refinements")
    assert traces[0]["rounds"][0]["critiques"][0]["refinements"][0]["score"] == 0.0


def test_tiny_search_keeps_ours(tmp_path, monkeypatch):
    sent, traces, counts = run_search(tmp_path, monkeypatch, ["search.max_rounds=2"])
    refines = [c for c in sent if c[-1]["content"] == V2(ACTIONS_REFINE_SYSTEM)]
    assert refines and all(c[-3]["content"] == V2(ACTIONS_JUDGE_SYSTEM) for c in refines)   # "You evaluation"
    assert all(f["text"] for r in traces[0]["rounds"] for c in r["critiques"] for f in c["refinements"])
    assert counts["dropped_empty_refinements"] > 0
