"""Device settings (avr_core/backends/device.py), engine processes (engine_pool.py) and the
release of every backend at the end of a stage (tasks/runtime/skeleton.py::release_engines), on CPU.

The CUDA branches are driven with a pretend GPU count and free memory: what is tested is the
decision (one GPU, device_map=auto over the allowed GPUs, an error), not CUDA itself
(tests/training/test_gpu.py and scripts/gpu_check.sh run it for real)."""
from __future__ import annotations

import gc
import json
import os
import struct
import weakref

import pytest

from avr_core import backends
from avr_core.backends import device as dev
from avr_core.backends.base import BackendStats, BackendUnavailable, SamplingParams
from avr_core.backends.engine_pool import EnginePool, child_visible_devices, gpu_groups

HAS_CUDA = dev.cuda_count() > 0


# -- settings ----------------------------------------------------------------------------------
def test_parse_and_problems_without_cuda(monkeypatch):
    monkeypatch.setenv("AVR_FORCE_NO_CUDA", "1")
    assert dev.parse_device("cuda:2") == ("cuda", 2)
    with pytest.raises(dev.DeviceError, match="must be auto, cpu, cuda or cuda:N"):
        dev.parse_device("gpu")
    with pytest.raises(dev.DeviceError):
        dev.parse_device("cpu:1")
    assert dev.resolve("auto") == "cpu" and dev.resolve("cpu") == "cpu"
    msg = dev.device_problem("cuda", "scorer.device")
    assert msg.startswith("key 'scorer.device': cuda asked for, but no CUDA device is visible") and "\n" not in msg
    with pytest.raises(dev.DeviceError, match="no CUDA device"):
        dev.resolve("cuda:0", "generator.device")


def test_config_refuses_a_malformed_device():
    from avr_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"key 'generator.device': must be auto, cpu, cuda or cuda:N"):
        load_config("tiny", ["generator.device=gpu0"])
    with pytest.raises(ConfigError, match=r"key 'scorer.data_parallel_size'"):
        load_config("tiny", ["scorer.data_parallel_size=-1"])
    assert load_config("paper").scorer.kind == "vllm_rm"


@pytest.mark.slow
def test_preflight_stops_cuda_on_a_machine_without_it(monkeypatch):
    from omegaconf import OmegaConf

    from avr_core.config import ConfigError, load_config
    from run_records.preflight import preflight

    monkeypatch.setenv("AVR_FORCE_NO_CUDA", "1")
    for key in ("scorer.device", "generator.device", "po.device", "eval.judge.device"):
        over = [f"{key}=cuda"] + (["eval.judge.kind=local"] if key.startswith("eval") else [])
        cfg = OmegaConf.to_container(load_config("tiny", over), resolve=True)
        with pytest.raises(ConfigError) as e:
            preflight(cfg)
        assert str(e.value) == (f"key '{key}': cuda asked for, but no CUDA device is visible on this machine "
                                f"(torch.cuda.is_available() is False); set {key}=auto or {key}=cpu")


def _safetensors(path, n_params: int) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_params], "data_offsets": [0, 4 * n_params]}}).encode()
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * n_params))


def test_placement_one_gpu_or_device_map_auto(tmp_path, monkeypatch):
    _safetensors(tmp_path / "m", 1000)                          # 1000 params
    assert dev.weight_bytes(tmp_path / "m", "bfloat16") == 2000
    monkeypatch.setattr(dev, "cuda_count", lambda: 8)
    free = {i: 10_000 for i in range(8)}
    monkeypatch.setattr(dev, "_free_bytes", lambda i: free[i])
    assert dev.place(tmp_path / "m", "bfloat16", "auto").label == "cuda:0"          # fits one GPU
    assert dev.place(tmp_path / "m", "bfloat16", "auto", gpus=[6, 7]).label == "cuda:6"
    assert dev.place(tmp_path / "m", "bfloat16", "cuda:3").kwargs == {}
    free.update({i: 1_500 for i in range(8)})                   # 2000 bytes do not fit one GPU
    pl = dev.place(tmp_path / "m", "bfloat16", "cuda", gpus=[4, 5])
    assert pl.kwargs["device_map"] == "auto" and set(pl.kwargs["max_memory"]) == {4, 5}   # no "cpu": no offload
    assert pl.device is None and pl.label == "cuda:4,5 (device_map=auto)"
    with pytest.raises(dev.DeviceError, match="only 8 CUDA device"):
        dev.place(tmp_path / "m", "bfloat16", "cuda:9")
    assert dev.place(tmp_path / "m", "bfloat16", "cpu").label == "cpu"


