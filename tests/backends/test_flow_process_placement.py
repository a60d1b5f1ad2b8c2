"""Models loaded in the flow process do not fight kept engines (issue 32 item 5, review F11).

- the local alpaca-eval judge suspends the factory's engines before it loads on CUDA, and leaves
  them alone on the CPU;
- `hf_rm` / `judge` scorers built through the factory put another role's kept engine on their
  GPUs to sleep first (`_make_room`), and say where they loaded and in which dtype;
- a scorer's dtype "auto" follows the accelerator (bfloat16 on a GPU, float32 on the CPU);
- a soft-capped model (Gemma-2) says which attention it loads with and what eager attention
  costs at max_length.

CUDA is faked (`device.cuda_count`), models are fakes (named so) that record what was asked of
them; nothing here needs a GPU or model weights. Assertions are on counters and log lines."""
from __future__ import annotations

import importlib.util
import logging

import pytest

from avr_core import backends
from avr_core.backends import device, hf
from avr_core.backends.base import BackendStats
from avr_core.backends.device import Placement
from avr_core.evaluation import judge
from tests.backends.fake_kinds import posing_as

EVENTS: list[tuple] = []      # what the fakes were asked, in order, across roles


class FakeKeptCudaEngine:
    """Stands in for a kept vLLM engine on CUDA (any role): it can sleep and wake."""

    def __init__(self, path, *args, frame=None, **kw):
        self.asleep, self.closed, self.stats, self.device = False, False, BackendStats(), "cuda:0"

    def sleep(self):
        EVENTS.append(("sleep",))
        self.asleep = True
        return True

    def wake(self):
        EVENTS.append(("wake",))
        self.asleep = False

    def close(self):
        EVENTS.append(("close",))
        self.closed = True


class FakePlainEngine(FakeKeptCudaEngine):
    """An engine that cannot sleep (an HF model): freeing its memory means closing it."""
    sleep = None


class FakeHFScorer:
    """Stands in for HFRewardScorer / JudgeScorer in the factory: records the load."""

    def __init__(self, path, frame=None, **kw):
        EVENTS.append(("scorer load", kw["dtype"]))
        self.stats, self.device, self.closed = BackendStats(), "cuda:0", False

    def close(self):
        self.closed = True


# registered in their place: each answers the kind interface of the class it replaces
FakeKeptHFGenerator = posing_as(hf.HFGenerator, FakeKeptCudaEngine)
FakePlainHFGenerator = posing_as(hf.HFGenerator, FakePlainEngine)
FakeRewardScorer, FakeJudgeScorer = posing_as(hf.HFRewardScorer, FakeHFScorer), posing_as(hf.JudgeScorer, FakeHFScorer)

POLICY = {"path": "/fake/policy", "dtype": "float32", "trust_remote_code": False}


def _scorer(kind, gpus=(0,)):
    return {"kind": kind, "model": {"path": "/fake/rm", "dtype": "auto", "trust_remote_code": False},
            "batch_size": 8, "max_length": 512, "gpus": list(gpus)}


@pytest.fixture
def factory(monkeypatch):
    """The backend factory with fake engines; a section naming `gpus` is "on a GPU"."""
    monkeypatch.setattr(backends, "_on_cpu", lambda section: not section.get("gpus"))
    monkeypatch.setitem(backends.GENERATORS, "hf", f"{__name__}:FakeKeptHFGenerator")
    monkeypatch.setitem(backends.SCORERS, "hf_rm", f"{__name__}:FakeRewardScorer")
    monkeypatch.setitem(backends.SCORERS, "judge", f"{__name__}:FakeJudgeScorer")
    backends.clear_cache()
    EVENTS.clear()
    yield
    backends.clear_cache()


def _fake_cuda(monkeypatch, n: int) -> None:
    monkeypatch.setattr(device, "cuda_count", lambda: n)


# -- the local judge -----------------------------------------------------------------------------
@pytest.fixture
def judge_loads(monkeypatch):
    """The local judge's loader replaced by a fake; counts `backends.suspend` calls."""
    calls = {"suspend": 0}
    real = backends.suspend

    def counting_suspend():
        calls["suspend"] += 1
        return real()

    def fake_load_model(path, dev):
        EVENTS.append(("judge load", path))
        return "fake-tok", "fake-model", "cuda:0" if device.cuda_count() else "cpu"

    monkeypatch.setattr(backends, "suspend", counting_suspend)
    monkeypatch.setattr(judge, "_load_model", fake_load_model)
    judge._MODELS.clear()
    yield calls
    judge._MODELS.clear()


