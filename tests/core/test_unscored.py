"""Answers the scorer would not score (`scorer.over_long=skip`, the authors' rule: an over-long
request fails and `bt_model` returns None, src/servers.py:52-62) and empty texts (`keep_empty`),
through every consumer of scores, on fakes (control flow only): dropped or left out, and counted."""
from avr_core.scaling import scored_rounds
from avr_core.search import SearchConfig, greedy_search
from avr_core.selection import ThoughtPairRules, thought_pairs
from avr_core.synthesis import Sampling, critique, refine, respond, rm_score
from avr_core.thought_sampling import sample_thoughts
from tests.fakes import FakeGenerator, FakeScorer, ThoughtWriter

X = [{"role": "user", "content": "q"}]


class SkippingScorer(FakeScorer):
    """FakeScorer that returns None for any answer containing "LONG" (as a reward model does
    with `over_long=skip` for an input over its max_length)."""

    def score(self, conversations):
        out = super().score(conversations)
        return [None if "LONG" in c[-1]["content"] else s for c, s in zip(conversations, out)]


def test_rm_score_drops_an_unscored_answer_and_leaves_an_unscored_refinement_out():
    gen = FakeGenerator(critiques=["Meh. Rating: [[5]]"],
                        refinements=lambda conv, j: "LONG refinement" if j == 0 else "a fine refinement")
    recs = [{"id": "a", "messages": X, "answer": "short"}, {"id": "b", "messages": X, "answer": "LONG answer"}]
    crits, _ = critique(recs, gen, 1, Sampling())
    refs, _ = refine(crits, gen, 2, Sampling())
    scored, counts = rm_score(refs, SkippingScorer())
    assert [r["id"] for r in scored] == ["a"]
    assert counts["dropped_unscored_answer"] == 1 and counts["unscored_refinements"] == 2   # a's and b's
    assert ["score" in f for f in scored[0]["critiques"][0]["refinements"]] == [False, True]


def test_greedy_search_never_takes_an_unscored_refinement():
    gen = FakeGenerator(critiques=["Meh. Rating: [[5]]"],
                        refinements=lambda conv, j: "LONG much longer refinement text" if j == 0 else "two words")
    recs = [{"id": "a", "messages": X, "answer": "y"}, {"id": "b", "messages": X, "answer": "LONG"}]
    traces, counts = greedy_search(recs, gen, SkippingScorer(), SearchConfig(k=1, m=2, max_rounds=1),
                                   Sampling(), Sampling())
    assert [t["id"] for t in traces] == ["a"] and counts["dropped_unscored_answer"] == 1
    assert traces[0]["rounds"][0]["best"]["refinement"] == "two words" and counts["unscored_refinements"] == 1


def test_unscored_thoughts_and_answers_give_no_pair():
    class Writer(ThoughtWriter):                  # finals: "ok", "a much longer ... here", "fine answer"
        pass
    scorer = SkippingScorer(fn=lambda text: float(len(text.split())))
    rec = {"id": "p", "messages": X, "answer": "LONG chosen"}
    recs, counts = sample_thoughts([rec], Writer(), scorer, Sampling(), 3, score_answer=True)
    assert counts["unscored_answers"] == 1 and "answer_score" not in recs[0]
    pairs, pc = thought_pairs(recs, ThoughtPairRules(beat_answer=True))
    assert not pairs and pc["thought_pair_no_answer_score"] == 1
    long_final = SkippingScorer(fn=lambda text: float(len(text.split())))
    long_final.score = lambda convs: [None if "longer" in c[-1]["content"] else 1.0 for c in convs]
    recs, counts = sample_thoughts([{"id": "p", "messages": X}], Writer(), long_final, Sampling(), 3)
    assert counts["unscored_thoughts"] == 1 and sum("score" in t for t in recs[0]["thoughts"]) == 2


def test_test_time_scaling_leaves_a_prompt_with_an_unscored_round_out():
    gen = FakeGenerator(critiques=["Meh. Rating: [[5]]"], answer="LONG",
                        refinements=lambda conv, j: "short")
    recs, counts = scored_rounds([{"id": "a", "messages": X}], gen, SkippingScorer(), 1,
                                 Sampling().params(1))
    assert recs == [] and counts["dropped_unscored_prompts"] == 1


def test_keep_empty_keeps_empty_texts_and_drops_only_failed_requests():
    class Empty(FakeGenerator):
        def generate(self, conversations, params):
            out = super().generate(conversations, params)
            return [[] if i == 0 else [" " for _ in o] for i, o in enumerate(out)]   # request 0 failed
    prompts = [{"id": f"p{i}", "messages": X} for i in range(3)]
    ours, c1 = respond(prompts, Empty(), Sampling(), use_dataset_answer=False)
    authors, c2 = respond(prompts, Empty(), Sampling(), use_dataset_answer=False, keep_empty=True)
    assert (len(ours), c1["dropped_failed_answer"], c1["dropped_empty_answer"]) == (0, 1, 2)
    assert (len(authors), c2["dropped_failed_answer"], c2["dropped_empty_answer"]) == (2, 1, 0)
    crits, _ = critique([{"id": i, "messages": X, "answer": "y"} for i in "ab"], FakeGenerator(), 1, Sampling())
    kept, c3 = refine(crits, Empty(), 2, Sampling(), keep_empty=True)
    assert kept[0]["critiques"][0]["refinements"] == [] and c3["dropped_failed_refinements"] == 2
    assert [f["text"] for f in kept[1]["critiques"][0]["refinements"]] == [" ", " "]
