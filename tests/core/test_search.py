"""Greedy search stop rules and thought drop rules on fake backends (control flow only)."""
from avr_core.search import SearchConfig, ThoughtRules, greedy_search, long_thought
from avr_core.synthesis import Sampling
from avr_core.thought import parse_thought
from tests.fakes import FakeGenerator, FakeScorer

RECS = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}], "answer": "a"} for i in range(3)]


class GrowingGenerator(FakeGenerator):
    """Each refinement appends words to the current answer: strictly better under FakeScorer
    (longer = better) until `cap` words, after which it only repeats the answer."""

    def __init__(self, cap: int):
        def refinement(conv, j):
            answer = conv[1]["content"]
            n = len(answer.split())
            return answer if n >= cap else answer + " more" * (j + 1)
        super().__init__(critiques=["Too short. Rating: [[3]]"], refinements=refinement)


def run(cap, rounds=5):
    gen, scorer = GrowingGenerator(cap), FakeScorer()
    traces, counts = greedy_search(RECS, gen, scorer, SearchConfig(k=2, m=2, max_rounds=rounds), Sampling(), Sampling())
    return traces, counts, gen, scorer


def test_stops_when_a_round_does_not_strictly_improve():
    traces, counts, gen, _ = run(cap=4)                     # 1 -> 3 -> 5 words, then no gain
    t = traces[0]
    assert [r["improved"] for r in t["rounds"]] == [True, True, False]
    assert t["stop"] == "no_improvement" and t["final"]["score"] == 5.0
    assert counts["stop_no_improvement"] == 3 and counts["rounds_run"] == 3


def test_stops_after_max_rounds():
    traces, counts, _, _ = run(cap=1000, rounds=5)
    assert all(len(t["rounds"]) == 5 and t["stop"] == "max_rounds" for t in traces)
    assert counts["stop_max_rounds"] == 3


def test_one_call_per_round_for_critiques_and_for_refinements_across_prompts():
    traces, counts, gen, scorer = run(cap=4)
    # per round: critiques (3 prompts, n=2) then refinements (6 critiques, n=2); no retries needed
    sizes = [(n, p.n) for n, p in gen.calls]
    assert sizes == [(3, 2), (6, 2)] * 3
    assert scorer.calls == 1 + 3                             # initial answers, then one per round


def test_no_first_improvement_is_dropped_and_counted():
    traces, _, _, _ = run(cap=1)                             # never improves
    rows, counts = long_thought(traces)
    assert rows == [] and counts["dropped_no_first_improvement"] == 3


def test_improving_to_the_end_has_no_terminating_critique():
    traces, _, _, _ = run(cap=1000, rounds=2)
    rows, counts = long_thought(traces)
    assert rows == [] and counts["dropped_no_terminating_critique"] == 3
    rows, counts = long_thought(traces, ThoughtRules(drop_no_terminating_critique=False))
    assert len(rows) == 3 and parse_thought(rows[0]["messages"][-1]["content"]).final_critique is None


def test_thought_holds_the_whole_trace():
    traces, _, _, _ = run(cap=4)
    rows, counts = long_thought(traces)
    assert counts["thoughts"] == 3
    t = parse_thought(rows[0]["messages"][-1]["content"])
    assert t.answer == "a" and [imp for _, imp in t.steps] == ["a more more", "a more more more more"]
    assert t.final_critique and t.final_answer == "a more more more more"
    assert rows[0]["score_gain"] == 4.0 and rows[0]["rounds"] == 2


def test_a_trace_writing_a_marker_at_a_line_start_is_dropped_and_counted():
    """Such a thought would read back as another round: it is never trained on."""
    from avr_core.prompts import THOUGHT_CRITICIZE
    traces, _, _, _ = run(cap=4)
    traces[1]["answer"] = f"a\n{THOUGHT_CRITICIZE}\nsneaky"
    rows, counts = long_thought(traces)
    assert [r["id"] for r in rows] == ["p0", "p2"] and counts["dropped_marker_in_text"] == 1
    assert counts["thoughts"] == 2