def test_the_local_judge_suspends_engines_before_it_loads_on_cuda(factory, judge_loads, monkeypatch, caplog):
    _fake_cuda(monkeypatch, 1)
    backends.make_generator(POLICY, {"kind": "hf", "batch_size": 8, "keep_engine": True, "gpus": [0]})
    with caplog.at_level(logging.INFO, logger="avr_core"):
        assert judge._load("/fake/judge", "auto") == ("fake-tok", "fake-model")
        judge._load("/fake/judge", "auto")          # loaded once: nothing suspended again
    assert judge_loads["suspend"] == 1
    assert EVENTS == [("sleep",), ("judge load", "/fake/judge")]       # asleep BEFORE the load
    lines = [r.getMessage() for r in caplog.records if "engines for the local judge" in r.getMessage()]
    assert lines == ["judge: engines for the local judge (loads on cuda into freed memory): generator: asleep"]
    assert backends.used()["judge"] == "cuda:0"


def test_the_local_judge_on_the_cpu_leaves_engines_alone(factory, judge_loads, monkeypatch, caplog):
    _fake_cuda(monkeypatch, 0)
    backends.make_generator(POLICY, {"kind": "hf", "batch_size": 8, "keep_engine": True, "gpus": [0]})
    with caplog.at_level(logging.INFO, logger="avr_core"):
        judge._load("/fake/judge", "auto")
    assert judge_loads["suspend"] == 0
    assert EVENTS == [("judge load", "/fake/judge")]
    assert not any("engines for the local judge" in r.getMessage() for r in caplog.records)


def test_the_local_judge_says_when_no_engine_was_held(factory, judge_loads, monkeypatch, caplog):
    _fake_cuda(monkeypatch, 1)
    with caplog.at_level(logging.INFO, logger="avr_core"):
        judge._load("/fake/judge", "cuda")
    assert judge_loads["suspend"] == 1
    assert any(r.getMessage().endswith("into freed memory): none were held") for r in caplog.records)


# -- hf_rm / judge scorers through the factory ----------------------------------------------------
@pytest.mark.parametrize("kind", ["hf_rm", "judge"])
def test_an_hf_scorer_puts_the_kept_policy_engine_on_its_gpus_to_sleep_first(factory, kind):
    gen = backends.make_generator(POLICY, {"kind": "hf", "batch_size": 8, "keep_engine": True, "gpus": [0]})
    backends.make_scorer(_scorer(kind))
    assert EVENTS == [("sleep",), ("scorer load", "auto")]      # the policy's memory is freed before the load
    assert gen.asleep and not gen.closed


def test_an_hf_scorer_on_other_gpus_leaves_the_policy_engine_awake(factory):
    gen = backends.make_generator(POLICY, {"kind": "hf", "batch_size": 8, "keep_engine": True, "gpus": [0]})
    backends.make_scorer(_scorer("hf_rm", gpus=(1,)))
    assert EVENTS == [("scorer load", "auto")]
    assert not gen.asleep and not gen.closed


def test_an_hf_scorer_closes_an_engine_that_cannot_sleep(factory, monkeypatch):
    monkeypatch.setitem(backends.GENERATORS, "hf", f"{__name__}:FakePlainHFGenerator")
    gen = backends.make_generator(POLICY, {"kind": "hf", "batch_size": 8, "keep_engine": True, "gpus": [0]})
    backends.make_scorer(_scorer("hf_rm"))
    assert EVENTS == [("close",), ("scorer load", "auto")]
    assert gen.closed


# -- dtype "auto" -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus,expected", [(1, "bfloat16"), (0, "float32")])
def test_dtype_auto_follows_the_accelerator(monkeypatch, gpus, expected):
    _fake_cuda(monkeypatch, gpus)
    assert hf.resolve_dtype("auto") == expected
    assert hf.resolve_dtype("auto", "cpu") == "float32"          # an explicit CPU device: float32 anyway
    assert hf.resolve_dtype("float32") == "float32"              # a set dtype is kept


def test_the_scorer_default_dtype_is_auto_and_validated():
    from avr_core.config import ConfigError, load_config

    assert load_config("tiny", ["scorer.model.dtype=auto"]).scorer.model.dtype == "auto"
    with pytest.raises(ConfigError, match="scorer.model.dtype"):
        load_config("tiny", ["scorer.model.dtype=fp8"])


class FakeRewardModel:
    """What `load` hands back: a model whose config has a pad token."""

    class config:
        pad_token_id = 0


@pytest.mark.parametrize("gpus,asked,loaded,label", [
    (1, "auto", "bfloat16", "cuda:0"), (0, "auto", "float32", "cpu"), (1, "float32", "float32", "cuda:0")])
