"""Fakes for unit tests of CONTROL FLOW only -- never a stand-in for the product.

`FakeGenerator` answers from a script keyed by what the conversation asks for, and records
every call, so tests can assert "one call per round" and "no generation happened".
"""
from __future__ import annotations

from avr_core.backends.base import BackendStats, SamplingParams
from avr_core.prompts import JUDGE_SAMPLING, REFINE_SAMPLING
from avr_core.thought import Thought, format_thought


class FakeGenerator:
    def __init__(self, critiques=("Too short. Rating: [[3]]",), refinements=None, answer="An answer.",
                 forced="4]]", fail_on_call: int | None = None):
        self.critiques, self.answer, self.forced = list(critiques), answer, forced
        self.refinements = refinements or (lambda conv, j: f"Better answer #{j} to: {conv[0]['content']}")
        self.calls: list[tuple[int, SamplingParams]] = []
        self.fail_on_call = fail_on_call
        self.stats = BackendStats()
        self._crit_i = 0

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("FakeGenerator: injected failure")
        self.stats.calls += 1
        self.stats.requests += len(conversations)
        out = []
        for conv in conversations:
            last = conv[-1]
            if last["role"] == "assistant":            # forced-rating continuation
                out.append([self.forced])
            elif last["content"] == JUDGE_SAMPLING:     # critique
                texts = []
                for _ in range(params.n):
                    texts.append(self.critiques[self._crit_i % len(self.critiques)])
                    self._crit_i += 1
                out.append(texts)
            elif last["content"] == REFINE_SAMPLING:    # refinement
                out.append([self.refinements(conv, j) for j in range(params.n)])
            else:                                       # respond
                out.append([self.answer] * params.n)
        self.stats.samples += sum(len(o) for o in out)
        self.stats.tokens_generated += sum(len(t.split()) for o in out for t in o)
        return out


class FakeScorer:
    """Scores an answer by its length in words (longer = better): predictable by hand."""

    def __init__(self, fn=None):
        self.fn = fn or (lambda text: float(len(text.split())))
        self.stats = BackendStats()
        self.calls = 0

    def score(self, conversations):
        self.calls += 1
        self.stats.calls += 1
        return [self.fn(c[-1]["content"]) for c in conversations]


class ThoughtWriter(FakeGenerator):
    """Writes well-formed refinement thoughts whose final answers are, in order, "ok", "a much
    longer final answer here", "fine answer" (the first `n` of them per prompt)."""

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        finals = ["ok", "a much longer final answer here", "fine answer"]
        return [[format_thought(Thought("draft", [("c", f)], "good")) for f in finals[:params.n]]
                for _ in conversations]
