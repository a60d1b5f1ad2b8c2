"""Backend factory: config section -> Generator / Scorer, one instance per process.

Loading a model costs seconds to minutes, so instances are cached per (kind, model, settings):
the respond, critique and refine stages of one run share one engine.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from avr_core.backends.base import BackendStats, BackendUnavailable, Conversation, Generator, SamplingParams, Scorer
from avr_core.models import resolve_model_path

__all__ = ["BackendStats", "BackendUnavailable", "Generator", "SamplingParams", "Scorer",
           "make_generator", "make_scorer", "clear_cache"]

_CACHE: dict[str, Any] = {}

# kind -> "module:class". Strings on purpose: a stage's code version (avr_core/codeversion.py)
# then covers the backend its config selects, not every backend.
GENERATORS = {"hf": "avr_core.backends.hf:HFGenerator",
              "openai": "avr_core.backends.openai_api:OpenAIGenerator",
              "vllm": "avr_core.backends.vllm_offline:VLLMGenerator"}
SCORERS = {"hf_rm": "avr_core.backends.hf:HFRewardScorer",
           "judge": "avr_core.backends.hf:JudgeScorer"}


# (factory, config section, registry): a stage whose code reaches a factory gets the class its
# config's `kind` selects added to its code version (tasks/common.py, stage_code).
REGISTRIES = [((__name__, "make_generator"), "generator", GENERATORS),
              ((__name__, "make_scorer"), "scorer", SCORERS)]


def _load(registry: dict[str, str], kind: str, what: str):
    import importlib

    if kind not in registry:
        raise ValueError(f"{what}.kind: unknown backend {kind!r} (one of {sorted(registry)})")
    module, _, name = registry[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def make_generator(model: dict, backend: dict) -> Generator:
    """`model` = the policy ModelConfig section, `backend` = the generator BackendConfig section."""
    key = _key("gen", model, backend)
    if key not in _CACHE:
        kind = backend["kind"]
        cls = _load(GENERATORS, kind, "generator")
        path = resolve_model_path(model["path"])
        if kind == "hf":
            _CACHE[key] = cls(path, model["dtype"], backend["batch_size"], model["trust_remote_code"])
        elif kind == "openai":
            _CACHE[key] = cls(base_url=backend["base_url"], model=backend["served_model"] or path,
                              api_key_env=backend["api_key_env"], concurrency=backend["concurrency"],
                              timeout_s=backend["timeout_s"], max_retries=backend["max_retries"],
                              down_budget_s=backend["down_budget_s"])
        else:
            _CACHE[key] = cls(path, tensor_parallel_size=backend["tensor_parallel_size"],
                              gpu_memory_utilization=backend["gpu_memory_utilization"],
                              max_model_len=backend["max_model_len"], dtype=model["dtype"],
                              trust_remote_code=model["trust_remote_code"])
    return _CACHE[key]


def make_scorer(scorer: dict, frame: Callable[[Conversation], Conversation] | None = None) -> Scorer:
    """`scorer` = the scorer config section. `frame`: the judge prompt of a `judge` scorer (the
    method's, `avr_core.scorers.make_scorer` passes it; without one its `score` refuses)."""
    frame = frame if scorer["kind"] == "judge" else None
    key = _key("score", scorer, None if frame is None else f"{frame.__module__}.{frame.__qualname__}")
    if key not in _CACHE:
        cls = _load(SCORERS, scorer["kind"], "scorer")
        m = scorer["model"]
        path = resolve_model_path(m["path"])
        kw = dict(dtype=m["dtype"], batch_size=scorer["batch_size"], max_length=scorer["max_length"],
                  trust_remote_code=m["trust_remote_code"])
        _CACHE[key] = cls(path, frame=frame, **kw) if scorer["kind"] == "judge" else cls(path, **kw)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()
