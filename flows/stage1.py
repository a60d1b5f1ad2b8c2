"""Stage 1 -- single-step refinement data (DESIGN.md steps 1-5).

    avr run --preset tiny            # runs the pipeline, which calls `synthesis` below
"""
from __future__ import annotations

from prefect import flow

from avr_core.store import ArtifactRef
from tasks import synthesis as t


@flow(name="avr-synthesis", log_prints=True)
def synthesis(cfg: dict, policy: dict, split: str) -> ArtifactRef:
    """respond -> critique -> refine -> rm_score -> select, on the prompt slice `data.<split>`."""
    prompts = t.prompts(cfg, split)
    answers = t.respond(cfg, policy, prompts)
    critiques = t.critique(cfg, policy, answers)
    refinements = t.refine(cfg, policy, critiques)
    scored = t.rm_score(cfg, refinements)
    return t.select(cfg, scored)
