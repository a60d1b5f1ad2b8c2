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
    assert result["position_bias"] == {"n": 2, "agreement": 1.0, "model_wins_forward": 2, "model_wins_swapped": 2}
    assert list(result)[-3:] == ["reference", "annotator", "position_bias"]   # the task appends judge_s last


def test_a_judge_that_prefers_the_second_output_disagrees_with_itself():
    bias = position_bias(model_outputs(ANSWERS), reference_outputs(PROMPTS), 3,
                         lambda o2, o1: FakeAnnotate(True)(o2, o1, False))
    assert bias == {"n": 3, "agreement": 0.0, "model_wins_forward": 3, "model_wins_swapped": 0}


def test_no_position_check_when_n_is_zero():
    fake = FakeAnnotate()
    _, result = judge_answers(model_outputs(ANSWERS), reference_outputs(PROMPTS), fake, JUDGE, 0, None)
    assert result["position_bias"] is None and len(fake.calls) == 1


def test_labels_and_reference_rows():
    assert judge_label({"kind": "local", "annotator": "a", "local_model": "embedded:x"}) == "local:embedded:x"
    dup = PROMPTS + [{**PROMPTS[0], "reference": "newer"}]
    refs = reference_outputs(dup)
    assert len(refs) == 4 and refs[0]["output"] == "newer"        # one per instruction, as before
