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

from dataclasses import replace
from typing import Callable

from avr_core.backends.base import Generator, SamplingParams
from avr_core.prompts import JUDGE_TRAIN, REFINE_TRAIN, THOUGHT_IMPROVE, judge_conversation, refine_conversation
from avr_core.thought import extract_final_answer_authors, final_answer


def answer_prompts(prompts: list[list[dict]], gen: Generator, mode: str = "refine", rounds: int = 0,
                   params: SamplingParams = SamplingParams(n=1, temperature=0.0, max_new_tokens=512),
                   extract: str = "ours", final_answer_tries: int = 1) -> list[dict]:
    """mode "refine" (Stage-1 / seed models, R = `rounds` in 0..5) or "thought" (Stage-2 models).

    Thought mode: the final answer under rule `extract` (`avr_core.thought.final_answer`); a prompt
    whose rule finds none is asked again, all such prompts in ONE generator call per retry round,
    up to `final_answer_tries` samples in all (the authors: 5 with their rule,
    src/eval/generate_alpaca_eval2_cot.py:57-65). After that it keeps our fallback answer (never
    dropped); `authors_would_drop` marks a prompt for which the authors' own rule still finds no
    final answer -- their script drops it (:66-68)."""
    if mode not in ("refine", "thought"):
        raise ValueError(f"mode must be refine or thought, got {mode!r}")
    if not 0 <= rounds <= 5:
        raise ValueError(f"rounds must be in 0..5, got {rounds}")
    first = [_one(o) for o in gen.generate(prompts, params)]
    if mode == "thought":
        got = [final_answer(raw, extract) + (raw,) for raw in first]
        tries = [1] * len(prompts)
        for t in range(1, final_answer_tries):
            missing = [i for i, g in enumerate(got) if not g[2]]
            if not missing:
                break
            again = gen.generate([prompts[i] for i in missing], replace(params, seed=(params.seed or 0) + 7919 * t))
            for i, o in zip(missing, again):
                got[i], tries[i] = final_answer(_one(o), extract) + (_one(o),), t + 1
        return [{"answer": answer, "raw": raw, "path": path, "rounds": raw.count(THOUGHT_IMPROVE), "trace": [],
                 "answers": [answer], "tries": n, "authors_would_drop": extract_final_answer_authors(raw) is None}
                for (answer, path, _, raw), n in zip(got, tries)]
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
                 tokens: Callable[[str], int | None] = lambda text: None, extract: str = "ours",
                 final_answer_tries: int = 1) -> tuple[list[dict], dict]:
    """Every eval prompt answered (`answer_prompts`, one generator call per step; never dropped),
    as alpaca-eval model-output records plus what the answer came from. `tokens(text)` counts an
    answer's tokens (None: no tokenizer). Returns (records, counts).

    Input record (an eval-set record)::

        {"id": "e1", "instruction": "2+2?", "messages": [{"role": "user", "content": "2+2?"}],
         "dataset": "helpful_base", "reference": "4", "reference_generator": "gpt4_turbo"}

    Output record::

        {"id": "e1", "instruction": "2+2?", "output": "4", "generator": "seed", "dataset": "helpful_base",
         "raw": "4", "path": "direct", "rounds": 0, "len_chars": 1, "len_tokens": 1}

    A Stage-2 (thought) record also has ``tries`` (samples taken) and ``authors_would_drop``.

    Counts: ``answer_from_<path>`` per prompt and ``empty_answers``; thought mode also
    ``resampled_no_final`` (re-samples taken) and ``authors_would_drop`` (prompts the authors'
    script would have dropped: their rule found no "Final answer:" in the last sample).
    """
    outs = answer_prompts([r["messages"] for r in records], gen, mode, rounds, params, extract, final_answer_tries)
    recs, counts = [], {}
    for r, o in zip(records, outs):
        key = f"answer_from_{o['path']}"
        counts[key] = counts.get(key, 0) + 1
        counts["empty_answers"] = counts.get("empty_answers", 0) + (not o["answer"].strip())
        recs.append({"id": r["id"], "instruction": r["instruction"], "output": o["answer"], "generator": name,
                     "dataset": r["dataset"], "raw": o["raw"], "path": o["path"], "rounds": o["rounds"],
                     "len_chars": len(o["answer"]), "len_tokens": tokens(o["answer"])})
        if mode == "thought":
            recs[-1].update(tries=o["tries"], authors_would_drop=o["authors_would_drop"])
            counts["resampled_no_final"] = counts.get("resampled_no_final", 0) + o["tries"] - 1
            counts["authors_would_drop"] = counts.get("authors_would_drop", 0) + o["authors_would_drop"]
    return recs, counts
