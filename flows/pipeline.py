"""The whole method, top to bottom (DESIGN.md). Issue #2 builds stage-1 synthesis; training,
stage 2 and evaluation plug in here as they land.

    avr run --preset tiny
"""
from __future__ import annotations

from prefect import flow

from flows.runs import finish_run, start_run
from flows.stage1 import synthesis


@flow(name="avr-pipeline", log_prints=True)
def pipeline(preset: str = "tiny", overrides: list[str] = []) -> dict:  # noqa: B006 (Prefect parameter)
    run, cfg = start_run(preset, overrides)        # validated, config saved, inputs checked: before any work
    pairs = synthesis(cfg, cfg["policy"], "stage1_sft")
    return finish_run(run, cfg, {"stage1_synthesis": pairs})
