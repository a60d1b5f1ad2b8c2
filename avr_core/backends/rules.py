"""`rules`: a verifiable-reward scorer. r(x, y) = the fraction of prompt x's constraints that y satisfies.

The constraints are data: each row of the constraint prompt file (`scorer.constraints`, usually
the same file as `data.prompts`) carries them, e.g.::

    {"id": "sig-0007", "prompt": "Describe a lighthouse. Answer with less than 60 words.",
     "constraints": [{"id": "length_constraints:number_words", "kwargs": {"num_words": 60, "relation": "less than"}}]}

The checkers are IFEval's instruction registry (Google Research, Apache-2.0) as the PyPI package
`if-verifiable` ships it (`if_verifiable.ifeval.instructions_registry.INSTRUCTION_DICT`); nothing
here re-implements a check. IFEval's *strict* rule: an empty answer follows nothing. Two things
are pinned so a score is a pure function of (prompt, answer):

* sentence counting uses the library's own rule-based `split_into_sentences` instead of NLTK's
  Punkt model, which is a data download (no package ships it) that IFEval fetches at run time;
* `langdetect` (the case checkers ask "is this English?") is seeded, as its docs require for
  deterministic results.

A conversation is looked up by the text of its last user turn; a prompt the file does not list is
an error, never a silent 0.

    >>> x = [{"role": "user", "content": "Hi. Answer with less than 3 words."}]
    >>> s = RulesScorer.from_rows([{"messages": x, "constraints": [
    ...     {"id": "length_constraints:number_words", "kwargs": {"num_words": 3, "relation": "less than"}},
    ...     {"id": "punctuation:no_comma", "kwargs": {}}]}])
    >>> s.score([x + [{"role": "assistant", "content": "Hello there"}],
    ...          x + [{"role": "assistant", "content": "Hello, dear friend"}]])
    [1.0, 0.0]
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from avr_core.backends.base import BackendKind, BackendStats, Conversation

ROOT = Path(__file__).resolve().parents[2]


def _registry() -> dict:
    """IFEval's INSTRUCTION_DICT (id -> checker class), with the two determinism pins applied."""
    import langdetect
    from if_verifiable.ifeval import instructions_registry, instructions_util

    langdetect.DetectorFactory.seed = 0
    if getattr(instructions_util.count_sentences, "__module__", "") != __name__:
        instructions_util.count_sentences = _count_sentences
    return instructions_registry.INSTRUCTION_DICT


def _count_sentences(text: str) -> int:
    from if_verifiable.ifeval.instructions_util import split_into_sentences

    return len(split_into_sentences(text))


def _prompt_key(conv: Conversation) -> str:
    users = [m["content"] for m in conv if m.get("role") == "user"]
    if not users:
        raise ValueError("rules scorer: a conversation without a user turn has no constraints to check")
    return users[-1].strip()


class RulesScorer(BackendKind):
    """`Scorer` over the constraint prompt file at `path` (a relative path: the working directory,
    then the project checkout). `stats.requests` counts answers checked."""

    needs_model = False
    required = {"constraints": "the prompt file whose rows carry `constraints`"}

    @classmethod
    def from_config(cls, path, model, scorer, frame=None):
        return cls(scorer["constraints"])

    def __init__(self, path: str):
        from avr_core.inputs import load_prompts

        p = Path(path)
        if not p.exists() and (ROOT / path).exists():
            p = ROOT / path
        self.path = str(p)
        self._init(load_prompts(p), self.path)

    @classmethod
    def from_rows(cls, rows: list[dict], name: str = "<rows>") -> RulesScorer:
        self = cls.__new__(cls)
        self.path = name
        self._init(rows, name)
        return self

    def _init(self, rows: list[dict], name: str) -> None:
        registry = _registry()
        self.stats = BackendStats()
        self.constraints: dict[str, list[tuple[str, dict]]] = {}
        for row in rows:
            if not row.get("constraints"):
                continue
            key = _prompt_key(row["messages"])
            cons = []
            for c in row["constraints"]:
                if c["id"] not in registry:
                    raise ValueError(f"{name}: prompt {key[:60]!r}: unknown constraint id {c['id']!r} "
                                     f"(IFEval's registry has {len(registry)}: e.g. length_constraints:number_words)")
                kwargs = {k: v for k, v in (c.get("kwargs") or {}).items() if v is not None}
                checker = registry[c["id"]](c["id"])
                try:
                    checker.build_description(**kwargs)   # the arguments are checked here, once
                except TypeError as e:
                    raise ValueError(f"{name}: prompt {key[:60]!r}: constraint {c['id']!r}: bad kwargs "
                                     f"{kwargs}: {e}") from None
                missing = set(checker.get_instruction_args() or {}) - set(kwargs)
                if missing:   # IFEval would draw them at random: a score must not depend on chance
                    raise ValueError(f"{name}: prompt {key[:60]!r}: constraint {c['id']!r}: kwargs missing "
                                     f"{sorted(missing)}")
                cons.append((c["id"], kwargs))
            if key in self.constraints and self.constraints[key] != cons:
                raise ValueError(f"{name}: prompt {key[:60]!r} appears twice with different constraints")
            self.constraints[key] = cons
        if not self.constraints:
            raise ValueError(f"{name}: no row has 'constraints': the rules scorer has nothing to check")
        self._registry = registry

    def check(self, prompt: str, answer: str) -> list[bool]:
        """One verdict per constraint of `prompt` (IFEval strict: an empty answer follows none)."""
        key = prompt.strip()
        if key not in self.constraints:
            raise KeyError(f"rules scorer: prompt not in {self.path}: {key[:80]!r} -- every scored prompt "
                           "needs its constraints in scorer.constraints (usually the same file as data.prompts)")
        out = []
        for cid, kwargs in self.constraints[key]:
            checker = self._registry[cid](cid)
            checker.build_description(**kwargs)
            out.append(bool(answer.strip()) and bool(checker.check_following(answer)))
        return out

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        self.stats.calls += 1
        scores = []
        for conv in conversations:
            verdicts = self.check(_prompt_key(conv[:-1]), conv[-1]["content"])
            scores.append(sum(verdicts) / len(verdicts))
        self.stats.requests += len(conversations)
        return scores
