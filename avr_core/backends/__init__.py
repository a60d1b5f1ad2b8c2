"""Backend factory: config section -> Generator / Scorer, one instance per process.

Loading a model costs seconds to minutes, so instances are cached per (kind, model, settings):
the respond, critique and refine stages of one run share one engine.
"""
from __future__ import annotations

import json
from typing import Any

from avr_core.backends.base import BackendStats, BackendUnavailable, Generator, SamplingParams, Scorer
from avr_core.models import resolve_model_path

__all__ = ["BackendStats", "BackendUnavailable", "Generator", "SamplingParams", "Scorer",
           "make_generator", "make_scorer", "clear_cache"]

_CACHE: dict[str, Any] = {}


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def make_generator(model: dict, backend: dict) -> Generator:
    """`model` = the policy ModelConfig section, `backend` = the generator BackendConfig section."""
    key = _key("gen", model, backend)
    if key not in _CACHE:
        kind = backend["kind"]
        path = resolve_model_path(model["path"])
        if kind == "hf":
            from avr_core.backends.hf import HFGenerator
            _CACHE[key] = HFGenerator(path, model["dtype"], backend["batch_size"], model["trust_remote_code"])
        elif kind == "openai":
            from avr_core.backends.openai_api import OpenAIGenerator
            _CACHE[key] = OpenAIGenerator(base_url=backend["base_url"], model=backend["served_model"] or path,
                                          api_key_env=backend["api_key_env"], concurrency=backend["concurrency"],
                                          timeout_s=backend["timeout_s"], max_retries=backend["max_retries"],
                                          down_budget_s=backend["down_budget_s"])
        elif kind == "vllm":
            from avr_core.backends.vllm_offline import VLLMGenerator
            _CACHE[key] = VLLMGenerator(path, tensor_parallel_size=backend["tensor_parallel_size"],
                                        gpu_memory_utilization=backend["gpu_memory_utilization"],
                                        max_model_len=backend["max_model_len"], dtype=model["dtype"],
                                        trust_remote_code=model["trust_remote_code"])
        else:
            raise ValueError(f"generator.kind: unknown backend {kind!r}")
    return _CACHE[key]


def make_scorer(scorer: dict) -> Scorer:
    key = _key("score", scorer)
    if key not in _CACHE:
        m = scorer["model"]
        path = resolve_model_path(m["path"])
        kw = dict(dtype=m["dtype"], batch_size=scorer["batch_size"], max_length=scorer["max_length"],
                  trust_remote_code=m["trust_remote_code"])
        if scorer["kind"] == "hf_rm":
            from avr_core.backends.hf import HFRewardScorer
            _CACHE[key] = HFRewardScorer(path, **kw)
        elif scorer["kind"] == "judge":
            from avr_core.backends.hf import JudgeScorer
            _CACHE[key] = JudgeScorer(path, **kw)
        else:
            raise ValueError(f"scorer.kind: unknown scorer {scorer['kind']!r}")
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()
