"""The whole method, top to bottom (DESIGN.md). Stage 2 and evaluation plug in here as they land.

    avr run --preset tiny
"""
from __future__ import annotations

from prefect import flow

from flows.runs import finish_run, start_run
from flows.stage1 import learning_signal, stage1


@flow(name="avr-pipeline", log_prints=True)
def pipeline(preset: str = "tiny", overrides: list[str] = []) -> dict:  # noqa: B006 (Prefect parameter)
    run, cfg = start_run(preset, overrides)        # validated, config saved, inputs checked: before any work
    seed = cfg["policy"]
    s1 = stage1(cfg, seed)                         # synthesis -> RSFT -> synthesis -> PO
    signal = learning_signal(cfg, seed, s1["model"])
    return finish_run(run, cfg, {"stage1_synthesis": s1["rsft_data"], "stage1_pairs": s1["pairs"],
                                 "stage1_model": s1["model_ref"], "learning_signal": signal})
