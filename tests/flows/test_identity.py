"""Identity across machines (issue #23 item 4; docs/RELIABILITY.md "Identity across machines").

A model or dataset given by NAME enters the cache key with its revision or a content digest
(avr_core/identity.py): a local model directory by the content of its small files and the names
and sizes of its weights, a hub id by the commit sha its snapshot resolves to (offline: the local
HF cache), an `hf://` prompt set the same way. Ray workers recompute code version, package
versions and model identities on their node and refuse their shards on any difference
(tasks/runtime/ray_workers.py)."""
from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from omegaconf import OmegaConf

from avr_core import identity
from avr_core.identity import IdentityError, dataset_identity, model_identity
from avr_core.store import ArtifactRef

SHA_A, SHA_B = "a" * 40, "b" * 40


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Every test is a new run (nothing memoised) against its own, empty HF cache, offline."""
    identity.forget()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield
    identity.forget()


def _model_dir(path, weights: bytes = b"\0" * 64):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (path / "model.safetensors").write_bytes(weights)
    return path


def _respond_key(tmp_path, model_path: str) -> str:
    """The `respond` stage's artifact key for `model_path` as the policy (nothing runs), as a
    new run computes it."""
    from avr_core.config import load_config
    from tasks.synthesis import respond

    identity.forget()
    cfg = OmegaConf.to_container(load_config("tiny", [f"store.root={tmp_path / 'store'}",
                                                      f"policy.path={model_path}"]), resolve=True)
    return respond.ref(cfg, cfg["policy"], ArtifactRef(str(tmp_path / "store"), "prompts", "p0")).key


def _hub_snapshot(cache, repo_type: str, repo_id: str, sha: str) -> None:
    """A snapshot in the HF cache layout: <type>s--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)


# -- local directories --------------------------------------------------------------------------
def test_local_model_key_is_stable_and_follows_config_and_weight_sizes(tmp_path):
    model = _model_dir(tmp_path / "m")
    first = _respond_key(tmp_path, str(model))
    assert _respond_key(tmp_path, str(model)) == first                 # run to run, nothing changed

    (model / "model.safetensors").write_bytes(b"\1" * 64)               # same size: not read (by design)
    assert _respond_key(tmp_path, str(model)) == first

    (model / "model.safetensors").write_bytes(b"\0" * 65)               # a weight file's size
    resized = _respond_key(tmp_path, str(model))
    assert resized != first

    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    assert _respond_key(tmp_path, str(model)) not in (first, resized)   # config.json's content


def test_a_copy_elsewhere_is_the_same_model_and_a_repointed_path_is_not(tmp_path):
    a, b = _model_dir(tmp_path / "a"), _model_dir(tmp_path / "b")
    assert model_identity(str(a)) == model_identity(str(b))             # mtimes and location left out
    other = _model_dir(tmp_path / "c", weights=b"\0" * 128)
    (tmp_path / "current").symlink_to(a)
    before = _respond_key(tmp_path, str(tmp_path / "current"))
    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to(other)                            # the same path, re-pointed
    assert _respond_key(tmp_path, str(tmp_path / "current")) != before


def test_the_embedded_model_is_keyed_by_its_directory_content():
    from avr_core.model_refs import resolve_model_path

    got = model_identity("embedded:smollm2-135m-instruct")
    assert got == "sha256:" + identity.local_digest(resolve_model_path("embedded:smollm2-135m-instruct"))


# -- hub ids and hub datasets ------------------------------------------------------------------
def test_hub_id_offline_without_a_cached_snapshot_is_one_clear_line(tmp_path):
    with pytest.raises(IdentityError) as e:
        model_identity("meta-llama/Meta-Llama-3-8B-Instruct")
    msg = str(e.value)
    assert "\n" not in msg and "'meta-llama/Meta-Llama-3-8B-Instruct'" in msg
    assert "offline (HF_HUB_OFFLINE)" in msg
    with pytest.raises(IdentityError, match="HF_HUB_OFFLINE"):         # never keyed by name instead
        _respond_key(tmp_path, "meta-llama/Meta-Llama-3-8B-Instruct")


def test_preflight_names_the_config_key(tmp_path):
    from avr_core.config import ConfigError
    from run_records.preflight import check_identities

    cfg = {"policy": {"path": "org/absent"}, "generator": {"kind": "hf"}, "scorer": {"kind": "rules"}}
    with pytest.raises(ConfigError, match=r"^key 'policy.path': model 'org/absent': the hub is offline"):
        check_identities(cfg)
    check_identities({**cfg, "generator": {"kind": "openai"}})         # a served model: its name only


