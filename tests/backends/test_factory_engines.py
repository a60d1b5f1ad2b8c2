"""The backend factory keeps engines alive across policy changes, trainings and role switches
(issue 31), and never hands out a dead one. Control flow only: the engines here are fakes (named
so) that record what was asked of them; tests/system/backends/test_vllm_reload.py runs the real vLLM
engine through the same factory."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from avr_core import backends
from avr_core.backends.base import BackendStats
from avr_core.backends.vllm_judge import VLLMJudgeScorer
from avr_core.backends.vllm_offline import VLLMGenerator
from tests.backends.fake_kinds import posing_as


class FakeEngines:
    """Stands in for VLLMGenerator / VLLMJudgeScorer: remembers its weights, sleeps when
    `sleepable` (a CUDA engine), and counts what it was asked."""
    sleepable = False

    def __init__(self, path, frame=None, **kw):
        self.weights, self.asleep, self.closed = path, False, False
        self.stats, self.device, self.asked = BackendStats(), "fake", []

    def reload(self, weights):
        self.asked.append(("reload", weights))
        self.weights, self.asleep = weights, False

    def sleep(self):
        if self.sleepable:
            self.asked.append(("sleep",))
            self.asleep = True
        return self.asleep

    def wake(self):
        self.asked.append(("wake",))
        self.asleep = False

    def close(self):
        self.closed = True


class FakeCudaEngines(FakeEngines):
    sleepable = True


# registered in their place: the factory reads the real classes' kinds off them (reloads, vLLM engines)
FakeGenerator, FakeCudaGenerator = posing_as(VLLMGenerator, FakeEngines), posing_as(VLLMGenerator, FakeCudaEngines)
FakeJudge, FakeCudaJudge = posing_as(VLLMJudgeScorer, FakeEngines), posing_as(VLLMJudgeScorer, FakeCudaEngines)


def _model_dir(path, hidden=8, tokenizer="tok"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
                                                  "_name_or_path": str(path)}))
    (path / "tokenizer.json").write_text(tokenizer)
    # what transformers records about HOW it loaded a tokenizer differs between a model and its
    # fine-tune (measured: `local_files_only`, `is_local`); it does not change the tokenizer
    loaded = {"local_files_only": True, "is_local": True} if "seed" not in path.name else {}
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", **loaded}))
    (path / "model.safetensors").write_bytes(b"w")
    return {"path": str(path), "dtype": "float32", "trust_remote_code": False}


GEN = {"kind": "vllm", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_model_len": 512,
       "keep_engine": True}
# the fake never reads its model; the path only has to be a directory (a vLLM model is fetched first otherwise)
JUDGE = {"kind": "vllm_judge", "model": {"path": str(Path(__file__).parent), "dtype": "float32",
                                         "trust_remote_code": False},
         "batch_size": 8, "max_length": 512, "keep_engine": True}


@pytest.fixture
def fakes(monkeypatch):
    # a section naming `gpus` is "on a GPU" here, as on a CUDA node; one without, on the CPU
    monkeypatch.setattr(backends, "_on_cpu", lambda section: not section.get("gpus"))
    monkeypatch.setitem(backends.GENERATORS, "vllm", f"{__name__}:FakeGenerator")
    monkeypatch.setitem(backends.SCORERS, "vllm_judge", f"{__name__}:FakeJudge")
    backends.clear_cache()
    n = len(backends.builds())
    yield lambda: [b["event"] for b in backends.builds()[n:]]
    backends.clear_cache()


def test_a_new_policy_goes_into_the_running_engine(tmp_path, fakes, caplog):
    seed, rsft = _model_dir(tmp_path / "seed"), _model_dir(tmp_path / "rsft")
    g1 = backends.make_generator(seed, GEN)
    with caplog.at_level(logging.INFO, logger="avr_core.backends"):
        g2 = backends.make_generator({**rsft, "artifact": "rsft/k"}, GEN)
    assert g2 is g1 and g1.asked == [("reload", rsft["path"])] and fakes() == ["start", "reload"]
    assert any("new weights into the running engine" in r.getMessage() for r in caplog.records)
    assert backends.make_generator({**rsft, "artifact": "rsft/k"}, GEN) is g1 and fakes() == ["start", "reload"]


@pytest.mark.parametrize("change", ["architecture", "tokenizer", "dtype", "settings"])
def test_anything_else_starts_a_new_engine_and_says_why(tmp_path, fakes, caplog, change):
    seed = _model_dir(tmp_path / "seed")
    other = _model_dir(tmp_path / "other", hidden=16 if change == "architecture" else 8,
                       tokenizer="other" if change == "tokenizer" else "tok")
    other = {**other, "dtype": "bfloat16"} if change == "dtype" else other
    g1 = backends.make_generator(seed, GEN)
    with caplog.at_level(logging.INFO, logger="avr_core.backends"):
        g2 = backends.make_generator(other, {**GEN, "max_model_len": 1024} if change == "settings" else GEN)
    assert g2 is not g1 and g1.closed and g1.asked == [] and fakes() == ["start", "start"]
    why = {"architecture": "config.json differs in hidden_size", "tokenizer": "the tokenizer differs (tokenizer.json)"}
    if change in why:     # the same engine settings, weights it cannot take: one line says why
        assert any(why[change] in r.getMessage() for r in caplog.records), caplog.text


def test_a_closed_engine_is_never_handed_out_again(tmp_path, fakes):
    seed = _model_dir(tmp_path / "seed")
    g1 = backends.make_generator(seed, GEN)
    g1.closed = True                  # an engine process died: the pool closed itself underneath
    g2 = backends.make_generator(seed, GEN)
    assert g2 is not g1 and not g2.closed and fakes() == ["start", "start"]


def test_training_keeps_cpu_engines_and_puts_cuda_engines_to_sleep(tmp_path, fakes, monkeypatch):
    seed = _model_dir(tmp_path / "seed")
    gen = backends.make_generator(seed, GEN)                 # on the CPU here: kept as it is
    monkeypatch.setitem(backends.SCORERS, "vllm_judge", f"{__name__}:FakeCudaJudge")
    judge = backends.make_scorer({**JUDGE, "gpus": [0]})     # "on a GPU": sleeps
    lone = backends.make_scorer({**JUDGE, "keep_engine": False, "max_length": 256, "gpus": [1]})
    done = backends.suspend()
    assert sorted(done) == ["generator: kept", "scorer: asleep", "scorer: closed"]
    assert not gen.closed and not gen.asleep and judge.asleep and not judge.closed and lone.closed
    assert backends.make_scorer({**JUDGE, "gpus": [0]}) is judge and not judge.asleep    # wakes on its next use
    assert judge.asked == [("sleep",), ("wake",)] and fakes()[-1] == "reload"


def test_policy_and_scorer_time_share_the_same_gpus(tmp_path, fakes, monkeypatch):
    """On a node where both roles use every GPU, switching roles puts the other to sleep, never
    closes it: the search alternates them without a single new start."""
    monkeypatch.setitem(backends.GENERATORS, "vllm", f"{__name__}:FakeCudaGenerator")
    monkeypatch.setitem(backends.SCORERS, "vllm_judge", f"{__name__}:FakeCudaJudge")
    seed = _model_dir(tmp_path / "seed")
    gen = backends.make_generator(seed, {**GEN, "gpus": [0, 1]})
    judge = backends.make_scorer({**JUDGE, "gpus": [0, 1]})
    assert gen.asleep and not judge.asleep
    for _ in range(3):                                       # three search rounds
        assert backends.make_generator(seed, {**GEN, "gpus": [0, 1]}) is gen and not gen.asleep and judge.asleep
        assert backends.make_scorer({**JUDGE, "gpus": [0, 1]}) is judge and not judge.asleep and gen.asleep
    assert fakes().count("start") == 2 and not gen.closed and not judge.closed
