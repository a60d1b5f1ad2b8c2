"""The method's side of scoring: the judge prompt a `judge` scorer frames [x, y] with.

Backends (`avr_core.backends`) import nothing from the method; the LLM-judge scorer gets its
prompt from here. `make_scorer` is the factory stages call: the backend's, with the frame.

    >>> conv = judge_frame([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    >>> conv[-1]
    {'role': 'assistant', 'content': 'Rating: [['}
"""
from __future__ import annotations

from avr_core import backends
from avr_core.backends.base import Conversation, Scorer
from avr_core.prompts import FORCED_RATING_PREFIX, JUDGE_SAMPLING, judge_conversation


def judge_frame(conv: Conversation) -> Conversation:
    """[x, ..., y] -> the judge conversation about answer y (MT-Bench prompt, `JUDGE_SAMPLING`)
    ending with the forced ``Rating: [[`` assistant turn the judge model continues."""
    judged = judge_conversation(conv[:-1], conv[-1]["content"], JUDGE_SAMPLING)
    judged.append({"role": "assistant", "content": FORCED_RATING_PREFIX.lstrip()})
    return judged


def make_scorer(scorer: dict) -> Scorer:
    """`avr_core.backends.make_scorer` with the method's judge prompt (used by `judge` scorers)."""
    return backends.make_scorer(scorer, frame=judge_frame)
