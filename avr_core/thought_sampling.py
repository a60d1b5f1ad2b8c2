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

Counts: ``final_from_<path>`` per sample (``final_from_final_answer``,
``final_from_last_improvement``, ``final_from_raw``).
"""
from __future__ import annotations

from avr_core.backends.base import Generator, Scorer
from avr_core.synthesis import Sampling
from avr_core.thought import extract_final_answer


def sample_thoughts(records: list[dict], gen: Generator, scorer: Scorer, sampling: Sampling, s: int,
                    salt: int = 0) -> tuple[list[dict], dict]:
    """`s` thoughts per record from `gen` (one call), their final answers scored by `scorer`
    (one call, skipped when no thought came back). Returns (records, counts).

    >>> recs, counts = sample_thoughts([{"id": "p1", "messages": [{"role": "user", "content": "2+2?"}]}],
    ...                                gen, scorer, Sampling(), s=2)  # doctest: +SKIP
    >>> recs[0]["thoughts"][0]  # doctest: +SKIP
    {'text': '... Final answer:\\n\\n4', 'final': '4', 'path': 'final_answer', 'score': 7.5}
    >>> counts  # doctest: +SKIP
    {'final_from_final_answer': 2}
    """
    outs = gen.generate([r["messages"] for r in records], sampling.params(s, salt))
    recs, finals, counts = [], [], {}
    for r, texts in zip(records, outs):
        ts = []
        for text in texts:
            final, path = extract_final_answer(text)
            counts[f"final_from_{path}"] = counts.get(f"final_from_{path}", 0) + 1
            ts.append({"text": text, "final": final, "path": path})
            finals.append([*r["messages"], {"role": "assistant", "content": final}])
        recs.append({"id": r["id"], "messages": r["messages"], "thoughts": ts})
    scores = iter(scorer.score(finals) if finals else [])
    for rec in recs:
        for t in rec["thoughts"]:
            t["score"] = next(scores)
    return recs, counts
