"""Stage-1 sampling, one round per call (docs/DESIGN.md steps 1-4): respond -> critique -> refine -> rm_score.

Every function takes a list of records and an injected backend, sends the WHOLE round to the
backend in one call (n samples per conversation), and returns new records plus counts of
what it dropped. No Prefect, no file I/O: tasks/ wires these to the artifact store.

Record format, growing stage by stage (a prompt record comes from `avr_core.inputs`)::

    {"id": "tiny-001", "messages": [{"role": "user", "content": "2+2?"}], "answer": "5",
     "answer_source": "policy",                                         # respond
     "critiques": [{"id": "tiny-001/c0", "text": "Wrong. Rating: [[2]]",
                    "rating": 2, "forced": False, "tries": 1,           # critique
                    "refinements": [{"id": "tiny-001/c0/r0", "text": "4",
                                     "score": 7.9}]}],                  # refine, rm_score
     "answer_score": 3.1}                                               # rm_score
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

from avr_core.backends.base import Generator, SamplingParams, Scorer
from avr_core.parsing import extract_rating, parse_forced_rating
from avr_core.prompts import FORCED_RATING_PREFIX, JUDGE_SAMPLING, judge_conversation, refine_conversation


@dataclass(frozen=True)
class Sampling:
    """The sampling part of a stage's config, as the core sees it."""

    temperature: float = 0.7
    top_p: float = 0.8
    max_new_tokens: int | None = 256   # None: up to the model's context (vllm / openai natively;
                                       #   hf: resolve first, `avr_core.config.resolve_max_new_tokens`)
    seed: int = 0

    def params(self, n: int, salt: int = 0) -> SamplingParams:
        # salt (shard index, retry round) keeps samples reproducible AND different per call
        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=self.seed + 7919 * salt)


def respond(records: list[dict], gen: Generator, sampling: Sampling, use_dataset_answer: bool = True,
            salt: int = 0, keep_empty: bool = False) -> tuple[list[dict], Counter]:
    """y0 for every prompt: the dataset's answer if present and allowed, else the policy's.

    A failed request drops its prompt (`dropped_failed_answer`). An empty or whitespace-only
    answer is dropped too (`dropped_empty_answer`), unless `keep_empty` (config
    `respond.keep_empty`; the authors keep it, src/stage1_data_generation.py:18-23).

    >>> rows = [{"id": "p1", "messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}]  # doctest: +SKIP
    >>> respond(rows, gen, Sampling())[0]  # doctest: +SKIP
    [{'id': 'p1', 'messages': [...], 'answer': '4', 'answer_source': 'dataset'}]
    """
    counts: Counter = Counter()
    need = [r for r in records if not (use_dataset_answer and r.get("answer"))]
    outs = gen.generate([r["messages"] for r in need], sampling.params(1, salt)) if need else []
    generated = {r["id"]: (o[0] if o else None) for r, o in zip(need, outs)}
    result = []
    for r in records:
        if r["id"] not in generated:
            result.append({**r, "answer_source": "dataset"})
            continue
        text = generated[r["id"]]
        if text is None:
            counts["dropped_failed_answer"] += 1
        elif not text.strip() and not keep_empty:
            counts["dropped_empty_answer"] += 1
        else:
            result.append({**r, "answer": text, "answer_source": "policy"})
    counts["generated_answers"] += len(need)
    return result, counts


def critique(records: list[dict], gen: Generator, k: int, sampling: Sampling, max_tries: int = 5,
             force_rating: bool = False, salt: int = 0) -> tuple[list[dict], Counter]:
    """K critiques of y0 per record, from [x, y0, JUDGE].

    Round 1 samples k per record in one call; each slot whose `[[k]]` does not parse is
    re-sampled (all failing slots of all records in ONE call per retry round) up to
    `max_tries` samples in all. Then a slot is dropped and counted (the paper), or with
    `force_rating` its last critique is completed from ``Rating: [[`` by one greedy call and
    marked `forced`. Records left with no critique are dropped and counted.
    """
    counts: Counter = Counter()
    convs = [judge_conversation(r["messages"], r["answer"]) for r in records]
    slots: dict[tuple[int, int], dict] = {}
    first = gen.generate(convs, sampling.params(k, salt))
    for i, outs in enumerate(first):
        for j in range(k):
            text = outs[j] if j < len(outs) else ""
            slots[(i, j)] = {"text": text, "rating": extract_rating(text), "tries": 1}
    for attempt in range(1, max_tries):
        failing = [s for s, c in slots.items() if c["rating"] is None]
        if not failing:
            break
        counts["critique_resamples"] += len(failing)
        again = gen.generate([convs[i] for i, _ in failing], sampling.params(1, salt * 31 + attempt))
        for (i, j), outs in zip(failing, again):
            text = outs[0] if outs else ""
            slots[(i, j)] = {"text": text, "rating": extract_rating(text), "tries": attempt + 1}
    failing = [s for s, c in slots.items() if c["rating"] is None]
    counts["critiques_unparsable"] += len(failing)
    if force_rating and failing:
        _force_ratings(failing, slots, convs, gen, counts)
    result = []
    for i, r in enumerate(records):
        kept = []
        for j in range(k):
            c = slots[(i, j)]
            if c["rating"] is None:
                counts["dropped_critiques"] += 1
                continue
            kept.append({"id": f"{r['id']}/c{j}", "text": c["text"], "rating": c["rating"],
                         "forced": c.get("forced", False), "tries": c["tries"]})
        if kept:
            result.append({**r, "critiques": kept})
        else:
            counts["dropped_no_critique"] += 1
    return result, counts


