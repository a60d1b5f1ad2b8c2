"""Stage 1 -- single-step refinement (docs/DESIGN.md steps 1-6).

    avr run --preset tiny            # the pipeline runs `stage1` below
"""
from __future__ import annotations

from prefect import flow

from avr_core.store import ArtifactRef
from tasks import learning_signal as signal_tasks
from tasks.synthesis import critique, prompts, refine, respond, rm_score, select
from tasks.training import policy_of, reference_logps, train_po, train_sft


@flow(name="avr-synthesis", log_prints=True)
def synthesis(cfg: dict, policy: dict, split: str) -> ArtifactRef:
    """respond -> critique -> refine -> rm_score -> select, on the prompt slice `data.<split>`."""
    questions = prompts(cfg, split)
    answers = respond(cfg, policy, questions)
    critiques = critique(cfg, policy, answers)
    refinements = refine(cfg, policy, critiques)
    scored = rm_score(cfg, refinements)
    return select(cfg, scored, questions if split == "stage1_sft" else None)   # RSFT mix (select.rsft_mix_chosen)


@flow(name="avr-stage1", log_prints=True)
def stage1(cfg: dict, seed: dict) -> dict:
    """Synthesis with the seed -> RSFT -> synthesis with the RSFT policy on fresh prompts -> PO."""
    rsft_data = synthesis(cfg, seed, "stage1_sft")
    rsft_ref = train_sft(cfg, seed, rsft_data)
    rsft = policy_of(cfg, rsft_ref)
    pairs = synthesis(cfg, rsft, "stage1_po")
    ref_logps = reference_logps(cfg, rsft, pairs)          # the RSFT model is the reference
    model = train_po(cfg, rsft, pairs, ref_logps)
    return {"rsft_data": rsft_data, "rsft": rsft, "rsft_ref": rsft_ref, "pairs": pairs, "model_ref": model,
            "model": policy_of(cfg, model)}


@flow(name="avr-learning-signal", log_prints=True)
def learning_signal(cfg: dict, base: dict, trained: dict) -> ArtifactRef:
    """Score both models' answers to held-out prompts with the configured scorer; paired difference."""
    heldout = prompts(cfg, "heldout")
    a = rm_score(cfg, respond(cfg, base, heldout))
    b = rm_score(cfg, respond(cfg, trained, heldout))
    return signal_tasks.learning_signal(cfg, a, b)
