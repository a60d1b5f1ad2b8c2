"""Backend factory: config section -> Generator / Scorer, cached in this process.

Loading a model costs seconds to minutes, so an instance is cached per (kind, model, settings).
At the end of every stage the skeleton calls `release()` (tasks/runtime/skeleton.py::run_stage): every
engine is closed (vLLM engine processes end, HF models are dropped, accelerator memory is
emptied), unless its section says `keep_engine: true`. Kept engines live for the whole run:

- a new policy for a kept vLLM engine of the same architecture and tokenizer goes INTO it
  (`_reload`: `reload_weights` + prefix-cache reset; avr_core/backends/weights.py says when);
  anything else starts a new engine, and the log says why in one line;
- building a backend first frees the accelerator for it (`_make_room`): another role's kept
  engine on the same GPUs sleeps (CUDA) and wakes when its role's turn comes; on disjoint `gpus`,
  or both on the CPU, both stay; anything else is closed;
- a training or the reference pass `suspend()`s them: asleep on CUDA, as they are on the CPU;
- a backend that reports itself closed (a dead engine) is never handed out again.

`builds()` lists every engine start and reload with its seconds (the run's wall-time table);
`used()` tells the skeleton which devices the stage's backends ran on, for its manifest.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from avr_core.backends.base import (
    BackendKind,
    BackendStats,
    BackendUnavailable,
    Conversation,
    Generator,
    SamplingParams,
    Scorer,
)
from avr_core.model_refs import resolve_model_path

__all__ = ["BackendKind", "BackendStats", "BackendUnavailable", "Generator", "SamplingParams", "Scorer",
           "backend_class", "make_generator", "make_scorer", "clear_cache", "release", "used"]

log = logging.getLogger(__name__)

# model-section keys that only say WHICH weights (a policy change), not how the engine runs them
WEIGHTS_ONLY = ("path", "revision", "identity", "artifact")

_CACHE: dict[str, Any] = {}
_META: dict[str, dict] = {}      # key -> {"role", "keep", "gpus"}
_USED: dict[str, str] = {}       # role -> device label, since the last `used()`
_HOOKS: list[Callable[[], None]] = []   # releases of models held outside this cache (the local judge)
_BUILDS: list[dict] = []         # every start or reload, in order: {"role", "kind", "event", "seconds"}

# kind -> "module:class". Strings on purpose: a stage's code version (avr_core/codeversion.py)
# then covers the backend its config selects, not every backend. What a kind means (its
# constructor arguments, GPUs, weights) its class says (base.py BackendKind); kind names are
# unique across both registries, so a section's `kind` alone names its class (`backend_class`).
GENERATORS = {"hf": "avr_core.backends.hf:HFGenerator",
              "openai": "avr_core.backends.openai_api:OpenAIGenerator",
              "vllm": "avr_core.backends.vllm_offline:VLLMGenerator"}
SCORERS = {"hf_rm": "avr_core.backends.hf:HFRewardScorer",
           "judge": "avr_core.backends.hf:JudgeScorer",
           "vllm_judge": "avr_core.backends.vllm_judge:VLLMJudgeScorer",
           "vllm_rm": "avr_core.backends.vllm_rm:VLLMRewardScorer",
           "rules": "avr_core.backends.rules:RulesScorer"}

# (factory, config section, registry): a stage whose code reaches a factory gets the class its
# config's `kind` selects added to its code version (tasks/runtime/keys.py, stage_code).
REGISTRIES = [((__name__, "make_generator"), "generator", GENERATORS),
              ((__name__, "make_scorer"), "scorer", SCORERS)]


def _load(registry: dict[str, str], kind: str, what: str):
    import importlib

    if kind not in registry:
        raise ValueError(f"{what}.kind: unknown backend {kind!r} (one of {sorted(registry)})")
    module, _, name = registry[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def backend_class(kind: str | None) -> type[BackendKind]:
    """The class a generator or scorer `kind` names; `BackendKind` (a model loaded here, nothing
    special) for a section without a registered kind, so a cache key or check of such a section
    stays what it was (config validation refuses unknown kinds before any of them run)."""
    for registry in (GENERATORS, SCORERS):
        if kind in registry:
            return _load(registry, kind, "backend")
    return BackendKind


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def make_generator(model: dict, backend: dict) -> Generator:
    """`model` = the policy ModelConfig section, `backend` = the generator BackendConfig section.
    A new policy for a running vLLM engine of the same architecture and tokenizer goes into that
    engine (`_reload`); anything else starts a new one."""
    key = _key("gen", model, backend)
    _drop_closed(key)
    if key not in _CACHE:
        kind = backend["kind"]
        cls = _load(GENERATORS, kind, "generator")
        path = _local(cls, model)
        engine = _key(kind, {k: v for k, v in model.items() if k not in WEIGHTS_ONLY}, backend)
        why = _reload(key, engine, path, model.get("dtype", "auto") != "auto") if cls.reloads_weights else None
        if why == "reloaded":
            return _use(key)
        _make_room(key, backend, "generator")
        t0 = time.perf_counter()
        _CACHE[key] = cls.from_config(path, model, backend)
        _META[key] = {"role": "generator", "keep": bool(backend.get("keep_engine")),
                      "gpus": tuple(backend.get("gpus") or ()), "cpu": _on_cpu(backend), "engine": engine,
                      "weights": path}
        _BUILDS.append({"role": "generator", "kind": kind, "event": "start", "why": why,
                        "seconds": round(time.perf_counter() - t0, 2)})
    return _use(key)


def _local(cls: type[BackendKind], model: dict) -> str:
    """The model's path for its backend. A vLLM engine gets a local directory: a hub model is
    fetched first (avr_core/hub.py::fetch_weights), so the engine's start timeout times the start,
    not a download, and a model that cannot be had fails now, in one line (review F13)."""
    path = resolve_model_path(model["path"])
    if not cls.vllm_engines:
        return path                       # HF loads download themselves, with no start timeout
    from avr_core.hub import fetch_weights
    return fetch_weights(path, model.get("revision"))


def _reload(key: str, engine: str, path: str, dtype_fixed: bool) -> str | None:
    """Put the weights at `path` into the running generator engine of the same settings, and file
    it under `key` (the new policy): "reloaded". Otherwise why a new engine starts instead (one
    log line; the start's `builds()` entry carries it), or None when no engine of these settings
    runs (a first start needs no reason)."""
    from .weights import reload_problem

    old = next((k for k, m in _META.items() if m.get("engine") == engine), None)
    if old is None:
        return None
    obj, meta = _CACHE[old], _META[old]
    if getattr(obj, "closed", False):
        _close(old)
        return "the running engine had died"
    if obj.asleep:    # its turn again: the other role's engine on these GPUs sleeps first
        _room_to_wake(old)
    if (why := reload_problem(meta["weights"], path, dtype_fixed)) is not None:
        log.info("generator: a new engine for %s, not a reload into the running one: %s", path, why)
        return why
    t0 = time.perf_counter()
    obj.reload(path)
    seconds = round(time.perf_counter() - t0, 2)
    _CACHE[key] = _CACHE.pop(old)
    _META[key] = {**_META.pop(old), "weights": path}
    _BUILDS.append({"role": "generator", "kind": "vllm", "event": "reload", "seconds": seconds, "why": path})
    log.info("generator: new weights into the running engine in %.1fs (%s)", seconds, path)
    return "reloaded"


def _drop_closed(key: str) -> None:
    """A cached backend that reports itself closed (an engine process died, a read was cut, the
    engine core died) is dropped, so the next use builds a new one instead of failing forever."""
    obj = _CACHE.get(key)
    if obj is not None and getattr(obj, "closed", False):
        log.warning("%s backend was closed underneath (a dead engine): building a new one",
                    _META.get(key, {}).get("role", "a"))
        _close(key)


def make_scorer(scorer: dict, frame: Callable[[Conversation], Conversation] | None = None) -> Scorer:
    """`scorer` = the scorer config section. `frame`: the judge prompt of a `judge` scorer (the
    method's, `avr_core.scorers.make_scorer` passes it; without one its `score` refuses)."""
    cls = _load(SCORERS, scorer["kind"], "scorer")
    frame = frame if cls.takes_frame else None
    key = _key("score", scorer, None if frame is None else f"{frame.__module__}.{frame.__qualname__}")
    _drop_closed(key)
    if key not in _CACHE:
        if not cls.needs_model:        # verifiable constraints (rules.py): nothing to fetch, place or time
            _CACHE[key] = cls.from_config(None, {}, scorer)
            _META[key] = {"role": "scorer", "keep": False, "gpus": ()}
            return _use(key)
        _make_room(key, scorer, "scorer")
        m = scorer["model"]
        path = _local(cls, m) if not scorer.get("base_url") else resolve_model_path(m["path"])
        t0 = time.perf_counter()
        _CACHE[key] = cls.from_config(path, m, scorer, frame)
        _BUILDS.append({"role": "scorer", "kind": scorer["kind"], "event": "start",
                        "seconds": round(time.perf_counter() - t0, 2)})
        _META[key] = {"role": "scorer", "keep": bool(scorer.get("keep_engine")),
                      "gpus": tuple(scorer.get("gpus") or ()), "cpu": _on_cpu(scorer)}
    return _use(key)


def _use(key: str):
    obj = _CACHE[key]
    if getattr(obj, "asleep", False):      # its role's turn again: the other role sleeps, it wakes
        meta = _META[key]
        _room_to_wake(key)
        t0 = time.perf_counter()
        obj.wake()
        _BUILDS.append({"role": meta.get("role"), "kind": "vllm", "event": "reload",
                        "seconds": round(time.perf_counter() - t0, 2)})
    _USED[_META.get(key, {}).get("role", "backend")] = str(getattr(obj, "device", "unknown"))
    return obj


def _make_room(key: str, section: dict, role: str) -> None:
    """Before a backend is built or woken: free the accelerator for it. A cached backend stays
    as it is when both name `gpus` and those sets are disjoint, or when both run on the CPU and
    the cached one is kept (`keep_engine`) in another role: host memory is not an accelerator,
    and a kept vLLM engine there holds only its `kv_cache_gb`. A kept engine of the other role on
    the same GPUs sleeps (CUDA: its memory freed, the engine kept; it wakes on its next use), so
    policy and reward model time-share the node without restarts (docs/SCALING.md). Anything
    else is closed; a backend in the same role (another policy) is replaced or reloaded."""
    mine = set(section.get("gpus") or ())
    cpu = _on_cpu(section)
    for k in list(_CACHE):
        meta = _META.get(k, {})
        theirs = set(meta.get("gpus") or ())
        if k == key or (mine and theirs and not mine & theirs) or cpu != bool(meta.get("cpu", cpu)):
            continue                        # disjoint GPUs, or one on the CPU and one on GPUs
        if meta.get("keep") and meta.get("role") != role and (cpu and meta.get("cpu") or _sleep(k)):
            continue
        _close(k)


def _room_to_wake(key: str) -> None:
    """Before a sleeping engine wakes (only CUDA engines sleep): `_make_room` on its GPUs."""
    meta = _META[key]
    _make_room(key, {"gpus": meta.get("gpus"), "device": "cuda"}, meta.get("role", ""))


def _sleep(key: str) -> bool:
    """Put a cached engine to sleep (see `_make_room`); whether it sleeps now."""
    obj = _CACHE[key]
    if not hasattr(obj, "sleep") or getattr(obj, "closed", False):
        return False
    try:
        return bool(obj.sleep())
    except Exception as e:   # an engine that cannot sleep is closed instead: memory must be freed
        log.warning("%s engine could not sleep (%s): closing it", _META[key].get("role"), e)
        return False


def suspend() -> list[str]:
    """Free the accelerators for a training or the reference pass while keeping engines alive:
    a kept engine on the CPU stays as it is (host memory, its `kv_cache_gb`), a kept one on CUDA
    sleeps (its weights and KV cache freed; it wakes with the next policy's weights), anything
    else is closed. Returns what was done, e.g. ["generator: kept", "scorer: asleep"]."""
    done = []
    for k in list(_CACHE):
        meta = _META.get(k, {})
        role = meta.get("role", "backend")
        if meta.get("keep") and meta.get("cpu") and not getattr(_CACHE[k], "closed", False):
            done.append(f"{role}: kept")
        elif meta.get("keep") and _sleep(k):
            done.append(f"{role}: asleep")
        else:
            _close(k)
            done.append(f"{role}: closed")
    while _HOOKS:
        _HOOKS.pop()()
        done.append("local model: closed")
    from avr_core.backends.device import release_accelerator
    release_accelerator()
    return done


def _on_cpu(section: dict) -> bool:
    """Whether the backend this section builds runs on the CPU (no accelerator to share)."""
    from .device import resolve

    if section.get("base_url") or backend_class(section.get("kind")).served_elsewhere(section):
        return True                         # an HTTP client: its server holds the memory
    try:
        return resolve(section.get("device", "auto"), "device", tuple(section.get("gpus") or ())) == "cpu"
    except Exception:                       # an impossible device fails where it is built, with its own message
        return False


def _close(key: str) -> None:
    obj = _CACHE.pop(key, None)
    _META.pop(key, None)
    if obj is not None and hasattr(obj, "close"):
        obj.close()
    del obj


def note_used(role: str, device: str, release_fn: Callable[[], None] | None = None) -> None:
    """A model loaded outside these factories (the local alpaca-eval judge) reports its device
    for the stage's manifest and how to release it at the stage's end."""
    _USED[role] = device
    if release_fn is not None and release_fn not in _HOOKS:
        _HOOKS.append(release_fn)


def builds() -> list[dict]:
    """Every model backend this process has built, in order ({"role", "kind", "seconds"}: a
    vLLM engine's start, an HF model's load). A run's start-up cost: what kept engines
    (`keep_engine`) save shows as fewer builds (tasks/runtime/ledger.py logs them per stage)."""
    return list(_BUILDS)


def used() -> dict[str, str]:
    """{role: device} of the backends handed out since the last call (the stage's manifest)."""
    out = dict(_USED)
    _USED.clear()
    return out


def release(keep: bool = True) -> list[str]:
    """Close every cached backend (engine processes end, models dropped, accelerator memory
    emptied); with `keep`, those whose section says `keep_engine: true` stay. Returns the roles
    closed. Called by the stage skeleton at the end of every stage."""
    closed = []
    for k in list(_CACHE):
        if keep and _META.get(k, {}).get("keep"):
            continue
        closed.append(_META.get(k, {}).get("role", "backend"))
        _close(k)
    while _HOOKS:
        _HOOKS.pop()()
        closed.append("local model")
    if closed:
        from avr_core.backends.device import release_accelerator
        release_accelerator()
    return closed


def clear_cache() -> None:
    """Close every backend, kept ones too, and forget which were handed out (`used`): a fresh start."""
    release(keep=False)
    _USED.clear()
