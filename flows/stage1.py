"""Stage 1 -- single-step refinement (docs/DESIGN.md steps 1-6).

    avr run --preset tiny            # the pipeline runs `stage1` below
"""
from __future__ import annotations

from prefect import flow

from avr_core.store import ArtifactRef
from tasks import signal as s, synthesis as t, training as tr


@flow(name="avr-synthesis", log_prints=True)
def synthesis(cfg: dict, policy: dict, split: str) -> ArtifactRef:
    """respond -> critique -> refine -> rm_score -> select, on the prompt slice `data.<split>`."""
    prompts = t.prompts(cfg, split)
    answers = t.respond(cfg, policy, prompts)
    critiques = t.critique(cfg, policy, answers)
    refinements = t.refine(cfg, policy, critiques)
    scored = t.rm_score(cfg, refinements)
    return t.select(cfg, scored, prompts if split == "stage1_sft" else None)   # RSFT mix (select.rsft_mix_chosen)


@flow(name="avr-stage1", log_prints=True)
def stage1(cfg: dict, seed: dict) -> dict:
    """Synthesis with the seed -> RSFT -> synthesis with the RSFT policy on fresh prompts -> PO."""
    rsft_data = synthesis(cfg, seed, "stage1_sft")
    rsft_ref = tr.train_sft(cfg, seed, rsft_data)
    rsft = tr.policy_of(cfg, rsft_ref)
    pairs = synthesis(cfg, rsft, "stage1_po")
    ref_logps = tr.reference_logps(cfg, rsft, pairs)          # the RSFT model is the reference
    model = tr.train_po(cfg, rsft, pairs, ref_logps)
    return {"rsft_data": rsft_data, "rsft": rsft, "rsft_ref": rsft_ref, "pairs": pairs, "model_ref": model,
            "model": tr.policy_of(cfg, model)}


@flow(name="avr-learning-signal", log_prints=True)
def learning_signal(cfg: dict, base: dict, trained: dict) -> ArtifactRef:
    """Score both models' answers to held-out prompts with the configured scorer; paired difference."""
    heldout = t.prompts(cfg, "heldout")
    a = t.rm_score(cfg, t.respond(cfg, base, heldout))
    b = t.rm_score(cfg, t.respond(cfg, trained, heldout))
    return s.learning_signal(cfg, a, b)
