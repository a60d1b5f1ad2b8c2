"""Reading model outputs: critique ratings and the redundancy filter.

Both rules follow the authors' release (src/utils.py `extract_score`,
src/data/prepare_dpo_data.py `check_redundancy`), rewritten, with the edge cases pinned by tests.
"""
from __future__ import annotations

import re
from collections import Counter

_RATING = re.compile(r"\[\[(\d+)\]\]")
_DIGITS = re.compile(r"^\s*(\d+)")


def extract_rating(critique: str) -> int | None:
    """The first `[[k]]` in a critique, if it is a rating in 1..10; else None.

    As in the release, the FIRST `[[k]]` counts and a value outside 1..10 makes the
    critique unparsable (it is re-sampled, then dropped or forced).

    >>> extract_rating("Too short. Rating: [[3]]")
    3
    >>> extract_rating("Rating: [[11]]") is None
    True
    """
    m = _RATING.search(critique)
    if not m:
        return None
    k = int(m.group(1))
    return k if 1 <= k <= 10 else None


def parse_forced_rating(continuation: str) -> int | None:
    """Digits the model wrote right after a forced ``Rating: [[`` prefix.

    >>> parse_forced_rating("7]]")
    7
    >>> parse_forced_rating("10]]")
    10
    >>> parse_forced_rating("great") is None
    True
    """
    m = _DIGITS.match(continuation)
    if not m:
        return None
    k = int(m.group(1))
    return k if 1 <= k <= 10 else None


def is_redundant(text: str, threshold: int = 60) -> bool:
    """True if any word (or, for text without Latin letters, any character) or any run of
    digits/symbols occurs `threshold` or more times: the signature of a degenerate loop.

    >>> is_redundant("ha " * 60)
    True
    >>> is_redundant("A normal answer.")
    False
    """
    compact = text.replace(" ", "")
    if any(c >= threshold for c in Counter(re.findall(r"[\d\W]+", compact)).values()):
        return True
    words = re.findall(r"\b\w+\b", text.lower()) if re.search(r"[a-zA-Z]", text) else list(text)
    return any(c >= threshold for c in Counter(words).values())


def is_unchanged(refinement: str, answer: str) -> bool:
    """A "refinement" that only copies the answer (ignoring surrounding whitespace)."""
    return " ".join(refinement.split()) == " ".join(answer.split())
