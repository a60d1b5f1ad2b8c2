"""Paper parity (issue 13, stage 2 and evaluation): the `paper` preset's Stage-2 and evaluation rules
against hand-made records.

The authors' release is github.com/Banner-Z/AvR at commit a3883a1; file:line below cite it. Each
expected output was worked out by hand from their code; the rules are run as `conf/paper.yaml` sets
them (read from the config, not restated), and where ours differs the `tiny` preset's result is
checked too.
"""
import pytest

from avr_core.backends.base import SamplingParams
from avr_core.config import load_config
from avr_core.evaluation import evalset as es
from avr_core.evaluation.metrics import _frame, _prefs, lc_win_rate
from avr_core.inference import eval_answers
from avr_core.inputs import InputError
from avr_core.prompts import THOUGHT_END
from avr_core.search import SearchConfig, ThoughtRules, greedy_search, long_thought, search_starts_from_dataset
from avr_core.selection import ThoughtPairRules, thought_pairs
from avr_core.synthesis import Sampling, respond
from avr_core.thought import extract_final_answer, extract_final_answer_authors, final_answer
from avr_core.thought_sampling import sample_thoughts
from tests.fakes import FakeGenerator, FakeScorer

PAPER, TINY = load_config("paper"), load_config("tiny")
Q = [{"role": "user", "content": "q"}]


def thought_rules(cfg) -> ThoughtRules:
    s = cfg.search
    return ThoughtRules(s.drop_no_first_improvement, s.drop_no_terminating_critique, s.drop_redundant_answer,
                        s.drop_marker_in_text, cfg.select.redundancy_threshold)


def pair_rules(cfg) -> ThoughtPairRules:
    t = cfg.thought
    return ThoughtPairRules(min_margin=t.min_margin, length_rule=t.length_rule, beat_answer=t.beat_answer)


# -- the presets ---------------------------------------------------------------------------------
def test_paper_sets_the_authors_stage2_and_eval_rules_base_tiny_keep_ours():
    assert (PAPER.search.start, PAPER.search.drop_redundant_answer, PAPER.search.drop_marker_in_text) == \
        ("dataset", True, False)
    t = PAPER.thought
    assert (t.s, t.extract, t.final_answer_tries, t.drop_no_final, t.beat_answer, t.length_rule) == \
        (5, "authors", 2, True, True, "drop")        # cot_dpo_generation.sh:6; cot_dpo_data_generation.py:21
    e = PAPER.eval
    assert (e.sampling.temperature, e.sampling.top_p, e.sampling.max_new_tokens) == (0.7, 0.8, None)  # eval :35-38
    assert (e.extract, e.final_answer_tries, e.references, e.df_gamed) == ("authors", 5, "hub", "hub")
    assert PAPER.thought.sampling.max_new_tokens is None                          # servers.py:28 commented out
    for cfg in (load_config("base"), TINY):
        assert (cfg.search.start, cfg.search.drop_marker_in_text) == ("respond", True)
        t = cfg.thought
        assert (t.extract, t.final_answer_tries, t.drop_no_final, t.beat_answer, t.length_rule) == \
            ("ours", 1, False, False, "pick")
        assert (cfg.eval.extract, cfg.eval.final_answer_tries, cfg.eval.references) == ("ours", 1, "file")


# -- 1. the final answer, the authors' way (src/utils.py:148-153) ----------------------------------
def test_final_answer_authors_regex():
    # re.search(r'Final answer:\n\n(.*)', text, re.DOTALL).group(1).strip(): the FIRST occurrence anywhere
    text = f"draft Final answer:\n\n  A  \n{THOUGHT_END}\n\nFinal answer:\n\nB"
    assert extract_final_answer_authors(text) == f"A  \n{THOUGHT_END}\n\nFinal answer:\n\nB"
    assert final_answer(text, PAPER.thought.extract) == (extract_final_answer_authors(text), "final_answer", True)
    assert extract_final_answer(text) == ("B", "final_answer")        # ours: the section after the END marker
    # "Final answer:" without the blank line: None -> re-sampled, then dropped (cot_dpo_data_generation.py:26-31)
    assert extract_final_answer_authors("Final answer: 4") is None
    assert extract_final_answer_authors("x\nFinal answer:\n\n\n  4\n\n") == "4"   # .strip()
    assert final_answer("Final answer: 4", "authors") == ("Final answer: 4", "authors_none_raw", False)


