"""The whole method, top to bottom (docs/DESIGN.md): stage 1, stage 2, test-time scaling, evaluation,
`iterate.count` times, each iteration starting from the previous one's model (README "Iterations").

    avr run --preset tiny
    avr run --preset tiny --iterations 2          # iterative AvR

A preset with `flow: signal` (conf/signal.yaml) runs flows/learning_signal.py instead, as `avr run` does:
the UI form offers every shipped preset on the pipeline deployment.
"""
from __future__ import annotations

from prefect import flow

from flows import iterations
from flows.evaluate import evaluate, test_time_scaling
from flows.learning_signal import signal_run
from flows.params import RunParams, as_params
from flows.stage1 import learning_signal, stage1
from flows.stage2 import stage2
from run_records.lifecycle import finish_run, release_all_engines, start_run


@flow(name="avr-pipeline", log_prints=True, on_completion=[release_all_engines], on_failure=[release_all_engines],
      on_crashed=[release_all_engines])
def pipeline(params: RunParams = RunParams()) -> dict:  # noqa: B008 (Prefect parameter: the UI's run form)
    params = as_params(params)
    if params.config().flow == "signal":           # stage 1 + learning signal + test-time scaling, no stage 2
        return signal_run(params)                 # (a subflow run: its artifacts are on the avr-signal run)
    run, cfg = start_run(params)   # checked, saved: before any work
    seed, pending = iterations.start(cfg, run.prompt_rows)   # the policy, or the last completed iteration's model
    for t in pending:
        c = iterations.config_for(cfg, t)          # iteration t: fresh prompt slices
        s1 = stage1(c, seed)                       # synthesis -> RSFT -> synthesis -> PO
        learned = learning_signal(c, seed, s1["model"])
        s2 = stage2(c, s1["model"])                # search -> thoughts -> CoT RSFT -> thought pairs -> PO
        tts = test_time_scaling(c, s1["model"])    # R = 0..5 refinement rounds at inference
        board = evaluate(c, {"seed": seed, "rsft": s1["rsft"], "stage1": s1["model"], "stage2": s2["model"]},
                         run.id, t)
        iterations.record(c, run, t, seed, s1, s2, learned)     # per-iteration table + plot (win rate, scorer score)
        seed = iterations.next_seed(c, s1, s2)             # iteration t+1 starts from this iteration's model
    return finish_run(run, cfg, {"stage1_synthesis": s1["rsft_data"], "stage1_pairs": s1["pairs"],
                                 "stage1_model": s1["model_ref"], "learning_signal": learned,
                                 "stage2_thoughts": s2["thoughts"], "stage2_pairs": s2["pairs"],
                                 "stage2_model": s2["model_ref"], "test_time_scaling": tts}, board)
