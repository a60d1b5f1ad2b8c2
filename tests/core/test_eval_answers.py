"""`inference.eval_answers` on fakes: every prompt kept, alpaca-eval keys plus provenance,
answer paths and empty answers counted."""
from avr_core.backends.base import SamplingParams
from avr_core.inference import eval_answers
from tests.core.test_inference import TrainedFake
from tests.fakes import FakeGenerator

RECS = [{"id": f"e{i}", "instruction": f"q{i}", "messages": [{"role": "user", "content": f"q{i}"}],
         "dataset": "d", "reference": "r", "reference_generator": "ref"} for i in range(3)]
P = SamplingParams(n=1, temperature=0.0)


def test_refine_answers_as_model_outputs():
    recs, counts = eval_answers(RECS, TrainedFake(), "seed", "refine", 1, P, tokens=len)
    assert counts == {"answer_from_refine": 3, "empty_answers": 0}
    assert recs[0] == {"id": "e0", "instruction": "q0", "output": "answer!", "generator": "seed", "dataset": "d",
                       "raw": "answer!", "path": "refine", "rounds": 1, "len_chars": 7, "len_tokens": 7}


def test_thoughts_and_empty_answers_are_kept_and_counted():
    class Thinker(FakeGenerator):
        def generate(self, conversations, params):
            return [["plain text"], [""], []][:len(conversations)]
    recs, counts = eval_answers(RECS, Thinker(), "stage2", "thought", 0, P)
    assert len(recs) == 3 and counts == {"answer_from_raw": 3, "empty_answers": 2, "resampled_no_final": 0,
                                         "authors_would_drop": 3}
    assert [r["output"] for r in recs] == ["plain text", "", ""] and all(r["len_tokens"] is None for r in recs)
