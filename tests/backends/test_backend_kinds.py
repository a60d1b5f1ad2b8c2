"""What each backend kind means is said by its class (issue 33: avr_core/backends/base.py
BackendKind), not by if/elif chains over kind names. These tests pin that interface for every
registered kind, and that the factory, config checks and cache keys behave as the chains did:
the same constructor arguments, validation messages and cache-key dicts. The constructors are
fakes posing as each real class (tests/backends/fake_kinds.py): they record their arguments."""
from __future__ import annotations

from pathlib import Path

import pytest

from avr_core import backends
from avr_core.backends import GENERATORS, SCORERS, BackendKind, backend_class
from avr_core.config import ConfigError, load_config, resolve_max_new_tokens
from tasks.runtime import keys
from tests.backends.fake_kinds import INTERFACE, posing_as

KINDS = [*GENERATORS, *SCORERS]

# kind: (needs_model, vllm_engines, reloads_weights, takes_over_long, takes_frame, needs_token_cap, required keys)
FACTS = {"hf": (True, False, False, False, False, True, []),
         "openai": (True, False, False, False, False, False, ["base_url"]),
         "vllm": (True, True, True, False, False, False, []),
         "hf_rm": (True, False, False, True, False, False, []),
         "judge": (True, False, False, False, True, False, []),
         "vllm_judge": (True, True, False, False, True, False, []),
         "vllm_rm": (True, True, False, True, False, False, []),
         "rules": (False, False, False, False, False, False, ["constraints"])}


def test_kind_names_are_unique_across_the_registries():
    assert not set(GENERATORS) & set(SCORERS) and set(FACTS) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_registered_class_answers_the_interface(kind):
    cls = backend_class(kind)
    assert issubclass(cls, BackendKind) and "from_config" in INTERFACE
    assert "from_config" in {n for c in cls.__mro__[:-2] for n in vars(c)} or cls.from_config.__func__ is not \
        BackendKind.from_config.__func__, f"{cls.__name__} does not say how it is built"
    got = (cls.needs_model, cls.vllm_engines, cls.reloads_weights, cls.takes_over_long, cls.takes_frame,
           cls.needs_token_cap, sorted(cls.required))
    assert got == FACTS[kind]
    section = {"kind": kind, "tensor_parallel_size": 2, "data_parallel_size": 3}
    assert cls.gpu_slots(section) == (6 if cls.vllm_engines else 1)
    assert cls.gpu_slots({**section, "data_parallel_size": 0}) == (2 if cls.vllm_engines else 1)
    assert cls.served_elsewhere(section) == (kind == "openai")
    assert cls.served_elsewhere({**section, "base_url": "http://h/v1"}) == (kind in ("openai", "vllm_rm"))


def test_a_section_without_a_registered_kind_gets_the_defaults():
    assert backend_class(None) is BackendKind and backend_class("nope") is BackendKind


# -- the factory passes the constructor arguments the if/elif chains passed --------------------------
class Recorder:
    """Records how the factory built it."""

    def __init__(self, *args, **kw):
        self.args, self.kw, self.closed, self.asleep, self.device = args, kw, False, False, "cpu"

    def close(self):
        self.closed = True


def _fakes():
    """kind -> (registry, a Recorder posing as the kind's class), registered under module names."""
    out = {}
    for registry in (GENERATORS, SCORERS):
        for kind in registry:
            name = f"Fake_{kind}"
            globals()[name] = posing_as(backend_class(kind), Recorder)
            out[kind] = (registry, f"{__name__}:{name}")
    return out


@pytest.fixture
def recorded(monkeypatch):
    for kind, (registry, ref) in _fakes().items():
        monkeypatch.setitem(registry, kind, ref)
    backends.clear_cache()
    yield
    backends.clear_cache()


MODEL = {"path": str(Path(__file__).parent), "dtype": "bfloat16", "trust_remote_code": False}
GEN = {"batch_size": 4, "base_url": "http://h/v1", "served_model": "", "api_key_env": "KEY", "concurrency": 3,
       "timeout_s": 9.0, "max_retries": 2, "down_budget_s": 30.0, "tensor_parallel_size": 1,
       "data_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 512, "device": "cpu", "gpus": [],
       "per_request_seed": True, "enforce_eager": True, "kv_cache_gb": 1.0}
P = MODEL["path"]


def test_generators_get_the_arguments_they_got_before(recorded):
    hf = backends.make_generator(MODEL, {**GEN, "kind": "hf"})
    assert hf.args == (P, "bfloat16", 4, False) and hf.kw == {"device": "cpu", "gpus": ()}
    oa = backends.make_generator(MODEL, {**GEN, "kind": "openai"})
    assert oa.args == () and oa.kw == {"base_url": "http://h/v1", "model": P, "api_key_env": "KEY", "concurrency": 3,
                                       "timeout_s": 9.0, "max_retries": 2, "down_budget_s": 30.0}
    assert backends.make_generator(MODEL, {**GEN, "kind": "openai", "served_model": "m"}).kw["model"] == "m"
    vl = backends.make_generator(MODEL, {**GEN, "kind": "vllm"})
    assert vl.args == (P,) and vl.kw == {
        "tensor_parallel_size": 1, "data_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 512,
        "dtype": "bfloat16", "trust_remote_code": False, "per_request_seed": True, "enforce_eager": True,
        "kv_cache_gb": 1.0, "device": "cpu", "gpus": ()}