def test_check_devices_names_every_model_setting():
    from omegaconf import OmegaConf

    from avr_core.config import load_config

    cfg = OmegaConf.to_container(load_config("tiny", ["eval.judge.kind=local"]), resolve=True)
    keys = [k for k, _, _ in dev.device_settings(cfg)]
    assert keys == ["generator.device", "scorer.device", "eval.judge.device",
                    "rsft.device", "po.device", "cot_sft.device", "cot_po.device"]


# -- engine processes -------------------------------------------------------------------------
class FakeEngine:
    """What a worker process holds: answers with its global index, pid and visible GPUs."""

    def __init__(self, fail: bool = False):
        if fail:
            raise RuntimeError("no such model")
        self.stats = BackendStats()
        self.device = "fake"

    def generate_at(self, convs, params, offset):
        self.stats.calls += 1
        self.stats.requests += len(convs)
        return [[f"{offset + i}|{os.getpid()}|{os.environ.get('CUDA_VISIBLE_DEVICES')}"] for i in range(len(convs))]


def test_gpu_groups():
    assert gpu_groups(0 or 4, 2, [], 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(BackendUnavailable, match="need 6 GPUs"):
        gpu_groups(3, 2, [0, 1, 2, 3], 8)


def test_engine_layout(monkeypatch):
    from avr_core.backends import vllm_offline

    monkeypatch.setattr(dev, "cuda_count", lambda: 0)
    assert vllm_offline.engine_layout(1, 1) == (False, [[]])              # CPU: one engine in-process, as before
    assert vllm_offline.engine_layout(1, 2) == (True, [[], []])
    monkeypatch.setattr(dev, "cuda_count", lambda: 8)
    assert vllm_offline.engine_layout(1, 0) == (True, [[i] for i in range(8)])     # every GPU busy
    assert vllm_offline.engine_layout(2, 0, gpus=[0, 1, 2, 3, 4, 5]) == (True, [[0, 1], [2, 3], [4, 5]])
    assert vllm_offline.engine_layout(8, 1) == (True, [list(range(8))])


@pytest.mark.slow
def test_pool_splits_a_round_joins_it_in_order_and_its_processes_end():
    pool = EnginePool(f"{__name__}:FakeEngine", {}, groups=[[0], [3]])
    try:
        out = pool.call("generate_at", list(range(5)), SamplingParams())
        idx = [int(o[0].split("|")[0]) for o in out]
        pids = {o[0].split("|")[1] for o in out}
        gpus = [o[0].split("|")[2] for o in out]
        assert idx == [0, 1, 2, 3, 4] and len(pids) == 2 and gpus == ["0", "0", "3", "3", "3"]
        assert pool.stats.calls == 2 and pool.stats.requests == 5
        procs = list(pool.procs)
    finally:
        pool.close()
    assert all(not p.is_alive() and p.exitcode == 0 for p in procs)
    with pytest.raises(BackendUnavailable, match=r"engine 0 \(GPUs \[\]\) .* failed to start: RuntimeError: no such"):
        EnginePool(f"{__name__}:FakeEngine", {"fail": True}, groups=[[]])


def test_groups_are_indices_of_the_visible_devices():
    """A Ray actor given physical GPUs 6 and 7 sees them as 0 and 1: its engines must land on 6
    and 7, not on the node's GPUs 0 and 1 (which belong to another actor)."""
    assert child_visible_devices([0], None) == "0" and child_visible_devices([2, 3], "") == "2,3"
    assert child_visible_devices([0], "6,7") == "6" and child_visible_devices([0, 1], "6,7") == "6,7"
    assert child_visible_devices([1], "GPU-a, GPU-b") == "GPU-b"
    with pytest.raises(BackendUnavailable, match="outside the 2 visible devices"):
        child_visible_devices([2], "6,7")


@pytest.mark.slow
def test_pool_engines_under_a_restricted_parent_get_the_parents_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7,2,5")
    pool = EnginePool(f"{__name__}:FakeEngine", {}, groups=[[0], [3]])
    try:
        out = pool.call("generate_at", list(range(4)), SamplingParams())
        assert [o[0].split("|")[2] for o in out] == ["6", "6", "5", "5"]
    finally:
        pool.close()


# -- release at the end of a stage ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from avr_core.model_refs import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


HELD: list = []


def _stage(name: str):
    from tasks.runtime import Spec, stage

    @stage(lambda cfg: Spec(name, {"x": cfg["x"]}), retries=0)
    def body(out, cfg: dict):
        for role, section in cfg["build"]:
            obj = (backends.make_generator(cfg["policy"], section) if role == "generator"
                   else backends.make_scorer(section))
            HELD.append(weakref.ref(obj.model))
        out.commit({"records": [{"id": 1}]})
    body.__name__ = name
    return body


@pytest.fixture
def no_publish(monkeypatch):
    import tasks.runtime.skeleton as common
    monkeypatch.setattr(common, "publish_stage", lambda *a, **k: None)   # no Prefect API needed


@pytest.mark.slow
@pytest.mark.slow
def test_stage_end_releases_models_and_records_their_device(tiny_llama, tmp_path, no_publish):
    from avr_core.store import Store

    backends.clear_cache()
    policy = {"path": tiny_llama, "dtype": "float32", "trust_remote_code": False}
    gen = {"kind": "hf", "batch_size": 1, "device": "cpu"}
    scorer = {"kind": "judge", "model": policy, "batch_size": 1, "max_length": 64, "device": "auto"}
    base = {"store": {"root": str(tmp_path)}, "policy": policy}
    HELD.clear()

    ref = _stage("fake_gen").fn({**base, "x": 1, "build": [("generator", gen)]})
    gc.collect()
    assert HELD[0]() is None and not backends._CACHE          # the model is gone with the stage
    assert Store(str(tmp_path)).manifest(ref)["device"] == {"generator": "cpu"}

    # keep_engine: the generator survives its stage ...
    _stage("fake_keep").fn({**base, "x": 2, "build": [("generator", {**gen, "keep_engine": True})]})
    gc.collect()
    assert HELD[1]() is not None and len(backends._CACHE) == 1
    # ... until a stage builds a model that may not share the accelerator with it (CUDA); on a
    # CPU (host memory) the kept generator stays beside the scorer, which goes with its stage
    ref = _stage("fake_score").fn({**base, "x": 3, "build": [("scorer", scorer)]})
    gc.collect()
    assert HELD[2]() is None and Store(str(tmp_path)).manifest(ref)["device"] == {"scorer": "cuda:0" if HAS_CUDA
                                                                                  else "cpu"}
    if HAS_CUDA:
        assert HELD[1]() is None and not backends._CACHE
    else:
        assert HELD[1]() is not None and len(backends._CACHE) == 1
        # another policy's generator (here: other settings) replaces the kept one: same role
        _stage("fake_keep2").fn({**base, "x": 4, "build": [("generator", {**gen, "keep_engine": True,
                                                                            "batch_size": 2})]})
        gc.collect()
        assert HELD[1]() is None and HELD[3]() is not None and len(backends._CACHE) == 1
        backends.clear_cache()

    # disjoint gpus: the config says both fit, so the kept generator stays beside the scorer
    backends._META["k"] = {"role": "generator", "keep": True, "gpus": (0, 1)}
    backends._CACHE["k"] = marker = type("M", (), {"closed": False, "close": lambda s: setattr(s, "closed", True)})()
    backends._make_room("other", {"gpus": [2, 3]}, "scorer")
    assert "k" in backends._CACHE
    backends._make_room("other", {"gpus": [1, 2]}, "scorer")
    assert "k" not in backends._CACHE and marker.closed


@pytest.mark.slow
@pytest.mark.slow
def test_a_failing_stage_releases_too(tiny_llama, tmp_path, no_publish):
    from tasks.runtime import Spec, stage

    backends.clear_cache()
    policy = {"path": tiny_llama, "dtype": "float32", "trust_remote_code": False}

    @stage(lambda cfg: Spec("fake_fail", {}), retries=0)
    def fake_fail(out, cfg: dict):
        HELD.append(weakref.ref(backends.make_generator(policy, {"kind": "hf", "batch_size": 1}).model))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fake_fail.fn({"store": {"root": str(tmp_path)}})
    gc.collect()
    assert HELD[-1]() is None and not backends._CACHE


def test_cpu_threads_follow_avr_threads_then_the_affinity_mask(monkeypatch):
    """Issue 37: each process sizes torch's threads to the cores it may use, so runs side by side
    do not oversubscribe the machine; training ranks on one node split them."""
    import os

    import torch

    from avr_core.backends.device import cpu_threads, size_cpu_threads

    monkeypatch.delenv("AVR_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert (cpu_threads(), cpu_threads(share=2), cpu_threads(share=8)) == (4, 2, 1)
    monkeypatch.setenv("AVR_THREADS", "3")
    assert (cpu_threads(), cpu_threads(share=2)) == (3, 1)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("AVR_THREADS", "1")
        assert size_cpu_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("AVR_THREADS", "two")
    with pytest.raises(ValueError, match="AVR_THREADS='two': expected a positive number"):
        cpu_threads()


def test_a_process_pinned_to_one_core_runs_one_torch_thread():
    """The real affinity mask (taskset), not a patched one."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("taskset"):
        pytest.skip("no taskset")
    code = ("import torch; from avr_core.backends.device import size_cpu_threads; "
            "print(size_cpu_threads(), torch.get_num_threads())")
    env = {k: v for k, v in __import__("os").environ.items() if k != "AVR_THREADS"}
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=600)
    assert out.stdout.split() == ["1", "1"]
