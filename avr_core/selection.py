"""Rejection sampling (docs/DESIGN.md step 5): scored records -> RSFT examples and preference pairs.

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

import json
from collections import Counter
from dataclasses import dataclass

from avr_core.parsing import is_redundant, is_unchanged
from avr_core.prompts import JUDGE_TRAIN, REFINE_TRAIN, RSFT_JUDGES


@dataclass(frozen=True)
class SelectRules:
    """Stage-1 selection. The first block is ours and the authors' alike; the second names every
    place where the authors' scripts differ from ours (docs/FIDELITY.md): the defaults are ours,
    `PAPER_RULES` (conf/paper.yaml) is the authors' rule for rule."""

    length_extra_chars: int = 400
    length_ratio: float = 1.2
    redundancy_threshold: int = 60
    response_pairs: bool = True
    critique_pairs: bool = True
    refinement_pairs: bool = True
    # -- where the authors differ (paper value in brackets) --------------------------------------
    drop_unchanged: bool = True          # [False] refinements that copy y0 are not candidates
    ties: str = "first"                  # ["authors"] equal scores: first in sampling order; authors:
                                         #   y* = LAST best (`>=`, stage1_data_scoring.py), refinement
                                         #   pair = first best vs LAST worst (stable sort, prepare_dpo_data.py)
    record_gate: bool = False            # [True] a redundant y0, a redundant y*, or no improvement
                                         #   skips the critique and refinement pairs of the record too
    refinement_needs_critique: bool = False  # [True] refinement pair only where the critique pair's
                                         #   conditions hold (incl. "no better judgement", redundant c+)
    refinement_skip_at_answer: bool = False  # [True] no refinement pair when r(rejected) == r(y0)
    group_critiques_by_text: bool = False    # [True] identical critique texts are one critique
    rsft_redundancy: bool = True         # [False] degenerate y0 / y* are not RSFT examples
    rsft_judge: str = "dpo"              # ["sft"] judge text of RSFT examples (avr_core.prompts.RSFT_JUDGES)
    rsft_mix_chosen: bool = False        # [True] RSFT data also gets every dataset `chosen`
                                         #   conversation not used (`rsft_mix`)


PAPER_RULES = SelectRules(drop_unchanged=False, ties="authors", record_gate=True, refinement_needs_critique=True,
                          refinement_skip_at_answer=True, group_critiques_by_text=True, rsft_redundancy=False,
                          rsft_judge="sft", rsft_mix_chosen=True)


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


def rsft_mix(prompt_records: list[dict], rsft: list[dict]) -> tuple[list[dict], Counter]:
    """The authors' RSFT data mix (src/data/prepare_sft_data.py, lines 72-74): after the refinement
    examples, every dataset `chosen` conversation -- a prompt record's messages plus its dataset
    answer -- that is not the [x, y0] of a refinement example, each distinct conversation once
    (their `deduplicate_data`). `prompt_records`: the prompt slice (`avr_core.inputs` records);
    records without a dataset answer have no chosen conversation and are counted."""
    used = {json.dumps(ex["messages"][:-4], ensure_ascii=False) for ex in rsft}
    out, seen, counts = [], set(), Counter()
    for r in prompt_records:
        if not r.get("answer"):
            counts["mix_no_chosen"] += 1
            continue
        conv = [*r["messages"], _turn("assistant", r["answer"])]
        line = json.dumps(conv, ensure_ascii=False)
        if line in used:
            counts["mix_used"] += 1
        elif line in seen:
            counts["mix_duplicate"] += 1
        else:
            seen.add(line)
            out.append({"id": f"{r['id']}/chosen", "prompt_id": r["id"], "source": "dataset_chosen",
                        "messages": conv})
    counts["mix_examples"] = len(out)
    return out, counts


def _candidates(rec: dict, rules: SelectRules, counts: Counter) -> dict[str, list[dict]]:
    """Scored refinements per critique id (in sampling order), minus unchanged copies of y0."""
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


