"""Evaluation (DESIGN.md steps 10-11). Test-time scaling: the Stage-1 model refines held-out
prompts for R = 0..tts.rounds rounds at inference; the score and the length per R.

    avr run --preset tiny            # the pipeline ends with `test_time_scaling` below
"""
from __future__ import annotations

from prefect import flow

from avr_core.store import ArtifactRef
from tasks import scaling as sc
from tasks import synthesis as t


@flow(name="avr-test-time-scaling", log_prints=True)
def test_time_scaling(cfg: dict, model: dict) -> ArtifactRef:
    """Answer + R rounds of critique/refine on the held-out prompts, every round scored -> the curve."""
    heldout = t.prompts(cfg, "heldout")
    return sc.tts_curve(cfg, sc.tts_answers(cfg, model, heldout))