SCORER = {"model": MODEL, "batch_size": 4, "max_length": 256, "over_long": "skip", "device": "cpu", "gpus": [],
          "tensor_parallel_size": 1, "data_parallel_size": 2, "gpu_memory_utilization": 0.5,
          "enforce_eager": True, "kv_cache_gb": 1.0, "base_url": "", "served_model": "", "constraints": "c.jsonl"}
COMMON = {"dtype": "bfloat16", "batch_size": 4, "max_length": 256, "trust_remote_code": False, "device": "cpu",
          "gpus": ()}
ENGINES = {"tensor_parallel_size": 1, "data_parallel_size": 2, "gpu_memory_utilization": 0.5, "enforce_eager": True,
           "kv_cache_gb": 1.0}


def frame(conv):
    return conv


@pytest.mark.parametrize("kind,kw", [
    ("hf_rm", {**COMMON, "over_long": "skip"}),
    ("judge", {**COMMON, "frame": frame}),
    ("vllm_judge", {**COMMON, **ENGINES, "frame": frame}),
    ("vllm_rm", {**COMMON, **ENGINES, "over_long": "skip", "base_url": "", "served_model": ""})])
def test_scorers_get_the_arguments_they_got_before(recorded, kind, kw):
    s = backends.make_scorer({**SCORER, "kind": kind}, frame)
    assert s.args == (P,) and s.kw == kw


def test_the_rules_scorer_gets_its_constraints_and_no_model(recorded):
    s = backends.make_scorer({**SCORER, "kind": "rules"}, frame)
    assert s.args == ("c.jsonl",) and s.kw == {}


def test_a_vllm_scorers_dtype_auto_follows_the_device(recorded):
    s = backends.make_scorer({**SCORER, "kind": "vllm_rm", "model": {**MODEL, "dtype": "auto"}})
    assert s.kw["dtype"] == "float32"           # on the CPU, as for the HF scorers


# -- config checks and cache keys ----------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["scorer.kind=rules"],
     "key 'scorer.constraints': required when scorer.kind=rules: the prompt file whose rows carry `constraints` "
     "(got '')"),
    (["generator.kind=openai"], "key 'generator.base_url': required when generator.kind=openai "
                                                       "(got '')"),
    (["scorer.kind=judge", "scorer.over_long=skip"],
     "key 'scorer.over_long': skip is for reward models (scorer.kind hf_rm or vllm_rm); the others read no token "
     "limit (got 'skip')")])
def test_validation_messages_are_what_they_were(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert str(e.value) == message


def test_a_served_reward_model_asks_no_gpu_of_a_ray_actor():
    """A vllm_rm with a base_url is an HTTP client: its device settings ask nothing of the actor."""
    ray = ["scale.engine=ray", "scale.gpus_per_worker=0", "scorer.kind=vllm_rm", "scorer.gpus=[0]"]
    with pytest.raises(ConfigError, match="scale.gpus_per_worker"):
        load_config("tiny", ray)
    load_config("tiny", [*ray, "scorer.base_url=http://127.0.0.1:8001"])


def test_max_new_tokens_null_is_the_context_only_for_the_hf_generator():
    assert [resolve_max_new_tokens(None, {"kind": k, "max_model_len": 64}) for k in GENERATORS] == [64, None, None]
    assert resolve_max_new_tokens(None, {"max_model_len": 64}) == 64     # no kind: hf, the default


@pytest.mark.parametrize("kind", KINDS)
def test_cache_key_dicts_are_what_they_were(monkeypatch, kind):
    monkeypatch.setattr(keys, "model_identity", lambda path, revision=None: f"digest:{path}")
    scorer = {"kind": kind, "model": {"path": "m"}, "base_url": ""}
    local = "served:name-only" if kind == "openai" else "digest:m"
    want = scorer if kind == "rules" else {**scorer, "model": {"path": "m", "identity": local}}
    assert keys.scorer_identity(scorer) == want
    served = {**scorer, "base_url": "http://h/v1"}
    remote = kind in ("openai", "vllm_rm")
    assert keys.scorer_identity(served)["model"] == (
        {"path": "m"} if kind == "rules" else {"path": "m", "identity": "served:name-only" if remote else "digest:m"})
    assert keys.policy_identity({"path": "p"}, {"kind": kind}) == {
        "path": "p", "identity": "served:name-only" if kind == "openai" else "digest:p"}
    assert keys.served_elsewhere(None) is False and keys.served_elsewhere({}) is False
