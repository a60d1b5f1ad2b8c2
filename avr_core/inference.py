"""Answer a prompt with a trained AvR model (docs/DESIGN.md steps 10-11).

- A Stage-1 model refines explicitly: answer, then R rounds of [critique, refine] in its own
  conversation, with the prompts it was trained on (JUDGE_TRAIN / REFINE_TRAIN).
- A Stage-2 model writes one long refinement thought; the final answer is extracted from it
  (fallbacks: last improvement, then the raw output -- never empty-handed).

    >>> answer_prompts([[{"role": "user", "content": "2+2?"}]], gen, mode="refine", rounds=1)  # doctest: +SKIP
    [{'answer': '4', 'raw': '4', 'path': 'refine', 'rounds': 1, 'trace': [...], 'answers': ['5', '4']}]

`answers[r]` is the answer after r rounds, so ONE run at R rounds also gives every R' < R
(decoding is deterministic at temperature 0): what the test-time-scaling curve reads.

Every prompt of a batch goes to the generator in one call per round.
"""
from __future__ import annotations

from typing import Callable

from avr_core.backends.base import Generator, SamplingParams
from avr_core.prompts import JUDGE_TRAIN, REFINE_TRAIN, THOUGHT_IMPROVE, judge_conversation, refine_conversation
from avr_core.thought import extract_final_answer


def answer_prompts(prompts: list[list[dict]], gen: Generator, mode: str = "refine", rounds: int = 0,
                   params: SamplingParams = SamplingParams(n=1, temperature=0.0, max_new_tokens=512)) -> list[dict]:
    """mode "refine" (Stage-1 / seed models, R = `rounds` in 0..5) or "thought" (Stage-2 models)."""
    if mode not in ("refine", "thought"):
        raise ValueError(f"mode must be refine or thought, got {mode!r}")
    if not 0 <= rounds <= 5:
        raise ValueError(f"rounds must be in 0..5, got {rounds}")
    first = [_one(o) for o in gen.generate(prompts, params)]
    if mode == "thought":
        out = []
        for raw in first:
            answer, path = extract_final_answer(raw)
            out.append({"answer": answer, "raw": raw, "path": path, "rounds": raw.count(THOUGHT_IMPROVE),
                        "trace": [], "answers": [answer]})
        return out
    current = list(first)
    traces: list[list[dict]] = [[] for _ in prompts]
    history: list[list[str]] = [[a] for a in first]
    for _ in range(rounds):
        crits = [_one(o) for o in gen.generate([judge_conversation(p, a, JUDGE_TRAIN)
                                                for p, a in zip(prompts, current)], params)]
        refs = [_one(o) for o in gen.generate([refine_conversation(p, a, c, JUDGE_TRAIN, REFINE_TRAIN)
                                               for p, a, c in zip(prompts, current, crits)], params)]
        for i, (c, r) in enumerate(zip(crits, refs)):
            traces[i].append({"critique": c, "refinement": r})
            if r.strip():                      # an empty refinement keeps the previous answer
                current[i] = r
            history[i].append(current[i])
    return [{"answer": a, "raw": a, "path": "refine" if rounds else "direct", "rounds": rounds, "trace": t,
             "answers": h} for a, t, h in zip(current, traces, history)]


def _one(outs: list[str]) -> str:
    return outs[0] if outs else ""


def eval_answers(records: list[dict], gen: Generator, name: str, mode: str, rounds: int, params: SamplingParams,
                 tokens: Callable[[str], int | None] = lambda text: None) -> tuple[list[dict], dict]:
    """Every eval prompt answered (`answer_prompts`, one generator call per step; never dropped),
    as alpaca-eval model-output records plus what the answer came from. `tokens(text)` counts an
    answer's tokens (None: no tokenizer). Returns (records, counts).

    Input record (an eval-set record)::

        {"id": "e1", "instruction": "2+2?", "messages": [{"role": "user", "content": "2+2?"}],
         "dataset": "helpful_base", "reference": "4", "reference_generator": "gpt4_turbo"}

    Output record::

        {"id": "e1", "instruction": "2+2?", "output": "4", "generator": "seed", "dataset": "helpful_base",
         "raw": "4", "path": "direct", "rounds": 0, "len_chars": 1, "len_tokens": 1}

    Counts: ``answer_from_<path>`` per prompt and ``empty_answers``.
    """
    outs = answer_prompts([r["messages"] for r in records], gen, mode, rounds, params)
    recs, counts = [], {}
    for r, o in zip(records, outs):
        key = f"answer_from_{o['path']}"
        counts[key] = counts.get(key, 0) + 1
        counts["empty_answers"] = counts.get("empty_answers", 0) + (not o["answer"].strip())
        recs.append({"id": r["id"], "instruction": r["instruction"], "output": o["answer"], "generator": name,
                     "dataset": r["dataset"], "raw": o["raw"], "path": o["path"], "rounds": o["rounds"],
                     "len_chars": len(o["answer"]), "len_tokens": tokens(o["answer"])})
    return recs, counts
