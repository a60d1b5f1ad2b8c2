"""Starts are not downloads (issue 32, review F13): a vLLM backend named by hub id gets its weights
fetched BEFORE its engine starts, so the engine's start timeout times the start only, and a model
that cannot be had fails at once in one line naming the model and the hub mode. The engine is a
fake (control flow only) that records the path it was given; the hub is the real huggingface_hub,
offline, against an empty cache."""
from __future__ import annotations

import pytest

from avr_core import backends, hub
from avr_core.backends.base import BackendStats
from avr_core.backends.vllm_offline import VLLMGenerator
from tests.backends.fake_kinds import posing_as

STARTED: list[str] = []


class FakeEngine:
    def __init__(self, path, **kw):
        STARTED.append(path)
        self.stats, self.device, self.closed, self.asleep = BackendStats(), "fake", False, False

    def close(self):
        self.closed = True


FakeVLLMEngine = posing_as(VLLMGenerator, FakeEngine)     # a vLLM kind: its weights are fetched first

GEN = {"kind": "vllm", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_model_len": 512}


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    monkeypatch.setitem(backends.GENERATORS, "vllm", f"{__name__}:FakeVLLMEngine")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    STARTED.clear()
    backends.clear_cache()
    yield
    backends.clear_cache()


def test_a_hub_model_is_fetched_before_the_engine_starts(fake_engine, monkeypatch, tmp_path):
    calls = []

    def snapshot_download(repo, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo, revision, local_files_only, tuple(STARTED)))
        return str(tmp_path / "snapshot")
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    backends.make_generator({"path": "org/model", "revision": "abc", "dtype": "bfloat16",
                             "trust_remote_code": False}, GEN)
    assert calls == [("org/model", "abc", True, ())]             # fetched first, nothing started yet
    assert STARTED == [str(tmp_path / "snapshot")]               # the engine starts from the local copy


def test_a_local_directory_is_used_as_it_is(fake_engine, tmp_path):
    assert hub.fetch_weights(str(tmp_path)) == str(tmp_path)


def test_a_missing_model_fails_at_once_in_one_line(fake_engine):
    with pytest.raises(FileNotFoundError) as e:
        backends.make_generator({"path": "no-such-org/no-such-model", "dtype": "bfloat16",
                                 "trust_remote_code": False}, GEN)
    msg = str(e.value)
    assert STARTED == [] and "\n" not in msg
    assert "'no-such-org/no-such-model' could not be had" in msg and "hub mode: offline" in msg