def _groups(rec: dict, cands: dict[str, list[dict]], rules: SelectRules) -> dict[str, tuple[str, list[dict]]]:
    """Critique id -> (text, scored refinements). With `group_critiques_by_text`, critiques with the
    same text are one (the first one's id; refinements in sampling order), as the authors' j_dict
    (stage1_data_scoring.py, lines 47-53). Critiques without a scored refinement are left out."""
    out: dict[str, tuple[str, list[dict]]] = {}
    by_text: dict[str, str] = {}
    for c in rec.get("critiques", []):
        fs = cands.get(c["id"], [])
        if not fs:
            continue
        if rules.group_critiques_by_text and c["text"] in by_text:
            out[by_text[c["text"]]][1].extend(fs)
            continue
        by_text.setdefault(c["text"], c["id"])
        out[c["id"]] = (c["text"], list(fs))
    return out


def _best(items, key, last: bool):
    """The max by key; ties: the first (or, `last`, the last) in order."""
    best = None
    for it in items:
        if best is None or key(it) > key(best) or (last and key(it) == key(best)):
            best = it
    return best


def _worst(items, key, last: bool):
    best = None
    for it in items:
        if best is None or key(it) < key(best) or (last and key(it) == key(best)):
            best = it
    return best


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
    cid, best = _best(flat, lambda t: t[1]["score"], last=rules.ties == "authors")
    gate = False
    if best["score"] <= s0:
        counts["no_improvement"] += 1
    else:
        red = redundant(best["text"]) or redundant(y0)
        extra, ratio = len(best["text"]) - len(y0), len(best["text"]) / max(1, len(y0))
        if red and rules.rsft_redundancy:
            counts["rsft_dropped_redundant"] += 1
        elif extra >= rules.length_extra_chars and ratio >= rules.length_ratio:
            counts["rsft_dropped_length"] += 1
        else:
            examples.append({
                "id": f"{rec['id']}/rsft", "prompt_id": rec["id"], "critique_id": cid, "refinement_id": best["id"],
                "score_answer": s0, "score_refinement": best["score"],
                "messages": [*x, _turn("assistant", y0), _turn("user", RSFT_JUDGES[rules.rsft_judge]),
                             _turn("assistant", crit[cid]["text"]), _turn("user", REFINE_TRAIN),
                             _turn("assistant", best["text"])]})
        if red:
            if not rules.rsft_redundancy:
                counts["response_pair_redundant"] += 1
        else:
            gate = True
            if rules.response_pairs:
                pairs.append(_pair("response", rec, x, best["text"], y0, best["score"], s0, cid, best["id"], "answer"))
    if rules.record_gate and not gate:   # prepare_dpo_data.py lines 102-113: `continue` for the record
        counts["record_gate_skipped"] += 1
        return examples, pairs
    judged = [*x, _turn("assistant", y0), _turn("user", JUDGE_TRAIN)]
    groups = _groups(rec, cands, rules)
    plus, plus_ok = _critique_pair(rec, groups, judged, rules, counts, redundant, pairs)
    if rules.refinement_pairs and plus is not None:
        if rules.refinement_needs_critique and not plus_ok:
            counts["refinement_pair_no_critique_gate"] += 1
        else:
            _refinement_pair(rec, plus, *groups[plus], judged, rules, counts, redundant, pairs)
    return examples, pairs


