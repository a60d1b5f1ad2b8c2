"""Evaluation (docs/DESIGN.md steps 10-11).

- `test_time_scaling`: the Stage-1 model refines held-out prompts for R = 0..tts.rounds rounds
  at inference; the score and the length per R.
- `evaluate`: every model answers the AlpacaEval prompts, alpaca-eval's annotator judges them
  against the references, and the run's rows are appended to the leaderboard.

    avr run --preset tiny            # the pipeline ends with both
    avr eval                         # the leaderboard, read from the store
"""
from __future__ import annotations

from prefect import flow

from avr_core.store import ArtifactRef
from tasks.evaluate import eval_answers, eval_prompts, judge, leaderboard
from tasks.scaling import tts_answers, tts_curve
from tasks.synthesis import prompts


@flow(name="avr-test-time-scaling", log_prints=True)
def test_time_scaling(cfg: dict, model: dict) -> ArtifactRef:
    """Answer + R rounds of critique/refine on the held-out prompts, every round scored -> the curve."""
    heldout = prompts(cfg, "heldout")
    return tts_curve(cfg, tts_answers(cfg, model, heldout))


# Which answering mode and how many explicit rounds R each pipeline model is evaluated with.
def eval_modes(cfg: dict) -> dict[str, tuple[str, str, int]]:
    """model name -> (stage label, inference mode, R)."""
    return {"seed": ("seed", "refine", 0), "rsft": ("stage1-rsft", "refine", 0),
            "stage1": ("stage1", "refine", cfg["eval"]["rounds"]), "stage2": ("stage2", "thought", 0)}


@flow(name="avr-evaluate", log_prints=True)
def evaluate(cfg: dict, models: dict[str, dict], run_id: str = "adhoc", iteration: int = 0) -> str:
    """Every model answers every eval prompt -> alpaca-eval judge -> metrics -> leaderboard row
    (of AvR iteration `iteration`)."""
    eval_set = eval_prompts(cfg)
    modes = {k: v for k, v in eval_modes(cfg).items() if k in models and k in cfg["eval"]["models"]}
    judged = {}
    for name, (_, mode, rounds) in modes.items():
        answers = eval_answers(cfg, models[name], name, mode, rounds, eval_set)
        judged[name] = judge(cfg, answers, eval_set)
    board = leaderboard(cfg, run_id, judged, {k: (v[0], v[2]) for k, v in modes.items()}, iteration)
    print(f"leaderboard: {len(judged)} rows of iteration {iteration} added (the run's end shows them)")
    return board
