"""Selection rules on hand-made scored records (docs/DESIGN.md step 5)."""
import json

from avr_core.prompts import JUDGE_TRAIN, REFINE_TRAIN
from avr_core.selection import SelectRules, select

X = [{"role": "user", "content": "What is 2+2?"}]


def rec(answer="5", s0=3.0, critiques=None):
    """critiques: [(text, [(refinement, score), ...]), ...]"""
    crits = []
    for ci, (text, refs) in enumerate(critiques or []):
        crits.append({"id": f"p1/c{ci}", "text": text, "rating": 3, "forced": False, "tries": 1,
                      "refinements": [{"id": f"p1/c{ci}/r{j}", "text": t, "score": s}
                                      for j, (t, s) in enumerate(refs)]})
    return {"id": "p1", "messages": X, "answer": answer, "answer_score": s0, "critiques": crits}


def kinds(pairs):
    return sorted(p["kind"] for p in pairs)


def test_full_case_builds_rsft_and_three_pair_kinds():
    r = rec(critiques=[("Wrong sum.", [("It is 4.", 9.0), ("Four.", 6.0)]),
                       ("Fine.", [("5, sure.", 2.0), ("Maybe 5.", 3.5)])])
    rsft, pairs, counts = select([r])
    assert len(rsft) == 1
    msgs = rsft[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == JUDGE_TRAIN and msgs[4]["content"] == REFINE_TRAIN
    assert msgs[3]["content"] == "Wrong sum." and msgs[5]["content"] == "It is 4."
    assert kinds(pairs) == ["critique", "refinement", "response"]
    by = {p["kind"]: p for p in pairs}
    assert by["response"]["prompt"] == X and by["response"]["chosen"][0]["content"] == "It is 4."
    assert by["response"]["reward_margin"] == 6.0
    # critique value = mean(refinement scores) - r(y0): (7.5 - 3) vs (2.75 - 3)
    assert by["critique"]["score_chosen"] == 4.5 and by["critique"]["score_rejected"] == -0.25
    assert by["critique"]["prompt"][-1]["content"] == JUDGE_TRAIN
    assert by["refinement"]["prompt"][-2]["content"] == "Wrong sum."
    chosen, rejected = by["refinement"]["chosen"][0]["content"], by["refinement"]["rejected"][0]["content"]
    assert (chosen, rejected) == ("It is 4.", "Four.")
    assert counts["rsft_examples"] == 1 and counts["response_pairs"] == 1


def test_no_improvement_gives_no_rsft_and_no_response_pair():
    r = rec(s0=9.0, critiques=[("c", [("a", 5.0), ("b", 4.0)]), ("d", [("e", 1.0), ("f", 2.0)])])
    rsft, pairs, counts = select([r])
    assert rsft == [] and "response" not in kinds(pairs)
    assert counts["no_improvement"] == 1
    assert counts["critique_pair_no_improvement"] == 1       # best critique never beats y0
    assert counts["refinement_pair_below_answer"] == 1


def test_equal_scores_make_no_pairs():
    r = rec(s0=5.0, critiques=[("c", [("a", 5.0), ("b", 5.0)]), ("d", [("e", 5.0), ("f", 5.0)])])
    rsft, pairs, counts = select([r])
    assert rsft == [] and pairs == []
    assert counts["no_improvement"] == 1
    assert counts["critique_pair_equal_value"] == 1
    assert counts["refinement_pair_equal"] == 1


def test_single_critique_has_no_critique_pair_but_keeps_the_others():
    r = rec(critiques=[("c", [("It is 4.", 8.0), ("Four", 4.0)])])
    rsft, pairs, counts = select([r])
    assert kinds(pairs) == ["refinement", "response"]
    assert counts["critique_pair_single_critique"] == 1 and len(rsft) == 1


def test_redundant_refinement_is_filtered_and_counted():
    loop = "again " * 60
    r = rec(critiques=[("c", [(loop, 9.0), ("ok", 1.0)])])
    rsft, pairs, counts = select([r])
    assert rsft == [] and pairs == []
    assert counts["rsft_dropped_redundant"] == 1 and counts["refinement_pair_redundant"] == 1


def test_redundancy_threshold_is_config():
    r = rec(critiques=[("c", [("again " * 60, 9.0), ("ok", 1.0)])])
    rsft, _, _ = select([r], SelectRules(redundancy_threshold=1000))
    assert len(rsft) == 1


def test_unchanged_copy_is_not_a_refinement():
    r = rec(answer="5", critiques=[("c", [(" 5 ", 9.0), ("4", 4.0)])])
    rsft, pairs, counts = select([r])
    assert counts["dropped_unchanged_copy"] == 1
    assert rsft[0]["messages"][-1]["content"] == "4"           # the copy could not win
    assert counts["refinement_pair_too_few"] == 1


def test_length_filter_needs_both_conditions():
    long = " ".join(f"w{i:03d}" for i in range(200))             # 999 chars vs a 1-char answer
    rsft, pairs, counts = select([rec(critiques=[("c", [(long, 9.0)])])])
    assert rsft == [] and counts["rsft_dropped_length"] == 1
    assert kinds(pairs) == ["response"]                         # the length filter is RSFT-only
    rsft, _, _ = select([rec(critiques=[("c", [(long, 9.0)])])], SelectRules(length_extra_chars=5000))
    assert len(rsft) == 1


def test_no_critiques_is_counted():
    rsft, pairs, counts = select([rec(critiques=[])])
    assert (rsft, pairs) == ([], []) and counts["no_refinements"] == 1


def test_pair_kinds_can_be_switched_off():
    r = rec(critiques=[("a", [("It is 4.", 9.0), ("Four.", 6.0)]), ("b", [("x", 2.0), ("y", 3.5)])])
    _, pairs, _ = select([r], SelectRules(response_pairs=False, critique_pairs=False))
    assert kinds(pairs) == ["refinement"]


def test_outputs_load_with_datasets(tmp_path):
    import datasets

    r = rec(critiques=[("a", [("It is 4.", 9.0), ("Four.", 6.0)]), ("b", [("x", 2.0), ("y", 3.5)])])
    rsft, pairs, _ = select([r, {**r, "id": "p2"}])
    for name, rows in (("rsft", rsft), ("pairs", pairs)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps(x) + "\n" for x in rows))
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
        assert len(ds) == len(rows)
    assert set(ds.column_names) >= {"prompt", "chosen", "rejected", "prompt_id", "critique_id",
                                    "score_chosen", "score_rejected"}
    assert "tools" not in ds.column_names and "chat_template_kwargs" not in ds.column_names


