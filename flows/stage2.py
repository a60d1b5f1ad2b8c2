"""Stage 2 -- long refinement thoughts (docs/DESIGN.md steps 7-9).

    avr run --preset tiny            # the pipeline runs `stage2` below after stage 1
"""
from __future__ import annotations

from prefect import flow

from tasks import stage2 as s2, synthesis as t, training as tr


@flow(name="avr-stage2-data", log_prints=True)
def thought_data(cfg: dict, stage1: dict) -> dict:
    """Greedy search with the Stage-1 model -> long thoughts (the CoT-SFT data)."""
    traces = s2.search(cfg, stage1, t.prompts(cfg, "stage2"))
    return {"traces": traces, "thoughts": s2.thoughts(cfg, traces)}


@flow(name="avr-stage2", log_prints=True)
def stage2(cfg: dict, stage1: dict) -> dict:
    """search -> thoughts -> CoT RSFT -> S thoughts per fresh prompt -> LC pairs -> PO."""
    data = thought_data(cfg, stage1)
    cot = tr.policy_of(cfg, tr.train_sft(cfg, stage1, data["thoughts"], section="cot_sft"))
    samples = s2.sample_thoughts(cfg, cot, t.prompts(cfg, "stage2_po"))
    pairs = s2.thought_pairs(cfg, samples)
    ref_logps = tr.reference_logps(cfg, cot, pairs, section="cot_po")
    model = tr.train_po(cfg, cot, pairs, ref_logps, section="cot_po")
    return {"thoughts": data["thoughts"], "cot": cot, "pairs": pairs, "model_ref": model,
            "model": tr.policy_of(cfg, model)}