# -- 2. greedy search starts from the dataset's chosen answer (cot_data_generation_greedy.py:16-20) ----
def test_search_starts_from_the_dataset_answer_under_paper():
    # the paper's respond.use_dataset_answer is false (v2 stage 1: y0 is the policy's); the search still
    # starts from d["chosen"][-1]["content"] (:20) and scores it as the origin (:16)
    assert PAPER.respond.use_dataset_answer is False
    use = search_starts_from_dataset(PAPER.search.start, PAPER.respond.use_dataset_answer)
    assert use is True and search_starts_from_dataset(TINY.search.start, TINY.respond.use_dataset_answer) is False
    recs = [{"id": "p", "messages": Q, "answer": "chosen answer"}]
    answered, _ = respond(recs, FakeGenerator(answer="policy"), Sampling(), use)
    traces, _ = greedy_search(answered, FakeGenerator(refinements=lambda conv, j: "x" * (j + 1)), FakeScorer(len),
                              SearchConfig(k=1, m=1, max_rounds=1), Sampling(), Sampling())
    assert traces[0]["answer"] == "chosen answer" and traces[0]["answer_score"] == len("chosen answer")


# -- 3. long thoughts (prepare_cot_sft_data_greedy.py) ----------------------------------------------
def _round(improved, crit, ref, score):
    return {"critiques": [], "improved": improved, "best": {"critique": crit, "refinement": ref, "score": score}}


def _trace(answer, rounds, final, score):
    return {"id": "p", "messages": Q, "answer": answer, "answer_score": 1.0, "rounds": rounds,
            "final": {"answer": final, "score": score}}


def test_thought_text_is_the_authors_prepare():
    # d: origin_score 1; iteration 0 best (c1, y1) 3 > 1; iteration 1 best (c2, y2) 5 > 3; iteration 2 best
    # (c3, _) 4 <= 5 -> stop. prepare(): i=0 (best_score 3 != 5) adds c1 + y1 (:102-103); i=1 (== 5, not the
    # last) adds c2 + best_answer y2 and iteration 2's critique c3 (:97-99); then :106-107.
    t = _trace("y0", [_round(True, "c1", "y1", 3.0), _round(True, "c2", "y2", 5.0), _round(False, "c3", "y3", 4.0)],
               "y2", 5.0)
    rows, _ = long_thought([t], thought_rules(PAPER))
    want = ("<|Start of recursive criticism and improvement|>\n\n## Let's answer the question first:\ny0\n\n"
            "## Now, let's try to criticize this answer:\nc1\n\n"
            "## Okey, let's improve the above answer based on the criticism:\ny1\n\n"
            "## Now, let's try to criticize this answer:\nc2\n\n"
            "## Okey, let's improve the above answer based on the criticism:\ny2\n\n"
            "## Now, let's try to criticize this answer:\nc3\n\n"
            "## Okay, now it’s almost done.\n\n<|End of recursive criticism and improvement|>\n\nFinal answer:\n\ny2")
    assert [r["messages"][-1]["content"] for r in rows] == [want]


def test_thought_dropped_when_y0_is_redundant():
    # prepare_cot_sft_data_greedy.py:72: check_redundancy(d["messages"][-1]["content"]) -> continue (y0 = chosen)
    t = _trace("ha " * 60, [_round(True, "c1", "y1", 3.0), _round(False, "c2", "y2", 2.0)], "y1", 3.0)
    rows, counts = long_thought([t], thought_rules(PAPER))
    assert rows == [] and counts["dropped_redundant_answer"] == 1
    ok = _trace("fine", t["rounds"], "y1", 3.0)
    assert len(long_thought([ok], thought_rules(PAPER))[0]) == 1


def test_thought_quoting_a_marker_is_kept_by_the_authors_dropped_by_ours():
    # the authors build the string and keep it (:75-107, no parse-back); ours drops what cannot parse back
    y1 = "see:\n## Now, let's try to criticize this answer:\nquoted"
    t = _trace("y0", [_round(True, "c1", y1, 3.0), _round(False, "c2", "y2", 2.0)], y1, 3.0)
    assert len(long_thought([t], thought_rules(PAPER))[0]) == 1
    rows, counts = long_thought([t], thought_rules(TINY))
    assert rows == [] and counts["dropped_marker_in_text"] == 1


