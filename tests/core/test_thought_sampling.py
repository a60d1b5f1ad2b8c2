"""`thought_sampling.sample_thoughts` on fakes (control flow only): one generator call, one
scorer call on the FINAL answers, fallback paths counted, empty generations never score."""
from avr_core.prompts import THOUGHT_ANSWER, THOUGHT_CRITICIZE, THOUGHT_IMPROVE, THOUGHT_START
from avr_core.synthesis import Sampling
from avr_core.thought import Thought, format_thought
from avr_core.thought_sampling import sample_thoughts
from tests.fakes import FakeGenerator, FakeScorer

RECS = [{"id": "p1", "messages": [{"role": "user", "content": "q1"}]},
        {"id": "p2", "messages": [{"role": "user", "content": "q2"}]}]


class FakeThinker(FakeGenerator):
    """A fake CoT model: per conversation the scripted texts, cut to `params.n`."""

    def __init__(self, texts):
        super().__init__()
        self.texts = texts

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        return [list(self.texts[:params.n]) for _ in conversations]


class RecordingFakeScorer(FakeScorer):
    def __init__(self, fn=None):
        super().__init__(fn)
        self.seen = []

    def score(self, conversations):
        self.seen.append(conversations)
        return super().score(conversations)


def test_final_answers_scored_in_one_call_and_paths_counted():
    cut = f"{THOUGHT_START}\n{THOUGHT_ANSWER}\ndraft\n{THOUGHT_CRITICIZE}\ntoo short\n{THOUGHT_IMPROVE}\nbetter one"
    texts = [format_thought(Thought("draft", [("c", "four words final answer")], "ok")), cut, "plain"]
    gen, scorer = FakeThinker(texts), RecordingFakeScorer()
    recs, counts = sample_thoughts(RECS, gen, scorer, Sampling(seed=3), s=3, salt=2)
    assert [n for n, _ in gen.calls] == [2] and gen.calls[0][1].n == 3
    assert gen.calls[0][1].seed == Sampling(seed=3).params(3, 2).seed          # the salt reaches the sampler
    assert scorer.calls == 1 and len(scorer.seen[0]) == 6
    assert scorer.seen[0][0] == [*RECS[0]["messages"], {"role": "assistant", "content": "four words final answer"}]
    assert counts == {"final_from_final_answer": 2, "final_from_last_improvement": 2, "final_from_raw": 2}
    t = recs[0]["thoughts"]
    assert [x["path"] for x in t] == ["final_answer", "last_improvement", "raw"]
    assert [x["final"] for x in t] == ["four words final answer", "better one", "plain"]
    assert [x["score"] for x in t] == [4.0, 2.0, 1.0] and t[0]["text"] == texts[0]
    assert recs[1] == {"id": "p2", "messages": RECS[1]["messages"], "thoughts": recs[1]["thoughts"]}


def test_no_thoughts_back_means_no_scorer_call():
    scorer = RecordingFakeScorer()
    recs, counts = sample_thoughts(RECS, FakeThinker([]), scorer, Sampling(), s=2)
    assert scorer.calls == 0 and counts == {}
    assert [r["thoughts"] for r in recs] == [[], []]
