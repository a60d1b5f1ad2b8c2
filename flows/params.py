"""The parameters of every deployment and of `avr run`: one pydantic model, so the Prefect UI
renders a typed form (the preset as a dropdown of the shipped presets, each field with its
description) and a bad value is refused before any work, naming the field.

    RunParams(preset="tiny", store_root="/data/avr", overrides=["critique.k=3"]).to_overrides()
    # -> ['store.root=/data/avr', 'critique.k=3']: the same key=value list `avr run` takes

A field left empty (or 0) keeps the preset's value; `overrides` comes last and wins.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from avr_core.config import CONF_DIR, ConfigError, load_config

PRESETS = tuple(sorted(p.stem for p in CONF_DIR.glob("*.yaml")))   # base, paper, signal, signal_v2, tiny


class RunParams(BaseModel):
    """What to run: a preset, the usual knobs, and free `key=value` overrides for anything else."""

    # frozen: the resolved config is loaded once, by the validator, and travels with the params
    # (`config()`); a field changed afterwards would leave it stale
    model_config = ConfigDict(extra="forbid", title="AvR run", frozen=True)
    _config: object = PrivateAttr(None)

    preset: str = Field("tiny", title="Preset", json_schema_extra={"enum": list(PRESETS)},
                        description="The config preset (`conf/<preset>.yaml` over `conf/base.yaml`): tiny = "
                                    "SmolLM2-135M on CPU in minutes, signal = stage 1 on CPU scored by an exact "
                                    "reward, then the learning signal and test-time scaling (no stage 2; about an "
                                    "hour), "
                                    "paper = LLaMA-3-8B on GPUs, base = the method's defaults. `avr run --preset` "
                                    "also takes a path to a YAML file.")
    prompts: str = Field("", title="Prompt file", description=(
        "`data.prompts`: JSONL, JSON, Parquet, a saved HF dataset directory or `hf://<dataset>:<split>`, each row "
        "`{\"prompt\": ...}` or `{\"messages\": [...]}`. Empty: the preset's."))
    policy: str = Field("", title="Policy model path", description=(
        "`policy.path`: the seed model (a local Hugging Face directory, embedded:NAME or a hub id in the local cache). "
        "Empty: the preset's."))
    store_root: str = Field("", title="Store root", description=(
        "`store.root`: the artifact store (a path or an fsspec URL such as s3://bucket/avr); every cached stage and "
        "run record lives there. Empty: the preset's (or $AVR_STORE)."))
    iterations: int = Field(0, ge=0, le=1000, title="Iterations", description=(
        "`iterate.count`: run the pipeline this many times, each iteration starting from the previous one's model on "
        "fresh prompt slices. 0: the preset's (1)."))
    iterate_model: Literal["preset", "stage1", "stage2"] = Field(
        "preset", title="Next iteration starts from", description=(
        "`iterate.model`: which model of iteration t starts iteration t+1: the Stage-1 or the Stage-2 model. "
        "preset: the preset's (stage1)."))
    continue_from: Literal["preset", "seed", "last"] = Field("preset", title="Continue from", description=(
        "`iterate.continue_last`: seed = a new chain from the policy model; last = continue after the last completed "
        "iteration of this chain in the store (the nightly run adds iterations). preset: the preset's."))
    overrides: list[str] = Field(default_factory=list, title="Overrides", description=(
        "`key=value` for any other config key, e.g. `critique.k=3` or `data.stage1_sft=[0,8]` (keys and their "
        "meaning: `conf/base.yaml`). Applied last."))

    @field_validator("overrides")
    @classmethod
    def _key_value(cls, v: list[str]) -> list[str]:
        for o in v:
            key, eq, _ = o.partition("=")
            if not eq or not key.strip() or any(c.isspace() for c in key):
                raise ValueError(f"{o!r}: expected key=value, e.g. critique.k=3")
        return v

    @model_validator(mode="after")
    def _valid_config(self) -> RunParams:
        """The whole config resolves and validates (unknown keys, types, ranges): the error names
        the field and the config key, before anything runs."""
        self.config()
        return self

    def to_overrides(self) -> list[str]:
        """The fields as `key=value` items (the form's fields first, then `overrides`)."""
        out = [f"{key}={getattr(self, name)}" for name, key in FIELD_KEYS.items() if getattr(self, name)]
        if self.iterations:
            out.append(f"iterate.count={self.iterations}")
        if self.iterate_model != "preset":
            out.append(f"iterate.model={self.iterate_model}")
        if self.continue_from != "preset":
            out.append(f"iterate.continue_last={self.continue_from == 'last'}")
        return out + list(self.overrides)

    def config(self):
        """The resolved, validated config (a read-only DictConfig), loaded once per RunParams: the
        form's validator, `avr run`, the flow and `start_run` all use this one. A problem is a
        ValueError naming the form field it came from and the config key."""
        if self._config is None:
            self._config = self._load()
        return self._config

    def _load(self):
        if self.preset not in PRESETS and not self.preset.endswith((".yaml", ".yml")):
            raise ValueError(f"field 'preset': {self.preset!r}: preset not found (shipped: {', '.join(PRESETS)}; "
                             "or a path to a YAML file)")
        try:
            return load_config(self.preset, self.to_overrides())
        except ConfigError as e:
            raise ValueError(f"field '{field_of(str(e), self.overrides)}': {e}") from None


# form field -> the config key it sets (iterations and the two choices are mapped in to_overrides)
FIELD_KEYS = {"prompts": "data.prompts", "policy": "policy.path", "store_root": "store.root"}
_KEY_FIELDS = {**{v: k for k, v in FIELD_KEYS.items()}, "iterate.count": "iterations", "iterate.model": "iterate_model",
               "iterate.continue_last": "continue_from"}


def field_of(message: str, overrides: list[str] = ()) -> str:
    """The form field a ConfigError message is about: `overrides` for a key set there or one
    without a field of its own.

    >>> field_of("override 'store.root=/x': key 'store.root': not a directory")
    'store_root'
    >>> field_of("override 'critique.kk=3': key 'critique.kk': Key 'kk' not in 'CritiqueConfig'")
    'overrides'
    >>> field_of("nope.yaml: preset not found")
    'preset'
    """
    for key, name in _KEY_FIELDS.items():
        if f"key '{key}'" in message and not any(o.startswith(f"{key}=") for o in overrides):
            return name
    return "preset" if "preset not found" in message or "invalid YAML" in message else "overrides"


def as_params(params: RunParams | dict | None = None, **fields) -> RunParams:
    """A RunParams from a RunParams, a dict (a flow run's stored parameters, also the older
    {"preset", "overrides"} form) or keyword fields."""
    if isinstance(params, RunParams):
        return params
    return RunParams(**{**(params or {}), **fields})
