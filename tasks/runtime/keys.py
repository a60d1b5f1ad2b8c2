"""What a stage's cache key is made of: the identities of the models and scorers it uses, its
`Spec` (the keyed config, inputs and models), and the code version of everything it can run
(docs/DESIGN.md "Cache key")."""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from avr_core.backends import REGISTRIES, backend_class
from avr_core.codeversion import CodeVersion, code_version, reached_definitions
from avr_core.identity import model_identity


def policy_identity(policy: dict, backend: dict | None = None) -> dict:
    """What a policy contributes to a cache key: a trained model is identified by its artifact
    key, not by its path, so moving the store does not invalidate everything downstream. A model
    given by name (hub id, local directory, `embedded:`) also carries its `identity`: revision or
    content digest (avr_core/identity.py), so a new snapshot or a re-pointed path is a new key.
    `backend`: the section that loads it; a model on someone else's server (`openai`, a
    `vllm_rm` with a `base_url`) cannot be looked into and is keyed by its name, said so."""
    if "artifact" in policy:
        return {k: v for k, v in policy.items() if k != "path"}
    if served_elsewhere(backend):
        return {**policy, "identity": "served:name-only"}
    return {**policy, "identity": model_identity(policy["path"], policy.get("revision"))}


def scorer_identity(scorer: dict) -> dict:
    """The scorer section for a cache key: its model with `policy_identity` (rules: no model)."""
    if not backend_class(scorer.get("kind")).needs_model:
        return scorer
    return {**scorer, "model": policy_identity(scorer["model"], scorer)}


def served_elsewhere(backend: dict | None) -> bool:
    """Whether the section's model runs on someone else's server (its class says: openai, a
    `vllm_rm` with a `base_url`): no worker loads it, and it is keyed by its name."""
    backend = backend or {}
    return backend_class(backend.get("kind")).served_elsewhere(backend)


@dataclass(frozen=True)
class Spec:
    """One stage call, described ONCE: its cache key hashes exactly this (with the stage's code
    version) and its manifest records exactly this, so key and manifest cannot drift apart.

    stage: the store directory; config: the hashed config section; inputs: the artifacts it
    reads (their keys go into the key); models: trained-model artifacts it loads (verified with
    the inputs before any work; a model is already in `config` through `policy_identity`).

    >>> from avr_core.store import ArtifactRef
    >>> Spec("critique", {"critique": {"k": 2}}, inputs=(ArtifactRef("/st", "respond", "ab12"),)).stage
    'critique'
    """

    stage: str
    config: Any
    inputs: tuple = ()
    models: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "config", lifetime_free(self.config))


def lifetime_free(config: Any) -> Any:
    """`config` with every `keep_engine` set to false: how long an engine lives (kept from stage
    to stage, or released after each) is not what it computes, so persistence never changes a key,
    and the keys of runs that never kept engines stay what they were.

    >>> lifetime_free({"generator": {"kind": "vllm", "keep_engine": True}, "k": [1]})
    {'generator': {'kind': 'vllm', 'keep_engine': False}, 'k': [1]}
    """
    if isinstance(config, dict):
        return {k: False if k == "keep_engine" else lifetime_free(v) for k, v in config.items()}
    if isinstance(config, list):
        return [lifetime_free(v) for v in config]
    return config


def stage_code(entry: str, cfg: dict, root: str | None = None, body: Callable | None = None) -> CodeVersion:
    """The code version of the stage whose task body is `entry` ("module:function"): every
    definition of this repository it can reach, plus the backend classes its config selects
    when it reaches a backend factory (the factories name their classes only as strings).

    A body outside this repository's packages (a test's fake stage, a benchmark's) is versioned
    by its own source and the skeleton's."""
    try:
        reached = reached_definitions([entry], root)
    except KeyError:
        if body is None:
            raise
        own = hashlib.sha256(inspect.getsource(body).encode()).hexdigest()[:12]
        skeleton = code_version(["tasks.runtime.skeleton:run_stage"], root)
        return CodeVersion(f"{skeleton.version}-{own}", {**skeleton.files, entry: own})
    extra = []
    for factory, section, registry in REGISTRIES:
        kind = (cfg.get(section) or {}).get("kind")
        if factory in reached and kind in registry:
            extra.append(registry[kind])
    return code_version([entry, *extra], root)


def named_models(config: Any) -> list[tuple[str, str | None]]:
    """(path, revision) of every model in a spec's config keyed by `policy_identity` (not the
    ones on someone else's server: no worker loads those)."""
    if isinstance(config, list):
        return [m for v in config for m in named_models(v)]
    if not hasattr(config, "items"):
        return []
    identity = config.get("identity")
    own = isinstance(identity, str) and not identity.startswith("served:") and "path" in config
    found = [(config["path"], config.get("revision"))] if own else []
    return found + [m for v in config.values() for m in named_models(v)]

