"""The whole method, top to bottom (docs/DESIGN.md): stage 1, stage 2, test-time scaling, evaluation.

    avr run --preset tiny
"""
from __future__ import annotations

from prefect import flow

from flows.evaluate import evaluate, test_time_scaling
from flows.runs import finish_run, start_run
from flows.stage1 import learning_signal, stage1
from flows.stage2 import stage2


@flow(name="avr-pipeline", log_prints=True)
def pipeline(preset: str = "tiny", overrides: list[str] = []) -> dict:  # noqa: B006 (Prefect parameter)
    run, cfg = start_run(preset, overrides)        # validated, config saved, inputs checked: before any work
    seed = cfg["policy"]
    s1 = stage1(cfg, seed)                         # synthesis -> RSFT -> synthesis -> PO
    signal = learning_signal(cfg, seed, s1["model"])
    s2 = stage2(cfg, s1["model"])                  # search -> thoughts -> CoT RSFT -> thought pairs -> PO
    tts = test_time_scaling(cfg, s1["model"])      # R = 0..5 refinement rounds at inference
    board = evaluate(cfg, {"seed": seed, "rsft": s1["rsft"], "stage1": s1["model"], "stage2": s2["model"]}, run["id"])
    return finish_run(run, cfg, {"stage1_synthesis": s1["rsft_data"], "stage1_pairs": s1["pairs"],
                                 "stage1_model": s1["model_ref"], "learning_signal": signal,
                                 "stage2_thoughts": s2["thoughts"], "stage2_pairs": s2["pairs"],
                                 "stage2_model": s2["model_ref"], "test_time_scaling": tts}, board)
