"""Paper parity (issue 13, stage 1): the `paper` preset reproduces the authors' pipeline rule for rule.

The authors' release is github.com/Banner-Z/AvR at commit a3883a1; file:line below cite it. Each
hand-made record's expected output was worked out by hand from their code; the property test at the
end checks `select` under the paper rules against an independent transliteration of their
stage1_data_scoring.py `scoring` + prepare_sft_data.py / prepare_dpo_data.py `prepare` (written
here from their source, not from avr_core) on many random scored records.
"""
import json
import re
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from avr_core import prompts as P
from avr_core.config import ConfigError, load_config, resolve_max_new_tokens
from avr_core.inputs import InputError, load_prompts
from avr_core.selection import PAPER_RULES, SelectRules, rsft_mix, select
from avr_core.synthesis import Sampling, refine

# -- 1. prompt texts, word for word (copied verbatim from the authors' files) --------------------
ACTIONS_JUDGE_SYSTEM = 'Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation should focus on the assistant\'s answer to the last user question. Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate the response at the end of your answer on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'  # noqa: E501
ACTIONS_REFINE_JUDGE = 'Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Your evaluation should focus on the assistant\'s answer to the last user question. Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate the response at the end of your answer on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'  # noqa: E501
ACTIONS_REFINE_SYSTEM = "Please revise the AI assistant's response based on the evaluation provided below, addressing any shortcomings mentioned in the review. Your revision should focus solely on improving the assistant's answer to the last user question. Provide the revised response directly, without any additional commentary.\n\n"  # noqa: E501
SFT_JUDGE_PROMPT = 'Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed above. Your evaluation should focus on the assistant\'s answer to the last user question and give the strengths and weaknesses of that answer. Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate the response at the end of your answer on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'  # noqa: E501
DPO_JUDGE_PROMPT = 'Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed above. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation should focus on the assistant\'s answer to the last user question. Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate the response at the end of your answer on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'  # noqa: E501
CORRECT_PROMPT = "Please revise the AI assistant's response based on the evaluation provided above, addressing any shortcomings mentioned in the review. Your revision should focus solely on improving the the assistant's answer to the last user question. Provide the revised response directly, without any additional commentary.\n\n"  # noqa: E501


def test_prompt_texts_are_the_authors_word_for_word():
    assert P.JUDGE_SAMPLING == ACTIONS_JUDGE_SYSTEM.replace("below", "above")           # actions.py:9,18
    assert P.JUDGE_REFINE_CONVERSATION == ACTIONS_REFINE_JUDGE.replace("below", "above")  # actions.py:42,54
    assert P.REFINE_SAMPLING == ACTIONS_REFINE_SYSTEM.replace("below", "above")          # actions.py:44,56
    assert P.JUDGE_SFT_DATA == SFT_JUDGE_PROMPT                                          # prepare_sft_data.py:5
    assert P.JUDGE_DPO_DATA == DPO_JUDGE_PROMPT                                          # prepare_dpo_data.py:5
    assert P.REFINE_DATA == CORRECT_PROMPT                                               # prepare_*_data.py:7
    assert "You evaluation" in P.JUDGE_SAMPLING and "Your evaluation" in P.JUDGE_REFINE_CONVERSATION
    assert "strengths and weaknesses" in P.JUDGE_SFT_DATA and "consider factors" not in P.JUDGE_SFT_DATA
    assert P.JUDGE_TRAIN is P.JUDGE_DPO_DATA and P.REFINE_TRAIN is P.REFINE_DATA


class _Recorder:
    """Records the conversations a refine round sends (control flow only)."""

    def __init__(self):
        self.convs = []

    def generate(self, conversations, params):
        self.convs.extend(conversations)
        return [["Better."] * params.n for _ in conversations]


def _critiqued():
    return [{"id": "p", "messages": [{"role": "user", "content": "q"}], "answer": "a",
             "critiques": [{"id": "p/c0", "text": "Meh. Rating: [[4]]", "rating": 4}]}]


