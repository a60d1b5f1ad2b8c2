"""Greedy refinement search (docs/DESIGN.md step 7) and its traces -> long thoughts (step 8).

Each round, for ALL still-active prompts at once: K critiques of the current answer (one
generator call, plus retry rounds), M refinements per critique (one call), RM scores (one
call). A prompt keeps the RM-best refinement if it strictly beats its current answer, else it
stops, and that round's best critique becomes the thought's final (terminating) critique.

Trace format (one per prompt)::

    {"id": "p1", "messages": [...], "answer": "y0", "answer_score": 3.0,
     "rounds": [{"critiques": [... as avr_core.synthesis, with scored refinements ...],
                 "best": {"critique": "c", "refinement": "y1", "score": 5.0}, "improved": True}, ...],
     "final": {"answer": "y1", "score": 5.0}, "stop": "no_improvement" | "max_rounds" | "no_candidates"}
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from avr_core.backends.base import Generator, Scorer
from avr_core.parsing import is_redundant
from avr_core.prompts import JUDGE_SAMPLING
from avr_core.synthesis import Sampling, critique, refine, rm_score
from avr_core.thought import Thought, format_thought, parse_thought


@dataclass(frozen=True)
class SearchConfig:
    k: int = 2
    m: int = 2
    max_rounds: int = 5
    max_tries: int = 5
    force_rating: bool = False
    refine_judge: str = JUDGE_SAMPLING   # the judge turn of the refine conversation (`refine.conversation_judge`)
    keep_empty: bool = False             # empty refinements kept and scored (`refine.keep_empty`; authors)


def search_starts_from_dataset(start: str, respond_use_dataset_answer: bool) -> bool:
    """Whether y0 of the search is the dataset's answer: always with `search.start=dataset` (the
    authors: `d["chosen"]`, src/cot_data_generation_greedy.py:16-20), else as `respond` says.

    >>> search_starts_from_dataset("dataset", False), search_starts_from_dataset("respond", False)
    (True, False)
    """
    return start == "dataset" or bool(respond_use_dataset_answer)


def greedy_search(records: list[dict], gen: Generator, scorer: Scorer, cfg: SearchConfig,
                  crit: Sampling, ref: Sampling, salt: int = 0) -> tuple[list[dict], Counter]:
    """records: {"id", "messages", "answer"} -> traces (see module docstring)."""
    scored, counts = rm_score([{**r, "critiques": []} for r in records], scorer)   # y0 unscored: no trace
    traces = {r["id"]: {**r, "rounds": [], "final": {"answer": r["answer"], "score": r["answer_score"]}, "stop": None}
              for r in scored}
    for rnd in range(cfg.max_rounds):
        active = [t for t in traces.values() if t["stop"] is None]
        if not active:
            break
        current = [{"id": t["id"], "messages": t["messages"], "answer": t["final"]["answer"],
                    "answer_score": t["final"]["score"]} for t in active]
        s = salt * 101 + rnd
        crits, c_counts = critique(current, gen, cfg.k, crit, cfg.max_tries, cfg.force_rating, salt=s)
        refs, r_counts = refine(crits, gen, cfg.m, ref, salt=s, judge=cfg.refine_judge, keep_empty=cfg.keep_empty)
        refs, s_counts = rm_score(refs, scorer)
        counts.update(c_counts)
        counts.update(r_counts)
        counts.update(s_counts)
        by_id = {r["id"]: r for r in refs}
        for t in active:
            _advance(t, by_id.get(t["id"]), counts)
        counts["rounds_run"] += 1
    for t in traces.values():
        if t["stop"] is None:
            t["stop"] = "max_rounds"
        counts[f"stop_{t['stop']}"] += 1
    return list(traces.values()), counts


def _advance(trace: dict, rec: dict | None, counts: Counter) -> None:
    """Append one round to a trace and decide whether the prompt stays active."""
    cands = [(c, f) for c in (rec or {}).get("critiques", []) for f in c.get("refinements", []) if "score" in f]
    if not cands:
        trace["rounds"].append({"critiques": (rec or {}).get("critiques", []), "best": None, "improved": False})
        trace["stop"] = "no_candidates"
        return
    c, f = max(cands, key=lambda cf: cf[1]["score"])     # ties: the first in sampling order
    improved = f["score"] > trace["final"]["score"]
    trace["rounds"].append({"critiques": rec["critiques"], "improved": improved,
                            "best": {"critique": c["text"], "refinement": f["text"], "score": f["score"]}})
    if improved:
        trace["final"] = {"answer": f["text"], "score": f["score"]}
    else:
        trace["stop"] = "no_improvement"


@dataclass(frozen=True)
class ThoughtRules:
    drop_no_first_improvement: bool = True      # the seed's rule: round 1 must improve
    drop_no_terminating_critique: bool = True   # the seed's rule: improving to the end leaves no final critique
    drop_redundant_answer: bool = True          # a degenerate y0 (`is_redundant`, threshold 60) gives no
                                                #   thought (authors: prepare_cot_sft_data_greedy.py:72)
    drop_marker_in_text: bool = True            # ours: a thought that does not parse back is dropped
                                                #   (authors: kept)
    redundancy_threshold: int = 60


def long_thought(traces: list[dict], rules: ThoughtRules = ThoughtRules()) -> tuple[list[dict], Counter]:
    """Traces -> CoT-SFT rows {"id", "messages": [x..., {"assistant": thought}], "score_gain", "rounds"}."""
    rows, counts = [], Counter()
    for t in traces:
        rounds = t["rounds"]
        improving = [r for r in rounds if r["improved"]]
        terminating = next((r for r in rounds if not r["improved"] and r["best"]), None)
        if rules.drop_redundant_answer and is_redundant(t["answer"], rules.redundancy_threshold):
            counts["dropped_redundant_answer"] += 1
            continue
        if not rounds or (not rounds[0]["improved"] and rules.drop_no_first_improvement):
            counts["dropped_no_first_improvement"] += 1
            continue
        if terminating is None and rules.drop_no_terminating_critique:
            counts["dropped_no_terminating_critique"] += 1
            continue
        thought = Thought(answer=t["answer"],
                          steps=[(r["best"]["critique"], r["best"]["refinement"]) for r in improving],
                          final_critique=terminating["best"]["critique"] if terminating else None,
                          final_answer=t["final"]["answer"])
        text = format_thought(thought)
        if rules.drop_marker_in_text and parse_thought(text) != thought:
            # a text that writes a section marker at a line start would read back as another round:
            # training on it would teach a thought the parser cannot take apart (see test_thought.py)
            counts["dropped_marker_in_text"] += 1
            continue
        rows.append({"id": t["id"], "messages": [*t["messages"], {"role": "assistant", "content": text}],
                     "score_gain": t["final"]["score"] - t["answer_score"], "rounds": len(improving)})
    counts["thoughts"] = len(rows)
    return rows, counts
