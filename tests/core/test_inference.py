"""The inference entry point on a FakeGenerator (control flow only)."""
import pytest

from avr_core.inference import answer_prompts
from avr_core.prompts import JUDGE_TRAIN, REFINE_TRAIN
from avr_core.thought import Thought, format_thought
from tests.fakes import FakeGenerator

P = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]


class TrainedFake(FakeGenerator):
    """Answers with the trained prompts: judge -> critique, refine -> answer + '!'."""

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        out = []
        for c in conversations:
            last = c[-1]["content"]
            if last == JUDGE_TRAIN:
                out.append(["Add emphasis."])
            elif last == REFINE_TRAIN:
                out.append([c[1]["content"] + "!"])
            else:
                out.append(["answer"])
        return out


def test_zero_rounds_is_the_direct_answer():
    out = answer_prompts(P, TrainedFake(), rounds=0)
    assert [o["answer"] for o in out] == ["answer", "answer"] and out[0]["path"] == "direct"


def test_r_rounds_refine_in_one_call_per_step():
    gen = TrainedFake()
    out = answer_prompts(P, gen, rounds=3)
    assert out[0]["answer"] == "answer!!!" and len(out[0]["trace"]) == 3
    assert [n for n, _ in gen.calls] == [2] * 7          # answer, then (critique, refine) x 3
    assert out[0]["answers"] == ["answer", "answer!", "answer!!", "answer!!!"]   # the answer after r rounds


def test_thought_mode_extracts_the_final_answer():
    class Thinker(FakeGenerator):
        def generate(self, conversations, params):
            return [[format_thought(Thought("draft", [("c", "better")], "fine"))] for _ in conversations]
    out = answer_prompts(P, Thinker(), mode="thought")
    assert out[0]["answer"] == "better" and out[0]["path"] == "final_answer" and out[0]["rounds"] == 1


def test_rounds_out_of_range():
    with pytest.raises(ValueError, match="0..5"):
        answer_prompts(P, TrainedFake(), rounds=6)