@pytest.mark.parametrize("preset,judge", [("paper", P.JUDGE_REFINE_CONVERSATION), ("tiny", P.JUDGE_SAMPLING)])
def test_refine_conversation_judge_text_per_preset(preset, judge):
    # actions.py:52-56 (v2): [x, y0, JUDGE_PROMPT("Your evaluation"), c, SYSTEM_PROMPT]
    cfg = load_config(preset, ["data.prompts=avr_core/data/tiny_prompts.jsonl"])
    gen = _Recorder()
    refine(_critiqued(), gen, 1, Sampling(), judge=P.CONVERSATION_JUDGES[cfg.refine.conversation_judge])
    conv = gen.convs[0]
    assert [m["content"] for m in conv[2:]] == [judge, "Meh. Rating: [[4]]", P.REFINE_SAMPLING]


# -- 2. the paper preset sets every option to the authors' behaviour ---------------------------
def test_paper_preset_is_the_authors_and_base_tiny_keep_ours():
    paper = load_config("paper")
    assert SelectRules(**paper.select) == PAPER_RULES
    assert paper.refine.conversation_judge == "refine"
    assert paper.data.prompts == "hf://princeton-nlp/llama3-ultrafeedback-armorm:train"   # stage1_generation.sh:3
    assert list(paper.data.stage1_sft) == [0, None] == list(paper.data.stage1_po)         # one run, whole split
    assert list(paper.data.stage2) == [0, 10000]                   # cot_generation.sh:7-8
    assert list(paper.data.stage2_po) == [20000, 25000]            # cot_dpo_generation.sh:7-8
    for stage in ("respond", "critique", "refine", "tts"):         # servers.py:27-32: no max_tokens
        assert paper[stage].sampling.max_new_tokens is None
    assert (paper.tts.sampling.temperature, paper.tts.sampling.top_p) == (0.7, 0.8)   # servers.py:27-29
    assert paper.respond.keep_empty and paper.refine.keep_empty    # stage1_data_generation.py:18-23,32
    assert paper.scorer.over_long == "skip" and paper.scorer.max_length == 8192   # servers.py:52-62
    assert paper.eval.lc_min_annotations == 0                      # alpaca-eval: no minimum
    for preset in ("base", "tiny"):
        cfg = load_config(preset)
        assert SelectRules(**cfg.select) == SelectRules() and cfg.refine.conversation_judge == "sampling"
        assert (cfg.respond.keep_empty, cfg.refine.keep_empty, cfg.scorer.over_long) == (False, False, "truncate")
        assert cfg.eval.lc_min_annotations == 10 and cfg.tts.sampling.temperature == 0.0


def test_max_new_tokens_null_resolves_to_the_context():
    assert resolve_max_new_tokens(None, {"kind": "hf", "max_model_len": 8192}) == 8192
    assert resolve_max_new_tokens(None, {"kind": "openai", "max_model_len": 8192}) is None
    assert load_config("tiny", ["refine.sampling.max_new_tokens=null"]).refine.sampling.max_new_tokens is None
    assert load_config("tiny", ["eval.sampling.max_new_tokens=null"]).eval.sampling.max_new_tokens is None
    assert load_config("tiny", ["tts.sampling.max_new_tokens=null"]).tts.sampling.max_new_tokens is None
    with pytest.raises(ConfigError, match="tts.sampling.max_new_tokens"):
        load_config("tiny", ["tts.sampling.max_new_tokens=0"])
    with pytest.raises(ConfigError, match="data.stage2"):
        load_config("tiny", ["data.stage2=[0,null]"])
    with pytest.raises(ConfigError, match="select.ties"):
        load_config("tiny", ["select.ties=last"])


# -- 3. stage-1 rules, one hand-made record each --------------------------------------------------
X = [{"role": "user", "content": "What is 2+2?"}]
RED = "ha " * 60                      # prepare_dpo_data.py:59-87 check_redundancy: a word 60 times


def rec(critiques, answer="five", s0=3.0):
    """critiques: [(text, [(refinement, score | None), ...]), ...] in sampling order."""
    crits = []
    for ci, (text, refs) in enumerate(critiques):
        fs = [{"id": f"p1/c{ci}/r{j}", "text": t, **({} if s is None else {"score": s})}
              for j, (t, s) in enumerate(refs)]
        crits.append({"id": f"p1/c{ci}", "text": text, "rating": 3, "refinements": fs})
    return {"id": "p1", "messages": X, "answer": answer, "answer_score": s0, "critiques": crits}


