"""`judge.judge_answers` / `position_bias` on a fake annotate function (no alpaca-eval
annotator, no judge): which pairs are judged in which order, and what the result holds."""
import pytest

from avr_core.evaluation.judge import judge_answers, judge_label, model_outputs, position_bias, reference_outputs

PROMPTS = [{"instruction": f"q{i}", "reference": "ref answer", "reference_generator": "gpt4_turbo", "dataset": "d"}
           for i in range(4)]
ANSWERS = [{"instruction": f"q{i}", "output": "x" * (i + 1), "generator": "seed", "dataset": "d", "raw": "",
            "path": "direct"} for i in range(4)]
JUDGE = {"kind": "openai", "annotator": "weighted_alpaca_eval_gpt4_turbo", "local_model": "unused"}


class FakeAnnotate:
    """Records every call; prefers whichever output is shown SECOND when `second_wins`, else the
    seed model wherever it is shown (no position bias). Unparsed for instruction `q3`."""

    def __init__(self, second_wins=False):
        self.calls, self.second_wins = [], second_wins

    def __call__(self, outputs_2, outputs_1, randomize):
        self.calls.append(([o["generator"] for o in outputs_2], [o["generator"] for o in outputs_1], randomize))
        out = []
        for o in outputs_2:
            pref = 2.0 if self.second_wins or o["generator"] == "seed" else 1.0
            out.append({"instruction": o["instruction"], "output_2": o["output"],
                        "output_1": next(r["output"] for r in outputs_1 if r["instruction"] == o["instruction"]),
                        "generator_1": outputs_1[0]["generator"], "generator_2": o["generator"],
                        "preference": None if o["instruction"] == "q3" else pref})
        return out


def test_one_randomised_pass_then_both_fixed_orders_on_the_first_n():
    fake = FakeAnnotate()
    model, reference = model_outputs(ANSWERS), reference_outputs(PROMPTS)
    ann, result = judge_answers(model, reference, fake, JUDGE, position_bias_n=2, df_gamed="")
    assert fake.calls == [(["seed"] * 4, ["gpt4_turbo"] * 4, True),          # main pass, order randomised
                          (["seed"] * 2, ["gpt4_turbo"] * 2, False),         # forward: reference first
                          (["gpt4_turbo"] * 2, ["seed"] * 2, False)]         # swapped: model first
    assert len(ann) == 4
    assert result["win_rate"] == pytest.approx(100.0) and result["n_total"] == 3 and result["unparsed"] == 1
    assert result["lc_kind"] == "unavailable" and result["lc_win_rate"] is None
    assert result["avg_len_chars"] == 2.5 and (result["model"], result["reference"]) == ("seed", "gpt4_turbo")
    assert result["annotator"] == "weighted_alpaca_eval_gpt4_turbo"
    assert result["position_bias"] == {"n": 2, "agreement": 1.0, "model_wins_forward": 2, "model_wins_swapped": 2,
                                       "draws_forward": 0, "draws_swapped": 0}
    assert list(result)[-3:] == ["reference", "annotator", "position_bias"]   # the task appends judge_s last


def test_a_judge_that_prefers_the_second_output_disagrees_with_itself():
    bias = position_bias(model_outputs(ANSWERS), reference_outputs(PROMPTS), 3,
                         lambda o2, o1: FakeAnnotate(True)(o2, o1, False))
    assert bias == {"n": 3, "agreement": 0.0, "model_wins_forward": 3, "model_wins_swapped": 0,
                    "draws_forward": 0, "draws_swapped": 0}


def test_no_position_check_when_n_is_zero():
    fake = FakeAnnotate()
    _, result = judge_answers(model_outputs(ANSWERS), reference_outputs(PROMPTS), fake, JUDGE, 0, None)
    assert result["position_bias"] is None and len(fake.calls) == 1


def test_labels_and_reference_rows():
    assert judge_label({"kind": "local", "annotator": "a", "local_model": "embedded:x"}) == "local:embedded:x"
    dup = PROMPTS + [{**PROMPTS[0], "reference": "newer"}]
    refs = reference_outputs(dup)
    assert len(refs) == 4 and refs[0]["output"] == "newer"        # one per instruction, as before



def test_lc_min_annotations_reaches_the_lc_and_the_stage_key():
    """`eval.lc_min_annotations`: judge_answers hands it to the LC (counting parsed judgements), and
    the judge stage's cache key holds it, so changing it re-runs the stage."""
    from omegaconf import OmegaConf

    import tasks.evaluate as ev
    from avr_core.config import load_config

    prompts = [{**PROMPTS[0], "instruction": f"q{i}"} for i in range(12)]
    answers = [{**ANSWERS[0], "instruction": f"q{i}", "output": "x" * (7 * i % 11 + 1)} for i in range(12)]
    model, reference = model_outputs(answers), reference_outputs(prompts)
    _, fits = judge_answers(model, reference, FakeAnnotate(second_wins=True), JUDGE, 0, "", lc_min_annotations=11)
    _, short = judge_answers(model, reference, FakeAnnotate(second_wins=True), JUDGE, 0, "", lc_min_annotations=12)
    assert fits["lc_kind"] == "minimal-offline" and fits["lc_win_rate"] is not None      # q3 unparsed: 11 parsed
    assert short["lc_kind"] == "unavailable" and short["lc_win_rate"] is None
    assert "11 parsed judgement(s), fewer than eval.lc_min_annotations = 12" in short["lc_note"]
    spec = [ev.judge_spec(OmegaConf.to_container(load_config("tiny", [f"eval.lc_min_annotations={n}"]), resolve=True),
                          None, None) for n in (0, 10)]
    assert [s.config["lc_min_annotations"] for s in spec] == [0, 10]


def test_alpaca_evals_caching_path_warning_is_dropped_once_at_the_source(caplog):
    """Issue 37: the warning alpaca-eval logs per annotator about `caching_path` means nothing for
    our per-artifact paths; other root warnings still pass."""
    import logging

    from alpaca_eval.annotators import base  # noqa: F401  (the module that warns)

    import avr_core.evaluation.judge  # noqa: F401  (installs the filter)

    with caplog.at_level(logging.WARNING):
        logging.warning("Saving_path is given but not 'auto', make sure that it's different for different seeds.")
        logging.warning("something a user should see")
    assert [r.getMessage() for r in caplog.records] == ["something a user should see"]