def _force_ratings(failing, slots, convs, gen: Generator, counts: Counter) -> None:
    """Append ``Rating: [[`` and let the model complete its own rating (greedy, 3 tokens)."""
    prefixes = [slots[s]["text"].rstrip() + FORCED_RATING_PREFIX for s in failing]
    cont = gen.generate([convs[i] + [{"role": "assistant", "content": p}] for (i, _), p in zip(failing, prefixes)],
                        SamplingParams(n=1, temperature=0.0, max_new_tokens=3, seed=0))
    for s, p, outs in zip(failing, prefixes, cont):
        k = parse_forced_rating(outs[0]) if outs else None
        if k is None:
            counts["forced_rating_failed"] += 1
            continue
        slots[s].update(text=f"{p}{k}]]", rating=k, forced=True)
        counts["critiques_forced"] += 1


def refine(records: list[dict], gen: Generator, m: int, sampling: Sampling,
           salt: int = 0, judge: str = JUDGE_SAMPLING, keep_empty: bool = False) -> tuple[list[dict], Counter]:
    """M refinements per critique from [x, y0, JUDGE, c, REFINE], all in one call. `judge`: the judge
    turn's text in that conversation (config `refine.conversation_judge`: ours, the sampling judge
    the critique came from; the authors', `JUDGE_REFINE_CONVERSATION`).

    A failed request loses its samples (`dropped_failed_refinements`); an empty or whitespace-only
    refinement is dropped (`dropped_empty_refinements`) unless `keep_empty` (config
    `refine.keep_empty`; the authors keep and score it, src/cot_data_generation_greedy.py:61-71)."""
    counts: Counter = Counter()
    pairs = [(ri, ci) for ri, r in enumerate(records) for ci in range(len(r["critiques"]))]
    convs = [refine_conversation(records[ri]["messages"], records[ri]["answer"], records[ri]["critiques"][ci]["text"],
                                 judge)
             for ri, ci in pairs]
    outs = gen.generate(convs, sampling.params(m, salt)) if convs else []
    result = copy.deepcopy(records)
    for (ri, ci), texts in zip(pairs, outs):
        c = result[ri]["critiques"][ci]
        c["refinements"] = []
        for j, t in enumerate(texts):
            if not t.strip() and not keep_empty:
                counts["dropped_empty_refinements"] += 1
                continue
            c["refinements"].append({"id": f"{c['id']}/r{j}", "text": t})
        counts["dropped_failed_refinements"] += m - len(texts)
    return result, counts


def rm_score(records: list[dict], scorer: Scorer) -> tuple[list[dict], Counter]:
    """r(x, y0) and r(x, y') for every refinement, in one scorer call.

    A score of None is an input the scorer would not score (a reward model with
    `scorer.over_long=skip`: longer than its context; the authors' request fails and returns
    None, src/servers.py:52-62): that refinement stays unscored, so it is no candidate
    (`unscored_refinements`; the authors skip it, stage1_data_scoring.py:25-26), and a record
    whose y0 is unscored is dropped (`dropped_unscored_answer`; theirs raises on it and the
    record is lost, stage1_data_scoring.py:29)."""
    convs, where = [], []
    for ri, r in enumerate(records):
        convs.append([*r["messages"], {"role": "assistant", "content": r["answer"]}])
        where.append((ri, None, None))
        for ci, c in enumerate(r.get("critiques", [])):
            for fi, f in enumerate(c.get("refinements", [])):
                convs.append([*r["messages"], {"role": "assistant", "content": f["text"]}])
                where.append((ri, ci, fi))
    scores = scorer.score(convs) if convs else []
    result, counts, unscored = copy.deepcopy(records), Counter(scored=len(scores)), set()
    for (ri, ci, fi), s in zip(where, scores):
        if s is None and ci is None:
            unscored.add(ri)
        elif s is None:
            counts["unscored_refinements"] += 1
        elif ci is None:
            result[ri]["answer_score"] = s
        else:
            result[ri]["critiques"][ci]["refinements"][fi]["score"] = s
    if unscored:
        counts["dropped_unscored_answer"] += len(unscored)
    return [r for ri, r in enumerate(result) if ri not in unscored], counts