def _critique_pair(rec, groups, judged, rules, counts, redundant, pairs) -> tuple[str | None, bool]:
    """c+ vs c-, a critique's value being mean(r(refinements)) - r(y0). Returns c+'s id and whether
    the critique pair's conditions on c+ hold (the authors' gate for the refinement pair:
    prepare_dpo_data.py lines 143-153; a redundant c- drops only the critique pair, line 155)."""
    s0 = rec["answer_score"]
    mean = {cid: sum(f["score"] for f in fs) / len(fs) for cid, (_, fs) in groups.items()}
    if not mean:
        return None, False
    plus = _best(mean, mean.get, last=False)      # the authors' strict `>` / `<`: first max / min
    minus = _worst(mean, mean.get, last=False)
    text = {cid: t for cid, (t, _) in groups.items()}
    ok = False
    if len(mean) < 2:
        counts["critique_pair_single_critique"] += 1
    elif mean[plus] <= mean[minus]:
        counts["critique_pair_equal_value"] += 1
    elif text[plus] == text[minus]:
        counts["critique_pair_identical"] += 1
    elif max(f["score"] for f in groups[plus][1]) < s0:
        counts["critique_pair_no_improvement"] += 1
    elif redundant(text[plus]):
        counts["critique_pair_redundant"] += 1
    else:
        ok = True
        if redundant(text[minus]):
            counts["critique_pair_redundant"] += 1
        elif rules.critique_pairs:
            pairs.append(_pair("critique", rec, judged, text[plus], text[minus],
                               mean[plus] - s0, mean[minus] - s0, plus, plus, minus))
    return plus, ok


def _refinement_pair(rec, cid, text, fs, judged, rules, counts, redundant, pairs) -> None:
    """Best vs worst refinement under c+, from [x, y0, JUDGE, c+, REFINE]."""
    if len(fs) < 2:
        counts["refinement_pair_too_few"] += 1
        return
    hi = _best(fs, lambda f: f["score"], last=False)
    lo = _worst(fs, lambda f: f["score"], last=rules.ties == "authors")
    if hi["score"] <= lo["score"]:
        counts["refinement_pair_equal"] += 1
    elif hi["score"] < rec["answer_score"]:
        counts["refinement_pair_below_answer"] += 1
    elif rules.refinement_skip_at_answer and lo["score"] == rec["answer_score"]:
        counts["refinement_pair_rejected_at_answer"] += 1
    elif redundant(hi["text"]) or redundant(lo["text"]):
        counts["refinement_pair_redundant"] += 1
    else:
        prompt = [*judged, _turn("assistant", text), _turn("user", REFINE_TRAIN)]
        pairs.append(_pair("refinement", rec, prompt, hi["text"], lo["text"], hi["score"], lo["score"],
                           cid, hi["id"], lo["id"]))


@dataclass(frozen=True)
class ThoughtPairRules:
    """Stage-2 pairs (docs/DESIGN.md step 9): best vs worst sampled thought of a prompt, judged by the
    RM score of the FINAL answer only, with length control on that final answer."""

    min_margin: float = 0.0          # score_chosen - score_rejected must exceed this
    length_rule: str = "pick"        # pick: best thought whose final answer is no longer than the
                                     #   worst's; drop: pair best and worst only if that holds
    length_chars: bool = True        # compare lengths in characters (else whitespace words)
    beat_answer: bool = False        # authors: the best thought's score must exceed the dataset answer's
                                     #   (`answer_score`, src/cot_dpo_data_scoring.py:17,28,35); a record
                                     #   without one gives no pair (counted thought_pair_no_answer_score)


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
        worst = min(ts, key=lambda t: t["score"])      # ties: the first (as the authors' strict `<`, `>`)
        if rules.beat_answer and rec.get("answer_score") is None:
            counts["thought_pair_no_answer_score"] += 1
            continue
        ok = [t for t in ts if size(t["final"]) <= size(worst["final"]) and t is not worst]
        best = max(ts, key=lambda t: t["score"])
        if rules.length_rule == "pick":
            best = max(ok, key=lambda t: t["score"]) if ok else None
        elif size(best["final"]) > size(worst["final"]):
            best = None
        if best is None:
            counts["thought_pair_length"] += 1
        elif rules.beat_answer and best["score"] <= rec["answer_score"]:
            counts["thought_pair_below_answer"] += 1
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