# -- 4. sampled thoughts: re-sampled up to 2 times, then dropped (cot_dpo_data_generation.py:17-35) ----
class ScriptedThinker(FakeGenerator):
    """Per call, per conversation (by its user text), the scripted samples."""

    def __init__(self, script):
        super().__init__()
        self.script = script

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        k = len(self.calls) - 1
        return [self.script[k][c[0]["content"]][:params.n] for c in conversations]


def test_thoughts_resampled_once_then_dropped_batched():
    # retry < 2: at most two samples per slot; extract_final_answer None after both -> `continue` (dropped)
    recs = [{"id": "a", "messages": [{"role": "user", "content": "a"}], "answer": "chosen a"},
            {"id": "b", "messages": [{"role": "user", "content": "b"}], "answer": "chosen b"}]
    gen = ScriptedThinker([
        {"a": ["Final answer:\n\nA1", "no final", "Final answer: bad"], "b": ["no", "Final answer:\n\nB2", "none"]},
        {"a": ["Final answer:\n\nA2"], "b": ["still none"]},          # ONE retry call: slots a1, a2, b0, b2
    ])
    t = PAPER.thought
    scorer = FakeScorer(len)
    out, counts = sample_thoughts(recs, gen, scorer, Sampling(), s=3, extract=t.extract,
                                  final_answer_tries=t.final_answer_tries, drop_no_final=t.drop_no_final,
                                  score_answer=t.beat_answer)
    assert [(n, p.n) for n, p in gen.calls] == [(2, 3), (4, 1)]
    assert [x["final"] for x in out[0]["thoughts"]] == ["A1", "A2", "A2"]
    assert [x["final"] for x in out[1]["thoughts"]] == ["B2"]
    assert counts == {"resampled_no_final": 4, "dropped_no_final": 2, "final_from_final_answer": 4}
    assert scorer.calls == 1 and out[0]["answer_score"] == len("chosen a")   # the dataset answer, same call
    # ours (tiny): one sample, nothing dropped, the fallback answer kept and labelled
    out, counts = sample_thoughts(recs, ScriptedThinker(gen.script), FakeScorer(len), Sampling(), s=3,
                                  extract=TINY.thought.extract, final_answer_tries=TINY.thought.final_answer_tries,
                                  drop_no_final=TINY.thought.drop_no_final)
    assert [len(r["thoughts"]) for r in out] == [3, 3] and "answer_score" not in out[0]


# -- 5./6. thought pairs (cot_dpo_data_scoring.py:13-39, prepare_cot_dpo_data.py:38-49) -------------
def _sample(answer_score, *thoughts):
    return {"id": "p", "messages": Q, "answer_score": answer_score,
            "thoughts": [{"text": f"T{i}", "final": f, "path": "final_answer", "score": s}
                         for i, (f, s) in enumerate(thoughts)]}


@pytest.mark.parametrize("rec,want", [
    # best must beat source_score strictly (best starts at source_score, `score > best_score`, :17,28, :35)
    (_sample(5.0, ("aa", 5.0), ("bbbb", 3.0)), None),
    (_sample(5.0, ("aa", 6.0), ("bbbb", 3.0)), ("T0", "T1")),
    # worst: the first of equal minima (`score < worst_score`, :31); best: the first of equal maxima (:28)
    (_sample(1.0, ("aa", 6.0), ("b", 6.0), ("cccc", 2.0), ("dddd", 2.0)), ("T0", "T2")),
    # best final answer longer than the worst's: dropped (prepare_cot_dpo_data.py:43-44), not re-picked,
    # although T1 (score 5 > source 1, final no longer than the worst's) would do
    (_sample(1.0, ("aaaaaa", 6.0), ("bb", 5.0), ("cccc", 2.0)), None),
    # all equal: best == worst score -> not `best_score > worst_score` (:35)
    (_sample(1.0, ("a", 3.0), ("b", 3.0)), None),
    # one thought left (the other dropped for no final answer): best is worst (:35)
    (_sample(1.0, ("a", 3.0)), None),
])
def test_thought_pairs_paper_rules(rec, want):
    pairs, _ = thought_pairs([rec], pair_rules(PAPER))
    got = (pairs[0]["chosen"][0]["content"], pairs[0]["rejected"][0]["content"]) if pairs else None
    assert got == want


def test_thought_pairs_ours_repick_and_ignore_the_dataset_answer():
    pairs, _ = thought_pairs([_sample(9.0, ("aaaaaa", 6.0), ("bb", 5.0), ("cccc", 2.0))], pair_rules(TINY))
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("T1", "T2")]
    pairs, counts = thought_pairs([{**_sample(None, ("a", 3.0), ("bb", 1.0))}], pair_rules(PAPER))
    assert pairs == [] and counts["thought_pair_no_answer_score"] == 1