def texts(pairs):
    return {p["kind"]: (p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs}


def test_best_refinement_last_maximum_wins():
    # stage1_data_scoring.py:29-31 `score >= best_score`: of equal best scores the LAST is y*
    r = rec([("C0", [("four", 8.0), ("4", 8.0)]), ("C1", [("IV", 8.0), ("six", 1.0)])])
    rsft, pairs, _ = select([r], PAPER_RULES)
    assert rsft[0]["messages"][-1]["content"] == "IV" and texts(pairs)["response"] == ("IV", "five")
    assert select([r])[0][0]["messages"][-1]["content"] == "four"          # ours: the first


def test_rsft_example_uses_the_sft_judge_text_and_no_redundancy_check():
    # prepare_sft_data.py:55-64: only improvement and length rules; JUDGE_PROMPT of that file
    r = rec([("C0", [(RED, 9.0), ("x", 1.0)]), ("C1", [("y", 2.0), ("z", 2.0)])])
    rsft, pairs, counts = select([r], PAPER_RULES)
    assert [m["content"] for m in rsft[0]["messages"]] == ["What is 2+2?", "five", P.JUDGE_SFT_DATA, "C0",
                                                          P.REFINE_DATA, RED]
    # ...while prepare_dpo_data.py:108-110 skips the record's pairs for a redundant y*
    assert pairs == [] and counts["record_gate_skipped"] == 1
    ours_rsft, ours_pairs, _ = select([r])
    assert ours_rsft == [] and "critique" in texts(ours_pairs)


def test_redundant_answer_skips_every_pair_of_the_record():
    # prepare_dpo_data.py:102-104: `continue` before any pair
    r = rec([("C0", [("four", 9.0), ("4", 2.0)]), ("C1", [("six", 1.0), ("4?", 1.5)])], answer=RED)
    rsft, pairs, _ = select([r], PAPER_RULES)
    assert pairs == [] and len(rsft) == 1
    assert sorted(texts(select([r])[1])) == ["critique", "refinement"]     # ours keeps those two


def test_no_improvement_skips_every_pair_of_the_record():
    # prepare_dpo_data.py:112-113: refinement score - source score <= 0 -> `continue`
    r = rec([("C0", [("four", 5.0), ("4", 4.0)]), ("C1", [("six", 1.0), ("4?", 2.0)])], s0=5.0)
    assert select([r], PAPER_RULES)[:2] == ([], [])
    assert sorted(texts(select([r])[1])) == ["critique", "refinement"]


def test_single_critique_gives_no_refinement_pair():
    # prepare_dpo_data.py:151-153: best_judgement == worst_judgement -> "no better judgement", `continue`
    r = rec([("C0", [("four", 9.0), ("4", 5.0)])])
    assert sorted(texts(select([r], PAPER_RULES)[1])) == ["response"]
    assert sorted(texts(select([r])[1])) == ["refinement", "response"]


def test_redundant_best_critique_skips_the_refinement_pair():
    # prepare_dpo_data.py:147-149: a redundant best judgement -> `continue`
    r = rec([("bad " * 60, [("four", 9.0), ("4", 5.0)]), ("C1", [("six", 1.0), ("4?", 2.0)])])
    assert sorted(texts(select([r], PAPER_RULES)[1])) == ["response"]
    assert sorted(texts(select([r])[1])) == ["refinement", "response"]


def test_redundant_worst_critique_drops_only_the_critique_pair():
    # prepare_dpo_data.py:155-156: printed, no `continue`: the refinement pair is still made
    r = rec([("C0", [("four", 9.0), ("4", 5.0)]), ("bad " * 60, [("six", 1.0), ("4?", 2.0)])])
    assert texts(select([r], PAPER_RULES)[1]) == {"response": ("four", "five"), "refinement": ("four", "4")}


def test_best_critique_below_the_answer_skips_both():
    # prepare_dpo_data.py:143-145 (chosen_score < source_score) and :151 (max(bj_scores) < source_score)
    # c+ = C0 (mean 2.85 > 2.25) never beats r(y0) = 3; y* = "six" (9.0) comes from C1
    r = rec([("C0", [("four", 2.9), ("4", 2.8)]), ("C1", [("six", 9.0), ("4?", 0.0), ("x", 0.0), ("y", 0.0)])])
    assert sorted(texts(select([r], PAPER_RULES)[1])) == ["response"]
    assert sorted(texts(select([r])[1])) == ["response"]          # ours too (no improvement / below answer)


def test_refinement_pair_skipped_when_rejected_scores_like_the_answer():
    # prepare_dpo_data.py:166-167: rejected_score == source_score -> `continue`
    r = rec([("C0", [("four", 9.0), ("4", 3.0)]), ("C1", [("six", 1.0), ("4?", 2.0)])], s0=3.0)
    assert sorted(texts(select([r], PAPER_RULES)[1])) == ["critique", "response"]
    assert sorted(texts(select([r])[1])) == ["critique", "refinement", "response"]


def test_critiques_grouped_by_identical_text():
    # stage1_data_scoring.py:47-53: refinements grouped by judgement text; strict `>` / `<` (:62, :65);
    # prepare_dpo_data.py:46-49: sorted(reverse=True) is stable: first of the best, LAST of the worst
    r = rec([("X", [("a", 6.0), ("b", 6.0)]), ("Y", [("c", 2.0), ("d", 2.0)]), ("X", [("e", 2.0), ("f", 2.0)])],
            s0=1.0)
    rsft, pairs, _ = select([r], PAPER_RULES)
    by = {p["kind"]: p for p in pairs}
    assert rsft[0]["messages"][-1]["content"] == "b"                       # last of the 6.0s
    assert texts(pairs)["critique"] == ("X", "Y") and by["critique"]["score_chosen"] == 4.0 - 1.0
    assert texts(pairs)["refinement"] == ("a", "f") and by["refinement"]["prompt"][-2]["content"] == "X"
    ours = texts(select([r])[1])
    assert ours["critique"] == ("X", "Y") and "refinement" not in ours       # ours: c0 alone, 6.0 == 6.0


def test_unchanged_copy_is_a_candidate():
    # stage1_data_scoring.py:21-31 has no such filter: a copy of y0 that scores higher is y*
    r = rec([("C0", [("five", 7.0), ("4", 5.0)]), ("C1", [("six", 1.0), ("4?", 2.0)])])
    assert texts(select([r], PAPER_RULES)[1])["response"] == ("five", "five")
    assert texts(select([r])[1])["response"] == ("4", "five")


def test_rsft_mix_adds_every_unused_chosen_conversation():
    # prepare_sft_data.py:67 used_messages = [x, y0] of each example; :72-74 every dataset `chosen`
    # not among them; :89 deduplicate_data
    prompts = [{"id": "a", "messages": X, "answer": "five"},                 # == [x, y0] of the example
               {"id": "b", "messages": [{"role": "user", "content": "hi"}], "answer": "hello"},
               {"id": "c", "messages": [{"role": "user", "content": "hi"}], "answer": "hello"},  # duplicate
               {"id": "d", "messages": [{"role": "user", "content": "q"}], "answer": None}]
    rsft = select([rec([("C0", [("four", 9.0)])])], PAPER_RULES)[0]
    mixed, counts = rsft_mix(prompts, rsft)
    hi = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert [m["messages"] for m in mixed] == [hi]
    assert counts == Counter(mix_used=1, mix_duplicate=1, mix_no_chosen=1, mix_examples=1)


# -- 4. prompt files with a `chosen` conversation; the hub dataset -----------------------------
def _armorm_row(i):
    return {"prompt_id": f"h{i}", "prompt": f"Q{i}?",
            "chosen": [{"content": f"Q{i}?", "role": "user"}, {"content": f"A{i}.", "role": "assistant"}],
            "rejected": [{"content": f"Q{i}?", "role": "user"}, {"content": "no", "role": "assistant"}],
            "all_rm_scores": [0.1, 0.2]}


def test_chosen_rows_load_as_prompt_and_answer(tmp_path):
    f = tmp_path / "armorm.jsonl"          # what ds.to_json(...) of the hub dataset writes
    f.write_text("".join(json.dumps(_armorm_row(i)) + "\n" for i in range(3)))
    recs = load_prompts(str(f))
    assert recs[1]["messages"] == [{"role": "user", "content": "Q1?"}] and recs[1]["answer"] == "A1."
    bad = tmp_path / "bad.jsonl"
    no_answer = {"chosen": [{"role": "user", "content": "q"}]}
    bad.write_text(json.dumps(_armorm_row(0)) + "\n" + json.dumps(no_answer) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: field 'chosen\[0\].role': .*end in an 'assistant'"):
        load_prompts(str(bad))
    bad.write_text(json.dumps({"chosen": [{"role": "bot", "content": "q"}]}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: field 'chosen\[0\].role'"):
        load_prompts(str(bad))


def test_hub_dataset_loads_with_datasets_and_fails_clearly_offline(monkeypatch):
    import datasets

    seen = []

    def fake_load(name, split):
        seen.append((name, split))
        return datasets.Dataset.from_list([_armorm_row(i) for i in range(4)])
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    recs = load_prompts("hf://princeton-nlp/llama3-ultrafeedback-armorm:train")
    assert seen == [("princeton-nlp/llama3-ultrafeedback-armorm", "train")] and recs[3]["answer"] == "A3."

    def offline(name, split):
        raise ConnectionError("Couldn't reach 'princeton-nlp/llama3-ultrafeedback-armorm' on the Hub\n"
                              "(LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError) as e:
        load_prompts("hf://princeton-nlp/llama3-ultrafeedback-armorm:train")
    msg = str(e.value)
    assert "\n" not in msg and "'princeton-nlp/llama3-ultrafeedback-armorm'" in msg
    assert "download it" in msg and "local JSONL" in msg


# -- 5. property: select(paper) == the authors' scripts, transliterated ---------------------------
def check_redundancy(text, threshold=60):                 # prepare_dpo_data.py:59-87, verbatim logic
    def tokenize(text):
        if re.search(r'[a-zA-Z]', text):
            return re.findall(r'\b\w+\b', text.lower())
        return list(text)
    symbols = re.findall(r'[\d\W]+', text.replace(' ', ''))
    if any(c >= threshold for c in Counter(symbols).values()):
        return True
    return any(c >= threshold for c in Counter(tokenize(text)).values())


def authors(record):
    """Our scored record through the authors' scripts: returns (sft messages, dpo (messages, chosen, rejected))."""
    messages = [*record["messages"], {"role": "assistant", "content": record["answer"]}]
    # stage1_data_generation.py:34 one entry per (judgement, refinement); utils.py:75-98 groups them
    entries = [{"judgement": c["text"], "refined_response": f["text"], "score": f.get("score")}
               for c in record["critiques"] for f in c["refinements"]]
    # stage1_data_scoring.py:13-67 (source_score is the RM's r(y0))
    source_score = record["answer_score"]
    best_score, best_record, refinements = source_score, None, []
    for r in entries:
        if r["score"] is None:
            continue
        refinements.append(r)
        if r["score"] >= best_score:
            best_score, best_record = r["score"], r
    if best_record is None:
        return [], []
    j_dict = {}
    for r in refinements:
        j_dict.setdefault(json.dumps(r["judgement"]), []).append({"refined_response": r["refined_response"],
                                                                   "score": r["score"]})
    best_j, best_j_score, worst_j, worst_j_score = None, -10000000, None, 10000000
    for j, r_list in j_dict.items():
        j_score = sum(i["score"] for i in r_list) / len(r_list)
        if j_score > best_j_score:
            best_j_score, best_j = j_score, {"judgement": json.loads(j), "refinements": r_list}
        if j_score < worst_j_score:
            worst_j_score, worst_j = j_score, {"judgement": json.loads(j), "refinements": r_list}
    d = {"messages": messages, "source_score": source_score, "refinement": best_record,
         "best_judgement": best_j, "worst_judgement": worst_j}
    # prepare_sft_data.py:53-67
    sft = []
    if not d["refinement"]["score"] - d["source_score"] <= 0:
        y, y0 = d["refinement"]["refined_response"], messages[-1]["content"]
        if len(y) - len(y0) < 400 or len(y) / len(y0) < 1.2:
            sft.append([*messages, {"role": "user", "content": SFT_JUDGE_PROMPT},
                        {"role": "assistant", "content": d["refinement"]["judgement"]},
                        {"role": "user", "content": CORRECT_PROMPT}, {"role": "assistant", "content": y}])
    # prepare_dpo_data.py:100-178, one record
    result = []

    def find_extreme_responses(data):                  # :42-54
        if not data or len(data) < 2:
            return None, None, None, None
        s = sorted(data, key=lambda x: x['score'], reverse=True)
        if s[0]['score'] <= s[-1]['score']:
            return None, None, None, None
        return s[0]['refined_response'], s[-1]['refined_response'], s[0]['score'], s[-1]['score']

    def dpo():
        if check_redundancy(messages[-1]["content"]) or check_redundancy(d["refinement"]["refined_response"]):
            return
        if d["refinement"]["score"] - d["source_score"] <= 0:
            return
        result.append((messages[:-1], d["refinement"]["refined_response"], messages[-1]["content"]))
        bj_scores = [x["score"] for x in best_j["refinements"]]
        wj_scores = [x["score"] for x in worst_j["refinements"]]
        avg_bj, avg_wj = sum(bj_scores) / len(bj_scores), sum(wj_scores) / len(wj_scores)
        judge_message = [*messages, {"role": "user", "content": DPO_JUDGE_PROMPT}]
        correct_message = [*judge_message, {"role": "assistant", "content": best_j["judgement"]},
                           {"role": "user", "content": CORRECT_PROMPT}]
        cc, rc, cs, rs = find_extreme_responses(best_j["refinements"])
        if cs is not None and cs < d["source_score"]:
            return
        if check_redundancy(best_j["judgement"]):
            return
        if best_j["judgement"] == worst_j["judgement"] or avg_bj <= avg_wj or max(bj_scores) < d["source_score"]:
            return
        if not check_redundancy(worst_j["judgement"]):
            result.append((judge_message, best_j["judgement"], worst_j["judgement"]))
        if cc is not None and rc is not None:
            if rs == d["source_score"]:
                return
            if not (check_redundancy(cc) or check_redundancy(rc)):
                result.append((correct_message, cc, rc))
    dpo()
    return sft, result


SCORES = st.sampled_from([1.0, 2.0, 3.0, 5.0, None])
REF_TEXTS = st.sampled_from(["four", "4", "four!", "y0", "x" * 600, RED, "1 2 " * 30])
CRIT_TEXTS = st.sampled_from(["C1", "C2", "C3", "bad " * 60])


@st.composite
def scored_records(draw):
    answer = draw(st.sampled_from(["y0", "Some answer.", RED]))
    crits = []
    for _ in range(draw(st.integers(1, 4))):
        refs = draw(st.lists(st.tuples(REF_TEXTS, SCORES), min_size=0, max_size=4))
        crits.append((draw(CRIT_TEXTS), [(answer if t == "y0" else t, s) for t, s in refs]))
    return rec(crits, answer=answer, s0=draw(st.sampled_from([1.0, 2.0, 3.0, 5.0])))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scored_records())
@pytest.mark.slow
def test_select_paper_agrees_with_the_authors_scripts(record):
    sft, dpo = authors(record)
    rsft, pairs, _ = select([record], PAPER_RULES)
    assert [ex["messages"] for ex in rsft] == sft
    assert [(p["prompt"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == dpo


@pytest.mark.slow
def test_the_property_exercises_every_rule():
    """The generator reaches each branch: a guard against a property that passes vacuously."""
    seen = Counter()

    @settings(max_examples=600, deadline=None, database=None)
    @given(scored_records())
    def run(record):
        _, _, counts = select([record], PAPER_RULES)
        seen.update(k for k, v in counts.items() if v)
    run()
    for key in ("record_gate_skipped", "refinement_pair_no_critique_gate", "refinement_pair_rejected_at_answer",
                "critique_pair_redundant", "rsft_dropped_length", "response_pair_redundant", "critique_pairs",
                "refinement_pairs", "unscored_refinements", "rsft_examples"):
        assert seen[key] > 0, key
