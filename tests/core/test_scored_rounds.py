"""`scaling.scored_rounds` on fakes: R rounds through `answer_prompts`, then ONE scorer call
over the answer after every round of every prompt, in prompt-then-round order."""
from avr_core.backends.base import SamplingParams
from avr_core.scaling import scaling_table, scored_rounds
from tests.core.test_inference import TrainedFake
from tests.fakes import FakeScorer

RECS = [{"id": "p1", "messages": [{"role": "user", "content": "q1"}]},
        {"id": "p2", "messages": [{"role": "user", "content": "q2"}]}]
P = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)


def test_every_round_scored_in_one_call():
    gen, scorer = TrainedFake(), FakeScorer(fn=lambda t: float(len(t)))
    recs, counts = scored_rounds(RECS, gen, scorer, 2, P)
    assert scorer.calls == 1 and counts == {"answers_scored": 6}
    assert [n for n, _ in gen.calls] == [2] * 5              # answer, then (critique, refine) x 2
    assert recs[0]["answers"] == ["answer", "answer!", "answer!!"] and recs[0]["scores"] == [6.0, 7.0, 8.0]
    assert recs[0]["trace"] == [{"critique": "Add emphasis.", "refinement": "answer!"},
                                {"critique": "Add emphasis.", "refinement": "answer!!"}]
    assert set(recs[1]) == {"id", "messages", "answers", "scores", "trace"} and recs[1]["id"] == "p2"
    assert [r["mean"] for r in scaling_table(recs)] == [6.0, 7.0, 8.0]     # what tts_curve reads


def test_zero_rounds_scores_the_direct_answer():
    recs, counts = scored_rounds(RECS, TrainedFake(), FakeScorer(), 0, P)
    assert counts == {"answers_scored": 2} and [r["scores"] for r in recs] == [[1.0], [1.0]]
    assert all(r["trace"] == [] for r in recs)