def test_hub_snapshot_in_the_cache_resolves_to_its_commit_and_a_new_one_changes_the_key(tmp_path):
    cache = tmp_path / "hf-cache"
    _hub_snapshot(cache, "model", "org/tiny", SHA_A)
    assert model_identity("org/tiny") == f"hf:{SHA_A}"
    first = _respond_key(tmp_path, "org/tiny")
    assert _respond_key(tmp_path, "org/tiny") == first

    (cache / "models--org--tiny" / "snapshots" / SHA_B).mkdir()         # a new upstream snapshot, downloaded
    (cache / "models--org--tiny" / "refs" / "main").write_text(SHA_B)
    assert _respond_key(tmp_path, "org/tiny") != first
    identity.forget()
    assert model_identity("org/tiny", revision=SHA_A) == f"hf:{SHA_A}"  # a pinned revision: that snapshot


def test_hf_prompts_are_keyed_by_the_dataset_commit(tmp_path):
    from tasks.synthesis import prompts_spec

    cache = tmp_path / "hf-cache"
    cfg = {"data": {"prompts": "hf://org/prompts:train", "stage1_sft": [0, 4]}}
    with pytest.raises(IdentityError, match="dataset 'org/prompts': the hub is offline"):
        prompts_spec(cfg, "stage1_sft")
    _hub_snapshot(cache, "dataset", "org/prompts", SHA_A)
    identity.forget()
    assert dataset_identity("org/prompts") == f"hf:{SHA_A}"
    first = prompts_spec(cfg, "stage1_sft").config
    assert first["file_sha256"] == f"hf://org/prompts:train@hf:{SHA_A}"
    (cache / "datasets--org--prompts" / "snapshots" / SHA_B).mkdir()
    (cache / "datasets--org--prompts" / "refs" / "main").write_text(SHA_B)
    identity.forget()
    assert prompts_spec(cfg, "stage1_sft").config != first


# -- workers -----------------------------------------------------------------------------------
def test_mismatch_is_one_line_naming_host_field_and_both_values():
    from tasks.runtime.ray_workers import mismatch

    driver = {"code": "3f0c9a41be22", "torch": "2.6.0", "transformers": "4.57.1", "vllm": None,
              "model org/tiny": f"hf:{SHA_A}"}
    assert mismatch(driver, dict(driver), "gpu-7:4242") is None
    line = mismatch(driver, {**driver, "model org/tiny": f"hf:{SHA_B}"}, "gpu-7:4242")
    assert line == (f"worker gpu-7:4242 refuses its shard: model org/tiny is 'hf:{SHA_B}' there, "
                    f"'hf:{SHA_A}' on the driver")
    assert "vllm is '0.11.0' there, None on the driver" in mismatch(driver, {**driver, "vllm": "0.11.0"}, "h")
    assert "code is '000000000000' there" in mismatch(driver, {**driver, "code": "0" * 12}, "h")


def test_worker_computes_the_drivers_environment_and_refuses_on_a_difference(tmp_path):
    from tasks.runtime.ray_workers import Expect, WorkerMismatch, _Worker, environment

    model = _model_dir(tmp_path / "m")
    expect = Expect("tasks.synthesis:respond", {"generator": {"kind": "hf"}}, models=((str(model), None),))
    env = environment(expect)
    assert set(env) == {"code", "torch", "transformers", "vllm", f"model {model}"}
    work = (lambda shard, i: ({"records": shard}, Counter()), None)
    ok = _Worker(work, Expect(expect.entry, expect.cfg, models=expect.models, driver=env))
    assert ok.check() is None and ok.run([{"id": "x"}], 0)[1] == {"records": [{"id": "x"}]}

    identity.forget()                                                   # the worker's node: another model
    (model / "config.json").write_text("{}")
    bad = _Worker(work, Expect(expect.entry, expect.cfg, models=expect.models, driver=env))
    assert bad.check().startswith(f"worker {bad.me} refuses its shard: model {model} is 'sha256:")
    with pytest.raises(WorkerMismatch, match="refuses its shard"):
        bad.run([{"id": "x"}], 0)


@pytest.mark.slow
def test_ray_workers_on_other_code_refuse_before_any_shard(tmp_path):
    """Real Ray actors; the driver's expectation carries another code version (as a node on
    another commit would differ): no shard is dispatched or committed, one line says why."""
    from tasks.runtime.ray_workers import Expect, WorkerMismatch, ensure_ray, environment, run_on_ray, settings

    scale = settings({"engine": "ray", "workers": 2})
    ray = ensure_ray(scale)
    try:
        expect = Expect("tasks.synthesis:respond", {"generator": {"kind": "hf"}})
        driver = {**environment(expect), "code": "0" * 12}
        committed = []
        with pytest.raises(WorkerMismatch) as e:
            run_on_ray([[{"id": "a"}], [{"id": "b"}]], [0, 1], lambda shard, i: ({"records": shard}, {}), None,
                       scale, lambda *a: committed.append(a), logging.getLogger("test"),
                       Expect(expect.entry, expect.cfg, driver=driver))
        assert committed == []
        msg = str(e.value)
        assert "\n" not in msg and "refuses its shard: code is '" in msg and "'000000000000' on the driver" in msg
    finally:
        ray.shutdown()
