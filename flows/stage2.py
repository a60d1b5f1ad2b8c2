"""Stage 2 -- long refinement thoughts (docs/DESIGN.md steps 7-9).

    avr run --preset tiny            # the pipeline runs `stage2` below after stage 1
"""
from __future__ import annotations

from prefect import flow

from tasks.stage2 import sample_thoughts, search, thought_pairs, thoughts
from tasks.synthesis import prompts
from tasks.training import policy_of, reference_logps, train_po, train_sft


@flow(name="avr-stage2-data", log_prints=True)
def thought_data(cfg: dict, stage1: dict) -> dict:
    """Greedy search with the Stage-1 model -> long thoughts (the CoT-SFT data)."""
    traces = search(cfg, stage1, prompts(cfg, "stage2"))
    return {"traces": traces, "thoughts": thoughts(cfg, traces)}


@flow(name="avr-stage2", log_prints=True)
def stage2(cfg: dict, stage1: dict) -> dict:
    """search -> thoughts -> CoT RSFT -> S thoughts per fresh prompt -> LC pairs -> PO."""
    data = thought_data(cfg, stage1)
    cot = policy_of(cfg, train_sft(cfg, stage1, data["thoughts"], section="cot_sft"))
    samples = sample_thoughts(cfg, cot, prompts(cfg, "stage2_po"))
    pairs = thought_pairs(cfg, samples)
    ref_logps = reference_logps(cfg, cot, pairs, section="cot_po")
    model = train_po(cfg, cot, pairs, ref_logps, section="cot_po")
    return {"thoughts": data["thoughts"], "cot": cot, "pairs": pairs, "model_ref": model,
            "model": policy_of(cfg, model)}
