"""Long refinement thoughts (docs/DESIGN.md step 8): a search trace as ONE assistant turn, and back.

The layout is the authors' (src/data/prepare_cot_sft_data_greedy.py); the markers live in
`avr_core.prompts`, once::

    <|Start of recursive criticism and improvement|>

    ## Let's answer the question first:
    {y0}

    ## Now, let's try to criticize this answer:
    {c1}

    ## Okey, let's improve the above answer based on the criticism:
    {y1}

    ... one (critique, improvement) per improving round ...

    ## Now, let's try to criticize this answer:
    {final critique: the round that did not improve}

    ## Okay, now it’s almost done.

    <|End of recursive criticism and improvement|>

    Final answer:

    {best answer}
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from avr_core.prompts import (
    FINAL_ANSWER,
    THOUGHT_ALMOST_DONE,
    THOUGHT_ANSWER,
    THOUGHT_CRITICIZE,
    THOUGHT_END,
    THOUGHT_IMPROVE,
    THOUGHT_START,
)


@dataclass
class Thought:
    answer: str                                         # y0
    steps: list[tuple[str, str]] = field(default_factory=list)   # (critique, improvement) per improving round
    final_critique: str | None = None
    final_answer: str | None = None


def format_thought(t: Thought) -> str:
    """One assistant turn. `final_answer` defaults to the last improvement (or y0).

    >>> print(format_thought(Thought("5", [("Wrong.", "4")], "Correct now.")).splitlines()[-1])
    4
    """
    parts = [f"{THOUGHT_START}\n\n{THOUGHT_ANSWER}\n{t.answer}\n\n"]
    for critique, improvement in t.steps:
        parts.append(f"{THOUGHT_CRITICIZE}\n{critique}\n\n{THOUGHT_IMPROVE}\n{improvement}\n\n")
    if t.final_critique is not None:
        parts.append(f"{THOUGHT_CRITICIZE}\n{t.final_critique}\n\n")
    final = t.final_answer if t.final_answer is not None else (t.steps[-1][1] if t.steps else t.answer)
    parts.append(f"{THOUGHT_ALMOST_DONE}\n\n{THOUGHT_END}\n\n{FINAL_ANSWER}\n\n{final}")
    return "".join(parts)


_SECTION = re.compile("|".join(re.escape(m) for m in (THOUGHT_ANSWER, THOUGHT_CRITICIZE, THOUGHT_IMPROVE,
                                                      THOUGHT_ALMOST_DONE)))


def parse_thought(text: str) -> Thought:
    """Recover every round and the final answer from a (possibly malformed) thought.

    Only the part before the END marker is split into sections, and only at markers that start
    a line, so an answer quoting a marker mid-line cannot inject a round. A missing section
    leaves its field empty rather than raising.
    """
    ends = [m.start() for m in re.finditer(re.escape(THOUGHT_END), text) if _line_start(text, m.start())]
    body, tail = (text[:ends[-1]], text[ends[-1] + len(THOUGHT_END):]) if ends else (text, "")
    body = body.split(THOUGHT_START, 1)[-1]
    sections: list[tuple[str, str]] = []
    marks = [m for m in _SECTION.finditer(body) if _line_start(body, m.start())]
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        sections.append((m.group(0), _strip_section(body[m.end():end])))
    t = Thought(answer="")
    pending: str | None = None
    for marker, content in sections:
        if marker == THOUGHT_ANSWER:
            t.answer = content
        elif marker == THOUGHT_CRITICIZE:
            if pending is not None:          # two critiques in a row: the earlier one had no improvement
                t.final_critique = pending
            pending = content
        elif marker == THOUGHT_IMPROVE and pending is not None:
            t.steps.append((pending, content))
            pending = None
    if pending is not None:
        t.final_critique = pending
    head, sep, answer = tail.partition(FINAL_ANSWER)
    if sep:
        t.final_answer = answer[2:] if answer.startswith("\n\n") else answer.strip("\n")
    return t


def _line_start(s: str, i: int) -> bool:
    return i == 0 or s[i - 1] == "\n"


def _strip_section(s: str) -> str:
    # sections are written as "\n{content}\n\n": undo exactly that, keep the content's own spacing
    if s.startswith("\n"):
        s = s[1:]
    return s[:-2] if s.endswith("\n\n") else s.rstrip("\n")


_AUTHORS_FINAL = re.compile(r"Final answer:\n\n(.*)", re.DOTALL)


def extract_final_answer_authors(text: str | None) -> str | None:
    """The authors' rule (src/utils.py:148-153, src/eval/generate_alpaca_eval2_cot.py:12-17): the
    text after the FIRST "Final answer:\\n\\n" anywhere (no END marker or line start needed),
    stripped; None when it is absent -- they then re-sample, and finally drop the sample.

    >>> extract_final_answer_authors("x Final answer:\\n\\n  4 \\n")
    '4'
    >>> extract_final_answer_authors("Final answer: 4") is None
    True
    """
    m = _AUTHORS_FINAL.search(text or "")
    return m.group(1).strip() if m else None


def final_answer(text: str, rule: str = "ours") -> tuple[str, str, bool]:
    """(answer, path, found) under `rule`: "ours" (`extract_final_answer`) or "authors"
    (`extract_final_answer_authors`, falling back to ours where it finds none, path
    ``authors_none_<our path>``). `found` says whether the rule found its final answer: what
    decides a re-sample (thought.final_answer_tries / eval.final_answer_tries).

    >>> final_answer("no markers", "authors")
    ('no markers', 'authors_none_raw', False)
    """
    if rule == "authors":
        got = extract_final_answer_authors(text)
        if got is not None:
            return got, "final_answer", True
        answer, path = extract_final_answer(text)
        return answer, f"authors_none_{path}", False
    answer, path = extract_final_answer(text)
    return answer, path, path == "final_answer"


def extract_final_answer(text: str) -> tuple[str, str]:
    """(answer, path): the `Final answer:` section; else the last improvement; else the raw
    output. Never empty-handed, so evaluation never drops a prompt.

    >>> extract_final_answer("no markers at all")
    ('no markers at all', 'raw')
    """
    t = parse_thought(text)
    if t.final_answer:
        return t.final_answer, "final_answer"
    if t.steps and t.steps[-1][1]:
        return t.steps[-1][1], "last_improvement"
    return text.strip(), "raw"
