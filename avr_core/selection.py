"""Rejection sampling (DESIGN.md step 5): scored records -> RSFT examples and preference pairs.

Rules follow the authors' src/data/prepare_sft_data.py and prepare_dpo_data.py, each
filter a config switch and every drop counted. Pairs are TRL's conversational format plus
lineage fields (never named `tools` / `chat_template_kwargs`, which TRL reads)::

    {"id": "tiny-001/response", "kind": "response",
     "prompt": [{"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}],
     "prompt_id": "tiny-001", "critique_id": "tiny-001/c0",
     "score_chosen": 7.9, "score_rejected": 3.1, "reward_margin": 4.8}

`reward_margin` is AvR's refinement-aware reward r(y_{t+1}) - r(y_t) that decided the pair.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from avr_core.parsing import is_redundant, is_unchanged
from avr_core.prompts import JUDGE_TRAIN, REFINE_TRAIN


@dataclass(frozen=True)
class SelectRules:
    length_extra_chars: int = 400
    length_ratio: float = 1.2
    redundancy_threshold: int = 60
    drop_unchanged: bool = True
    response_pairs: bool = True
    critique_pairs: bool = True
    refinement_pairs: bool = True


def _turn(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def _pair(kind: str, rec: dict, prompt: list[dict], chosen: str, rejected: str, s_c: float, s_r: float,
          critique_id: str | None, chosen_id: str, rejected_id: str) -> dict:
    return {"id": f"{rec['id']}/{kind}", "kind": kind, "prompt": prompt,
            "chosen": [_turn("assistant", chosen)], "rejected": [_turn("assistant", rejected)],
            "prompt_id": rec["id"], "critique_id": critique_id, "chosen_id": chosen_id,
            "rejected_id": rejected_id, "score_chosen": s_c, "score_rejected": s_r,
            "reward_margin": s_c - s_r}


def select(records: list[dict], rules: SelectRules = SelectRules()) -> tuple[list[dict], list[dict], Counter]:
    """Returns (rsft_examples, pairs, counts) for scored records (see `avr_core.synthesis`)."""
    rsft, pairs, counts = [], [], Counter()
    for rec in records:
        ex, ps = _select_one(rec, rules, counts)
        rsft.extend(ex)
        pairs.extend(ps)
    counts["rsft_examples"] = len(rsft)
    for kind in ("response", "critique", "refinement"):
        counts[f"{kind}_pairs"] = sum(p["kind"] == kind for p in pairs)
    return rsft, pairs, counts


def _candidates(rec: dict, rules: SelectRules, counts: Counter) -> dict[str, list[dict]]:
    """Scored refinements per critique id, minus unchanged copies of y0."""
    out = {}
    for c in rec.get("critiques", []):
        kept = []
        for f in c.get("refinements", []):
            if "score" not in f:
                counts["unscored_refinements"] += 1
            elif rules.drop_unchanged and is_unchanged(f["text"], rec["answer"]):
                counts["dropped_unchanged_copy"] += 1
            else:
                kept.append(f)
        out[c["id"]] = kept
    return out


def _select_one(rec: dict, rules: SelectRules, counts: Counter) -> tuple[list[dict], list[dict]]:
    x, y0, s0 = rec["messages"], rec["answer"], rec["answer_score"]
    redundant = lambda t: is_redundant(t, rules.redundancy_threshold)  # noqa: E731
    crit = {c["id"]: c for c in rec.get("critiques", [])}
    cands = _candidates(rec, rules, counts)
    flat = [(cid, f) for cid, fs in cands.items() for f in fs]
    examples, pairs = [], []
    if not flat:
        counts["no_refinements"] += 1
        return examples, pairs
    cid, best = max(flat, key=lambda t: t[1]["score"])  # ties: the first in sampling order
    if best["score"] <= s0:
        counts["no_improvement"] += 1
    elif redundant(best["text"]) or redundant(y0):
        counts["rsft_dropped_redundant"] += 1
    else:
        extra, ratio = len(best["text"]) - len(y0), len(best["text"]) / max(1, len(y0))
        if extra >= rules.length_extra_chars and ratio >= rules.length_ratio:
            counts["rsft_dropped_length"] += 1
        else:
            examples.append({
                "id": f"{rec['id']}/rsft", "prompt_id": rec["id"], "critique_id": cid, "refinement_id": best["id"],
                "score_answer": s0, "score_refinement": best["score"],
                "messages": [*x, _turn("assistant", y0), _turn("user", JUDGE_TRAIN),
                             _turn("assistant", crit[cid]["text"]), _turn("user", REFINE_TRAIN),
                             _turn("assistant", best["text"])]})
        if rules.response_pairs:
            pairs.append(_pair("response", rec, x, best["text"], y0, best["score"], s0, cid, best["id"], "answer"))
    judged = [*x, _turn("assistant", y0), _turn("user", JUDGE_TRAIN)]
    plus = _critique_pair(rec, crit, cands, judged, rules, counts, redundant, pairs)
    if rules.refinement_pairs and plus is not None:
        _refinement_pair(rec, crit[plus], cands[plus], judged, counts, redundant, pairs)
    return examples, pairs


def _critique_pair(rec, crit, cands, judged, rules, counts, redundant, pairs) -> str | None:
    """c+ vs c-, a critique's value being mean(r(refinements)) - r(y0). Returns c+'s id."""
    s0 = rec["answer_score"]
    value = {cid: sum(f["score"] for f in fs) / len(fs) - s0 for cid, fs in cands.items() if fs}
    if not value:
        return None
    plus = max(value, key=value.get)
    minus = min(value, key=value.get)
    if not rules.critique_pairs:
        return plus
    if len(value) < 2:
        counts["critique_pair_single_critique"] += 1
    elif value[plus] <= value[minus]:
        counts["critique_pair_equal_value"] += 1
    elif crit[plus]["text"] == crit[minus]["text"]:
        counts["critique_pair_identical"] += 1
    elif max(f["score"] for f in cands[plus]) < s0:
        counts["critique_pair_no_improvement"] += 1
    elif redundant(crit[plus]["text"]) or redundant(crit[minus]["text"]):
        counts["critique_pair_redundant"] += 1
    else:
        pairs.append(_pair("critique", rec, judged, crit[plus]["text"], crit[minus]["text"],
                           value[plus], value[minus], plus, plus, minus))
    return plus


def _refinement_pair(rec, c, fs, judged, counts, redundant, pairs) -> None:
    """Best vs worst refinement under c+, from [x, y0, JUDGE, c+, REFINE]."""
    if len(fs) < 2:
        counts["refinement_pair_too_few"] += 1
        return
    hi = max(fs, key=lambda f: f["score"])
    lo = min(fs, key=lambda f: f["score"])
    if hi["score"] <= lo["score"]:
        counts["refinement_pair_equal"] += 1
    elif hi["score"] < rec["answer_score"]:
        counts["refinement_pair_below_answer"] += 1
    elif redundant(hi["text"]) or redundant(lo["text"]):
        counts["refinement_pair_redundant"] += 1
    else:
        prompt = [*judged, _turn("assistant", c["text"]), _turn("user", REFINE_TRAIN)]
        pairs.append(_pair("refinement", rec, prompt, hi["text"], lo["text"], hi["score"], lo["score"],
                           c["id"], hi["id"], lo["id"]))


@dataclass(frozen=True)
class ThoughtPairRules:
    """Stage-2 pairs (DESIGN.md step 9): best vs worst sampled thought of a prompt, judged by the
    RM score of the FINAL answer only, with length control on that final answer."""

    min_margin: float = 0.0          # score_chosen - score_rejected must exceed this
    length_rule: str = "pick"        # pick: best thought whose final answer is no longer than the
                                     #   worst's; drop: pair best and worst only if that holds
    length_chars: bool = True        # compare lengths in characters (else whitespace words)


def thought_pairs(samples: list[dict], rules: ThoughtPairRules = ThoughtPairRules()) -> tuple[list[dict], Counter]:
    """samples: {"id", "messages", "thoughts": [{"text", "final", "path", "score"}, ...]} ->
    TRL pairs whose chosen/rejected are whole thoughts; lineage says which final answers decided it."""
    pairs, counts = [], Counter()
    size = (lambda s: len(s)) if rules.length_chars else (lambda s: len(s.split()))  # noqa: E731
    for rec in samples:
        ts = [t for t in rec["thoughts"] if "score" in t]
        if len(ts) < 2:
            counts["thought_pair_too_few"] += 1
            continue
        worst = min(ts, key=lambda t: t["score"])
        ok = [t for t in ts if size(t["final"]) <= size(worst["final"]) and t is not worst]
        best = max(ts, key=lambda t: t["score"])
        if rules.length_rule == "pick":
            best = max(ok, key=lambda t: t["score"]) if ok else None
        elif size(best["final"]) > size(worst["final"]):
            best = None
        if best is None:
            counts["thought_pair_length"] += 1
        elif best["score"] - worst["score"] <= rules.min_margin:
            counts["thought_pair_margin"] += 1
        else:
            pairs.append({"id": f"{rec['id']}/thought", "kind": "thought", "prompt": rec["messages"],
                          "chosen": [_turn("assistant", best["text"])], "rejected": [_turn("assistant", worst["text"])],
                          "prompt_id": rec["id"], "critique_id": None, "score_chosen": best["score"],
                          "score_rejected": worst["score"], "reward_margin": best["score"] - worst["score"],
                          "len_chosen_final": size(best["final"]), "len_rejected_final": size(worst["final"])})
    counts["thought_pairs"] = len(pairs)
    return pairs, counts
