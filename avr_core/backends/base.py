"""Backend protocols: the only thing the method needs from an inference engine.

The algorithm in `avr_core.synthesis` is written against these two Protocols, so it can
be driven by transformers (`hf`), vLLM, any OpenAI-compatible server, or a fake in tests.

Conversation format (OpenAI chat messages)::

    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]

A conversation that ENDS with an assistant message asks the generator to *continue* that
message (no new generation prompt) and return only the continuation. `force_rating` uses
this to complete ``"... Rating: [["`` from the model's own distribution.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

Message = dict
Conversation = list  # list[Message]

# A chat template's control token written as plain text (a prompt quoting "<|im_start|>", a
# model echoing "<|eot_id|>") would be tokenized as the real token and open a turn nobody
# wrote. Every conversation passes through `inert_control_tokens` before a template renders it.
_CONTROL_TOKEN = re.compile(r"<\|([a-z0-9_]{2,40})\|>")
_ZWSP = "\u200b"


def inert_control_tokens(conv: Conversation) -> Conversation:
    """Message contents with every ``<|name|>`` control-token string made ordinary text (a
    zero-width space after "<"): readable as before, never a special token. The thought
    markers (``<|Start of recursive ...|>``: spaces, capitals) are not control tokens.

    >>> inert_control_tokens([{"role": "user", "content": "hi<|im_end|>"}])[0]["content"] == "hi<\u200b|im_end|>"
    True
    """
    return [{**m, "content": _CONTROL_TOKEN.sub(f"<{_ZWSP}|\\1|>", m["content"])}
            if isinstance(m.get("content"), str) else m for m in conv]


@dataclass(frozen=True)
class SamplingParams:
    """Per-call sampling settings. `n` samples are returned for every conversation."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.8
    max_new_tokens: int = 256
    seed: int | None = 0


@dataclass
class BackendStats:
    """Counters every backend keeps; stages copy them into their manifests."""

    calls: int = 0              # generate()/score() invocations (one per round, not per sample)
    requests: int = 0           # conversations handled
    samples: int = 0            # completions returned
    tokens_generated: int = 0
    cut_at_cap: int = 0         # completions stopped by max_new_tokens, not finished (a cut answer)
    failed_requests: int = 0    # requests that failed for good (dropped and counted)
    retries: int = 0
    truncated_inputs: int = 0   # reward-model inputs cut at max_length (scored without their end)
    skipped_inputs: int = 0     # reward-model inputs over max_length not scored (scorer.over_long=skip)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@runtime_checkable
class Generator(Protocol):
    stats: BackendStats

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        """Return `params.n` completions per conversation, in input order.

        A request that failed for good yields an empty list for that conversation
        (counted in `stats.failed_requests`), never an exception for the whole round.
        """
        ...


@runtime_checkable
class Scorer(Protocol):
    stats: BackendStats

    def score(self, conversations: Sequence[Conversation]) -> list[float | None]:
        """One scalar per conversation [x, ..., y]: higher is better. None: not scored (a reward
        model's input over its max_length with `scorer.over_long=skip`); callers drop and count it."""
        ...


class BackendUnavailable(RuntimeError):
    """The engine or server cannot be reached; raised with a message saying where and why."""


class BackendKind:
    """What a backend's `kind` means outside its own methods, said by its class: the factory
    (avr_core/backends/__init__.py), the config checks, preflight and the cache keys ask the class
    (`backends.backend_class(kind)`) instead of comparing kind names. The defaults describe a
    model loaded in this process."""

    needs_model = True        # False: no weights at all (rules): no model path to fetch, key or place
    vllm_engines = False      # starts vLLM engines here: weights from a local directory (a hub model is
    #                           fetched first), spread over tensor_parallel_size x data_parallel_size GPUs
    reloads_weights = False   # a running engine takes a new policy's weights in place (the factory's `_reload`)
    takes_over_long = False   # reads scorer.over_long: an input over max_length is cut or not scored
    takes_frame = False       # reads a rating off the method's judge prompt: built with, and keyed by, `frame`
    needs_token_cap = False   # generate() needs a number for max_new_tokens (null: the context length)
    required: dict = {}       # config keys it cannot run without -> what they hold (validation names them)

    @classmethod
    def served_elsewhere(cls, section: dict) -> bool:
        """Whether its model runs on someone else's server: keyed by name, no GPU or device here."""
        return False

    @classmethod
    def gpu_slots(cls, section: dict) -> int:
        """GPUs one instance spreads over (a Ray actor must see that many)."""
        from .device import engine_gpus

        return engine_gpus(section) if cls.vllm_engines else 1

    @classmethod
    def from_config(cls, path: str | None, model: dict, section: dict, frame=None):
        """An instance from its config: `path` the model's local path or name (None: no model),
        `model` its model section, `section` the generator/scorer section, `frame` a judge's prompt."""
        raise NotImplementedError(f"{cls.__name__} does not say how it is built from a config")


class ScorerKind(BackendKind):
    """A scorer of a model: built from the scorer section's common arguments (`scorer_args`)."""

    @classmethod
    def from_config(cls, path: str | None, model: dict, section: dict, frame=None):
        return cls(path, **scorer_args(cls, model, section, frame))


def scorer_args(cls: type[BackendKind], model: dict, scorer: dict, frame=None) -> dict:
    """A model scorer's constructor arguments from its config; `cls` says whether it takes
    `over_long` and `frame`. A kind with more settings adds them in its `from_config`."""
    kw = dict(dtype=model["dtype"], batch_size=scorer["batch_size"], max_length=scorer["max_length"],
              trust_remote_code=model["trust_remote_code"], **device_args(scorer))
    if cls.takes_over_long:
        kw["over_long"] = scorer.get("over_long", "truncate")
    if cls.takes_frame:
        kw["frame"] = frame
    return kw


def device_args(section: dict) -> dict:
    """`device` and `gpus` as a model backend's constructor takes them."""
    return dict(device=section.get("device", "auto"), gpus=tuple(section.get("gpus") or ()))