def test_the_hf_reward_model_loads_in_the_resolved_dtype_and_says_where(monkeypatch, caplog, gpus, asked, loaded,
                                                                        label):
    _fake_cuda(monkeypatch, gpus)
    seen = {}

    def fake_load(cls, path, dtype, spec, gpu_list, key, **kw):
        seen["dtype"] = dtype
        return FakeRewardModel(), Placement(label, {}, label)

    monkeypatch.setattr(hf, "load", fake_load)
    monkeypatch.setattr(hf, "_load_tokenizer", lambda path, trc: type("FakeTok", (), {"pad_token_id": 0})())
    monkeypatch.setattr(hf, "attention_kwargs", lambda *a, **k: {})
    monkeypatch.setattr(hf, "input_device", lambda model: "cpu")
    with caplog.at_level(logging.INFO, logger="avr_core.backends.hf"):
        rm = hf.HFRewardScorer("/fake/rm", dtype=asked)
    assert seen["dtype"] == rm.dtype == loaded
    how = f"{loaded} (dtype auto: follows the device)" if asked == "auto" else loaded
    assert f"scorer (hf_rm): /fake/rm loaded on {label} in {how}" in [r.getMessage() for r in caplog.records]


# -- soft-capped attention ----------------------------------------------------------------------------
@pytest.fixture
def gemma2_27b_config(tmp_path):
    """Gemma-2-27B's attention shape (32 heads, logits soft-capped at 50), in a config.json only."""
    from transformers import Gemma2Config

    Gemma2Config(num_attention_heads=32, num_key_value_heads=16, head_dim=128, hidden_size=256,
                 num_hidden_layers=2, attn_logit_softcapping=50.0).save_pretrained(tmp_path)
    return str(tmp_path)


def _flash_attn(monkeypatch, installed: bool) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "flash_attn" else real(name, *a))


def test_eager_softcap_attention_says_what_it_needs_at_max_length(gemma2_27b_config, monkeypatch, caplog):
    _fake_cuda(monkeypatch, 1)
    _flash_attn(monkeypatch, installed=False)
    with caplog.at_level(logging.INFO, logger="avr_core.backends.hf"):
        kw = hf.attention_kwargs(gemma2_27b_config, "bfloat16", "auto", (), False, max_length=8192, batch_size=1)
    assert kw == {"attn_implementation": "eager"}
    [line] = [r for r in caplog.records if "soft-caps" in r.getMessage()]
    msg = line.getMessage()
    assert line.levelno == logging.WARNING          # on a GPU: where it runs out of memory
    assert "attn_implementation=eager (flash-attn is not installed)" in msg
    assert "1 x 32 heads x 8192^2 x 2 B = 4.3 GB per layer, transient" in msg
    assert "~17.2 GB at the float32 softmax" in msg and "install flash-attn" in msg


def test_eager_attention_memory_scales_with_the_batch():
    from types import SimpleNamespace

    line = hf.eager_attention_line(SimpleNamespace(num_attention_heads=32), "bfloat16", 8192, batch=8)
    assert "8 x 32 heads x 8192^2 x 2 B = 34.4 GB per layer" in line and "(4.3 GB per sequence" in line


def test_softcap_attention_uses_flash_attention_2_where_it_can(gemma2_27b_config, monkeypatch, caplog):
    _fake_cuda(monkeypatch, 1)
    _flash_attn(monkeypatch, installed=True)
    with caplog.at_level(logging.INFO, logger="avr_core.backends.hf"):
        kw = hf.attention_kwargs(gemma2_27b_config, "bfloat16", "auto", (), False, max_length=8192)
    assert kw == {"attn_implementation": "flash_attention_2"}
    [msg] = [r.getMessage() for r in caplog.records if "soft-caps" in r.getMessage()]
    assert "attn_implementation=flash_attention_2" in msg and "GB" not in msg


def test_softcap_attention_on_the_cpu_is_eager_and_says_why(gemma2_27b_config, monkeypatch, caplog):
    _fake_cuda(monkeypatch, 0)
    with caplog.at_level(logging.INFO, logger="avr_core.backends.hf"):
        kw = hf.attention_kwargs(gemma2_27b_config, "float32", "auto", (), False, max_length=1024, batch_size=2)
    assert kw == {"attn_implementation": "eager"}
    [line] = [r for r in caplog.records if "soft-caps" in r.getMessage()]
    assert line.levelno == logging.INFO and "eager (the CPU)" in line.getMessage()
    assert "2 x 32 heads x 1024^2 x 4 B = 0.3 GB per layer" in line.getMessage()


def test_a_model_without_softcap_keeps_the_default_attention(tmp_path, monkeypatch, caplog):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="avr_core.backends.hf"):
        assert hf.attention_kwargs(str(tmp_path), "float32", "cpu", (), False, max_length=8192) == {}
    assert not any("soft-caps" in r.getMessage() for r in caplog.records)