# -- 8. evaluation (src/eval/generate_alpaca_eval2_cot.py) ------------------------------------------
EVAL = [{"id": f"e{i}", "instruction": f"q{i}", "messages": [{"role": "user", "content": f"q{i}"}],
         "dataset": "d", "reference": "r", "reference_generator": "gpt4_turbo"} for i in range(2)]


def test_eval_five_tries_then_our_fallback_counted_as_an_authors_drop():
    # :59-68: up to 5 samples until extract_final_answer finds one, else `return None` (the prompt dropped)
    class Eval(FakeGenerator):
        def generate(self, conversations, params):
            self.calls.append((len(conversations), params))
            k = len(self.calls)
            return [["Final answer:\n\n four " if c[0]["content"] == "q0" and k == 3 else "just text"]
                    for c in conversations]
    e = PAPER.eval
    params = SamplingParams(n=1, temperature=e.sampling.temperature, top_p=e.sampling.top_p, max_new_tokens=64)
    gen = Eval()
    recs, counts = eval_answers(EVAL, gen, "stage2", "thought", 0, params, extract=e.extract,
                                final_answer_tries=e.final_answer_tries)
    assert [n for n, _ in gen.calls] == [2, 2, 2, 1, 1]                # batched: one call per retry round
    assert len({p.seed for _, p in gen.calls}) == 5 and gen.calls[0][1].temperature == 0.7
    assert [(r["output"], r["tries"], r["authors_would_drop"]) for r in recs] == \
        [("four", 3, False), ("just text", 5, True)]                   # never dropped: our raw fallback
    assert counts["authors_would_drop"] == 1 and counts["resampled_no_final"] == 6
    assert counts["answer_from_authors_none_raw"] == 1


def test_eval_references_from_the_hub_or_a_labelled_fallback(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(**kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network\nsecond line")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(InputError) as e:
        es.hub_references()
    assert "\n" not in str(e.value) and "tatsu-lab/alpaca_eval" in str(e.value) and "eval.prompts" in str(e.value)
    path, note = es.resolve_evalset(es.DEFAULT_EVALSET, "hub", fetch=True)
    assert path == es.DEFAULT_EVALSET and "fallback" in note
    copy = tmp_path / "alpaca_eval_gpt4_baseline.json"     # a local copy (the hub file's format)
    copy.write_text('[{"instruction": "q", "output": "ref", "generator": "gpt4_turbo", "dataset": "x"}]')
    seen = {}

    def cached(**kw):
        seen.update(kw)
        return str(copy)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cached)
    path, note = es.resolve_evalset(es.DEFAULT_EVALSET, "hub")
    assert (path, note) == (str(copy), "") and seen["local_files_only"] is True
    assert seen["repo_id"] == "tatsu-lab/alpaca_eval" and seen["filename"] == "alpaca_eval_gpt4_baseline.json"
    assert es.load_evalset(path)[0]["reference_generator"] == "gpt4_turbo"


def test_official_lc_offline_keeps_the_labelled_fallback(monkeypatch):
    import alpaca_eval.metrics.glm_winrate as glm

    def offline(*a, **k):
        raise OSError("hub unreachable")
    monkeypatch.setattr(glm, "hf_hub_download", offline)
    ann = [{"instruction": f"i{i}", "output_1": "r" * (5 + i), "output_2": "m" * (3 + 2 * i), "generator_1": "ref",
            "generator_2": "m", "annotator": "a", "preference": 1.0 + (i % 3) / 2} for i in range(12)]
    r = lc_win_rate(ann, full_evalset=True, df_gamed="hub")
    assert r["lc_kind"] == "minimal-offline" and "not reachable on the hub" in r["lc_note"]


def test_unparsed_judgements_keep_the_instruction_index():
    # the win rate scores the parsed rows, counting the others; the LC gets every row (_frame): its
    # index is the instruction id (glm_winrate._get_featurized_data), unparsed rows NaN
    ann = [{"preference": 2.0}, {"preference": None}, {"preference": 1.0}]
    df, unparsed = _prefs(ann)
    assert list(df.index) == [0, 2] and unparsed == 1
    full = _frame(ann)
    assert list(full.index) == [0, 1, 2] and full["preference"].isna().tolist() == [False, True, False]
