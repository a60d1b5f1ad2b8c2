"""The sampling rounds on a FakeGenerator: batching, retries, forcing, drops."""
from avr_core.prompts import FORCED_RATING_PREFIX, REFINE_SAMPLING
from avr_core.synthesis import Sampling, critique, refine, respond, rm_score
from tests.fakes import FakeGenerator, FakeScorer

PROMPTS = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}], "answer": None} for i in range(5)]


def test_respond_uses_dataset_answer_or_one_batched_call():
    gen = FakeGenerator(answer="y0")
    recs = [*PROMPTS[:2], {**PROMPTS[2], "answer": "given"}]
    out, counts = respond(recs, gen, Sampling())
    assert [r["answer"] for r in out] == ["y0", "y0", "given"]
    assert [r["answer_source"] for r in out] == ["policy", "policy", "dataset"]
    assert len(gen.calls) == 1 and gen.calls[0][0] == 2


def answered():
    return [{**p, "answer": "y0"} for p in PROMPTS]


def test_critique_round_is_one_call_with_n_samples():
    gen = FakeGenerator(critiques=["Bad. Rating: [[2]]"])
    out, counts = critique(answered(), gen, k=3, sampling=Sampling(), max_tries=5)
    assert len(gen.calls) == 1 and gen.calls[0][0] == 5 and gen.calls[0][1].n == 3
    assert all(len(r["critiques"]) == 3 for r in out)
    assert out[0]["critiques"][1]["id"] == "p0/c1" and out[0]["critiques"][0]["rating"] == 2


def test_unparsable_critiques_are_resampled_in_one_call_per_round_then_dropped():
    # the script alternates: good, bad, bad, bad, ... so only the first slot ever parses
    gen = FakeGenerator(critiques=["Ok. Rating: [[6]]"] + ["no rating"] * 100)
    out, counts = critique(answered()[:2], gen, k=2, sampling=Sampling(), max_tries=3)
    # round 1: 2 convs x n=2; retries: one call each for the still-failing slots
    assert [c[0] for c in gen.calls] == [2, 3, 3]
    assert counts["critiques_unparsable"] == 3 and counts["dropped_critiques"] == 3
    assert counts["critique_resamples"] == 6
    assert sum(len(r["critiques"]) for r in out) == 1       # p1 lost both slots...
    assert counts["dropped_no_critique"] == 1               # ...and is dropped, counted


def test_force_rating_completes_and_marks_the_critique():
    gen = FakeGenerator(critiques=["vague words"], forced="8]]")
    out, counts = critique(answered()[:1], gen, k=2, sampling=Sampling(), max_tries=2, force_rating=True)
    c = out[0]["critiques"][0]
    assert c["forced"] is True and c["rating"] == 8
    assert c["text"] == "vague words" + FORCED_RATING_PREFIX + "8]]"
    assert counts["critiques_forced"] == 2
    assert gen.calls[-1][1].temperature == 0.0                # the forced completion is greedy


def test_force_rating_that_still_fails_is_dropped():
    gen = FakeGenerator(critiques=["vague"], forced="great]]")
    out, counts = critique(answered()[:1], gen, k=1, sampling=Sampling(), max_tries=1, force_rating=True)
    assert out == [] and counts["forced_rating_failed"] == 1


def test_refine_then_score_in_one_call_each():
    gen = FakeGenerator(critiques=["Bad. Rating: [[2]]"])
    crits, _ = critique(answered()[:3], gen, k=2, sampling=Sampling())
    gen.calls.clear()
    refs, counts = refine(crits, gen, m=2, sampling=Sampling())
    assert len(gen.calls) == 1 and gen.calls[0][0] == 6 and gen.calls[0][1].n == 2
    assert refs[0]["critiques"][1]["refinements"][1]["id"] == "p0/c1/r1"
    scorer = FakeScorer()
    scored, _ = rm_score(refs, scorer)
    assert scorer.calls == 1
    assert scored[0]["answer_score"] == 1.0
    assert scored[0]["critiques"][0]["refinements"][0]["score"] == 5.0   # "Better answer #0 to: q0": 5 words


def test_a_failed_request_drops_only_its_samples():
    class Flaky(FakeGenerator):
        def generate(self, conversations, params):
            out = super().generate(conversations, params)
            if conversations[0][-1]["content"] == REFINE_SAMPLING:
                out[0] = []                                       # request 0 failed for good
            return out
    gen = Flaky(critiques=["Bad. Rating: [[2]]"])
    crits, _ = critique(answered()[:2], gen, k=1, sampling=Sampling(), max_tries=1)
    refs, counts = refine(crits, gen, m=2, sampling=Sampling())
    assert counts["dropped_failed_refinements"] == 2 and not counts["dropped_empty_refinements"]
    assert refs[0]["critiques"][0]["refinements"] == [] and len(refs[1]["critiques"][0]["refinements"]) == 2
