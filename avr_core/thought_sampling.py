"""S sampled thoughts per prompt, scored on their FINAL answers (docs/DESIGN.md step 9).

A Stage-2 (CoT) model writes one long refinement thought per sample; the final answer is
extracted from it (`thought.extract_final_answer`: the `Final answer:` section, else the last
improvement, else the raw text) and only that answer is scored, as the assistant turn of
[x, final]. One generator call and ONE scorer call for the whole batch of prompts.

Input record (a prompt record from `avr_core.inputs`)::

    {"id": "p1", "messages": [{"role": "user", "content": "2+2?"}]}

Output record, one thought per sample (`path` says where the final answer came from)::

    {"id": "p1", "messages": [{"role": "user", "content": "2+2?"}],
     "thoughts": [{"text": "<|Start of recursive ...|> ... Final answer:\\n\\n4", "final": "4",
                   "path": "final_answer", "score": 7.5},
                  {"text": "no markers", "final": "no markers", "path": "raw", "score": 1.0}]}

Counts: ``final_from_<path>`` per kept sample (``final_from_final_answer``,
``final_from_last_improvement``, ``final_from_raw``; under the authors' rule
``final_from_authors_none_<path>``), ``resampled_no_final`` (re-samples issued) and
``dropped_no_final`` (samples dropped after the last try).
"""
from __future__ import annotations

from avr_core.backends.base import Generator, Scorer
from avr_core.synthesis import Sampling
from avr_core.thought import final_answer


def sample_thoughts(records: list[dict], gen: Generator, scorer: Scorer, sampling: Sampling, s: int,
                    salt: int = 0, extract: str = "ours", final_answer_tries: int = 1, drop_no_final: bool = False,
                    score_answer: bool = False) -> tuple[list[dict], dict]:
    """`s` thoughts per record from `gen` (one call), their final answers scored by `scorer`
    (one call, skipped when nothing is to be scored). Returns (records, counts).

    `extract` is the final-answer rule (`avr_core.thought.final_answer`: ours | authors). A
    sample whose rule finds no final answer is re-sampled, all such samples of all records in ONE
    generator call per retry round, up to `final_answer_tries` samples in all (the authors: 2,
    src/cot_dpo_data_generation.py:21-28); then it is dropped when `drop_no_final` (the authors,
    :29-31), else kept with its fallback answer. `score_answer` also scores the dataset's answer
    (`record["answer"]`, in the same scorer call) as ``answer_score``: the authors' pair needs the
    best thought above it (src/cot_dpo_data_scoring.py:15,35).

    >>> recs, counts = sample_thoughts([{"id": "p1", "messages": [{"role": "user", "content": "2+2?"}]}],
    ...                                gen, scorer, Sampling(), s=2)  # doctest: +SKIP
    >>> recs[0]["thoughts"][0]  # doctest: +SKIP
    {'text': '... Final answer:\\n\\n4', 'final': '4', 'path': 'final_answer', 'score': 7.5}
    >>> counts  # doctest: +SKIP
    {'final_from_final_answer': 2}
    """
    outs = gen.generate([r["messages"] for r in records], sampling.params(s, salt))
    slots = [[final_answer(text, extract) + (text,) for text in texts] for texts in outs]
    counts: dict = {}

    def add(key, n=1):
        counts[key] = counts.get(key, 0) + n
    for tries in range(1, final_answer_tries):
        missing = [(i, j) for i, ts in enumerate(slots) for j, t in enumerate(ts) if not t[2]]
        if not missing:
            break
        add("resampled_no_final", len(missing))
        again = gen.generate([records[i]["messages"] for i, _ in missing], sampling.params(1, salt * 101 + 7 + tries))
        for (i, j), texts in zip(missing, again):
            if texts:
                slots[i][j] = final_answer(texts[0], extract) + (texts[0],)
    recs, convs = [], []
    for r, ts in zip(records, slots):
        kept = []
        for answer, path, found, text in ts:
            if not found and drop_no_final:
                add("dropped_no_final")
                continue
            add(f"final_from_{path}")
            kept.append({"text": text, "final": answer, "path": path})
            convs.append([*r["messages"], {"role": "assistant", "content": answer}])
        rec = {"id": r["id"], "messages": r["messages"], "thoughts": kept}
        if score_answer and r.get("answer"):
            rec["answer"] = r["answer"]
            convs.append([*r["messages"], {"role": "assistant", "content": r["answer"]}])
        recs.append(rec)
    scores = iter(scorer.score(convs) if convs else [])
    for rec in recs:   # None: not scored (`scorer.over_long=skip`): no candidate for a pair, counted
        for t in rec["thoughts"]:
            score = next(scores)
            if score is None:
                add("unscored_thoughts")
            else:
                t["score"] = score
        if "answer" in rec:
            score = next(scores)
            if score is None:
                add("unscored_answers")
            else:
                rec["answer_score"] = score
    return recs, counts
