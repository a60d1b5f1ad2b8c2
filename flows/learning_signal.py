"""The `signal` preset's flow: does stage 1 move a model, measured with an exact reward?

    avr run --preset signal          # conf/signal.yaml sets flow: signal, so `avr run` runs this

Stage 1 (synthesis -> RSFT -> synthesis -> DPO), then the seed, the RSFT model and the Stage-1
model answer the held-out prompts greedily and the configured scorer scores them: paired
differences with 95% CIs (seed -> RSFT -> Stage-1; seed -> Stage-1 again on `data.heldout_extra`
if set), then test-time scaling of the Stage-1 model (R = 0..tts.rounds; none when 0), and one
report with the synthesis counts (how often refinements beat y0, what selection kept) and the
optimizer steps each training took. No stage 2, no AlpacaEval.
"""
from __future__ import annotations

from prefect import flow

from flows.params import RunParams, as_params
from flows.stage1 import stage1
from run_records.lifecycle import finish_run, release_all_engines, start_run
from tasks import learning_signal as signal_tasks
from tasks.scaling import tts_answers, tts_curve
from tasks.synthesis import prompts, respond, rm_score


def greedy_heldout(cfg: dict) -> dict:
    """The config the held-out answers are drawn with: respond at temperature 0 (as test-time
    scaling), so each model gives its single most likely answer."""
    respond = {**cfg["respond"], "sampling": {**cfg["respond"]["sampling"], "temperature": 0.0}}
    return {**cfg, "respond": respond}


@flow(name="avr-signal", log_prints=True, on_completion=[release_all_engines], on_failure=[release_all_engines],
      on_crashed=[release_all_engines])
def signal_run(params: RunParams = RunParams(preset="signal")) -> dict:  # noqa: B008 (Prefect parameter)
    params = as_params(params)
    run, cfg = start_run(params)
    seed = cfg["policy"]
    s1 = stage1(cfg, seed)                                   # synthesis -> RSFT -> synthesis -> DPO
    heldout = prompts(cfg, "heldout")
    greedy = greedy_heldout(cfg)
    models = {"seed": seed, "rsft": s1["rsft"], "stage1": s1["model"]}
    scored = {name: rm_score(greedy, respond(greedy, m, heldout)) for name, m in models.items()}
    comparisons = {f"{a} -> {b}": signal_tasks.learning_signal(cfg, scored[a], scored[b])
                   for a, b in [("seed", "rsft"), ("rsft", "stage1"), ("seed", "stage1")]}
    if cfg["data"]["heldout_extra"]:                         # a second held-out set, reported apart
        extra = prompts(cfg, "heldout_extra")
        for name in ("seed", "stage1"):
            scored[f"{name} (heldout_extra)"] = rm_score(greedy, respond(greedy, models[name], extra))
        comparisons["seed -> stage1 (heldout_extra)"] = signal_tasks.learning_signal(
            cfg, scored["seed (heldout_extra)"], scored["stage1 (heldout_extra)"])
    answers = tts = None
    if cfg["tts"]["rounds"] > 0:                             # R = 0..tts.rounds, greedy
        answers = tts_answers(cfg, s1["model"], heldout)
        tts = tts_curve(cfg, answers)
    synthesis = {"RSFT data (seed)": _scored_and_selected(cfg, s1["rsft_data"]),
                 "DPO pairs (RSFT policy)": _scored_and_selected(cfg, s1["pairs"])}
    trained = {"RSFT": s1["rsft_ref"], "DPO (Stage-1)": s1["model_ref"]}
    report = signal_tasks.signal_report(cfg, comparisons, answers, scored, synthesis, trained)
    outputs = {"stage1_model": s1["model_ref"], "signal_report": report}
    summary = finish_run(run, cfg, outputs | ({"test_time_scaling": tts} if tts else {}))
    print(f"\n{report.path}/report.md:\n{signal_tasks.read_report(cfg, report)}")
    return summary


def _scored_and_selected(cfg: dict, selected):
    """(rm_score ref, select ref) of a synthesis, from its select artifact's inputs."""
    from avr_core.store import Store

    store = Store.of(cfg)
    scored = next(i for i in store.manifest(selected)["inputs"] if i.startswith("rm_score/"))
    return store.ref(*scored.split("/", 1)), selected