def thoughts(*spec):
    """spec: (final answer, score) per sampled thought."""
    return {"id": "p1", "messages": X, "thoughts": [{"text": f"<thought>{f}", "final": f, "path": "final_answer",
                                                       "score": s} for f, s in spec]}


def test_thought_pair_best_vs_worst_when_best_is_shorter():
    from avr_core.selection import thought_pairs
    pairs, counts = thought_pairs([thoughts(("4", 9.0), ("a long wrong answer", 2.0), ("four", 5.0))])
    assert len(pairs) == 1 and pairs[0]["chosen"][0]["content"] == "<thought>4"
    assert pairs[0]["rejected"][0]["content"] == "<thought>a long wrong answer" and pairs[0]["reward_margin"] == 7.0


def test_length_control_picks_the_best_answer_no_longer_than_the_worst():
    from avr_core.selection import ThoughtPairRules, thought_pairs
    s = thoughts(("a very very long best answer", 9.0), ("short bad", 1.0), ("okay", 5.0))
    pairs, _ = thought_pairs([s])
    assert pairs[0]["chosen"][0]["content"] == "<thought>okay"                 # 9.0 was longer than the worst
    assert pairs[0]["len_chosen_final"] <= pairs[0]["len_rejected_final"]
    pairs, counts = thought_pairs([s], ThoughtPairRules(length_rule="drop"))
    assert pairs == [] and counts["thought_pair_length"] == 1


def test_thought_pair_margin_and_too_few():
    from avr_core.selection import ThoughtPairRules, thought_pairs
    pairs, counts = thought_pairs([thoughts(("a", 5.0), ("bb", 5.0)), thoughts(("a", 5.0))])
    assert pairs == [] and counts["thought_pair_length"] + counts["thought_pair_margin"] == 1
    assert counts["thought_pair_too_few"] == 1
    pairs, counts = thought_pairs([thoughts(("a", 5.5), ("bb", 5.0))], ThoughtPairRules(min_margin=1.0))
    assert pairs == [] and counts["thought_pair_margin"] == 1
