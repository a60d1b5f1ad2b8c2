"""Training tasks (DESIGN.md step 6): reference log-probs, RSFT and preference optimisation.

Training always runs as a subprocess (`python -m avr_core.training`, or the `deepspeed`
launcher for several GPUs): the Prefect worker never holds CUDA/NCCL or process-group state,
and the task's timeout can actually stop it (a blocking call in a worker thread cannot be
interrupted, PrefectHQ/prefect#15760). Checkpoints go to `<store>/.work/<stage>/<key>/ckpt`,
so a killed or failed training task resumes from its last checkpoint when run again.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import importlib

import avr_core.training.data
import avr_core.training.logps
import avr_core.training.recipe
from avr_core.losses import NEEDS_REFERENCE
from avr_core.store import ArtifactRef, Store, cache_key, code_version
from tasks.common import check_inputs, logger, model_artifacts, policy_identity, stage_task, store_of

_CODE = code_version(avr_core.training.recipe, avr_core.training.data, avr_core.training.logps,
                     *(importlib.import_module(f"avr_core.losses.{n}") for n in ("sft", "dpo", "ipo", "simpo", "rm_margin")))
_REF_CODE = code_version(avr_core.training.logps, avr_core.training.data)


def policy_of(cfg: dict, model: ArtifactRef) -> dict:
    """A trained model artifact as a policy config (its cache identity: see policy_identity)."""
    return {"path": f"{Store(cfg['store']['root']).local_path(model)}/model", "dtype": cfg["policy"]["dtype"],
            "trust_remote_code": False, "artifact": str(model)}


def _local_dir(store: Store, ref: ArtifactRef) -> Path:
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(store.fs, LocalFileSystem):
        raise NotImplementedError(
            f"training writes model directories and checkpoints to a local filesystem; store.root="
            f"{store.root!r} is remote. Use a local or mounted path (e.g. an s3 mount) for training stages.")
    return Path(store.local_path(ref))


def _pairs_rows(store: Store, pairs: ArtifactRef) -> list[dict]:
    return store.read_records(pairs, "pairs")


# -- reference log-probs ----------------------------------------------------------------------
def reference_logps_ref(cfg: dict, reference: dict, pairs: ArtifactRef, section: str = "po") -> ArtifactRef:
    keyed = {"reference": policy_identity(reference), "max_length": cfg[section]["max_length"]}
    return store_of(cfg).ref("ref_logps", cache_key("ref_logps", keyed, [str(pairs)], _REF_CODE))


@stage_task(reference_logps_ref, retries=1, timeout_s=12 * 3600)
def reference_logps(cfg: dict, reference: dict, pairs: ArtifactRef, section: str = "po") -> ArtifactRef:
    """log pi_ref(chosen), log pi_ref(rejected) for every pair, computed once and stored, so
    preference training does zero reference-model forward passes."""
    from transformers import AutoTokenizer

    from avr_core.models import resolve_model_path
    from avr_core.training.data import tokenize_pairs
    from avr_core.training.logps import compute_reference_logps

    store, ref = store_of(cfg), reference_logps_ref(cfg, reference, pairs, section)
    max_length = cfg[section]["max_length"]
    if store.exists(ref):
        return ref
    check_inputs(store, ref, [pairs, *model_artifacts(cfg, reference)])
    path = resolve_model_path(reference["path"])
    examples, counts = tokenize_pairs(_pairs_rows(store, pairs), AutoTokenizer.from_pretrained(path),
                                      max_length)
    rows = compute_reference_logps(path, examples, batch_size=cfg[section]["micro_batch_size"],
                                   dtype=reference["dtype"], progress=True) if examples else []
    w = store.writer(ref.stage, ref.key, {"reference": policy_identity(reference), "max_length": max_length},
                     [pairs], _REF_CODE)
    w.commit_shard(0, {"records": rows}, {f"tokenize_{k}": v for k, v in counts.items()})
    return w.finalize()


# -- training ---------------------------------------------------------------------------------
def _train_ref(cfg: dict, stage: str, base: dict, inputs: list[ArtifactRef]) -> ArtifactRef:
    section = {stage: cfg[stage], "base": policy_identity(base)}
    return store_of(cfg).ref(stage, cache_key(stage, section, [str(r) for r in inputs], _CODE))


def train_sft_ref(cfg, base, data, section="rsft"):
    return _train_ref(cfg, section, base, [data])


@stage_task(train_sft_ref, retries=1, timeout_s=72 * 3600)
def train_sft(cfg: dict, base: dict, data: ArtifactRef, section: str = "rsft") -> ArtifactRef:
    """Supervised fine-tuning of `base` on the `sft` rows of `data`: RSFT on the selected
    refinement conversations (section rsft), CoT RSFT on long thoughts (section cot_sft)."""
    store = store_of(cfg)
    return _train(cfg, section, base, train_sft_ref(cfg, base, data, section), [data],
                  lambda: store.read_records(data, "rsft"), None)


def train_po_ref(cfg, base, pairs, ref_logps, section="po"):
    return _train_ref(cfg, section, base, [pairs, ref_logps])


@stage_task(train_po_ref, retries=1, timeout_s=72 * 3600)
def train_po(cfg: dict, base: dict, pairs: ArtifactRef, ref_logps: ArtifactRef, section: str = "po") -> ArtifactRef:
    """Preference optimisation (cfg.<section>.loss; the paper: dpo) of `base`, which is also
    the reference model whose log-probs `ref_logps` holds."""
    store = store_of(cfg)
    refs = ref_logps if cfg[section]["loss"] in NEEDS_REFERENCE else None
    return _train(cfg, section, base, train_po_ref(cfg, base, pairs, ref_logps, section), [pairs, ref_logps],
                  lambda: _pairs_rows(store, pairs), refs)


def _sweep_work(store: Store) -> None:
    """Remove the checkpoints of training runs whose model artifact is finished: a kill while
    the last run removed them would otherwise leave them (a model's size, and more) forever."""
    work = Path(store.local_path(store.ref(".work", "")))
    for d in (work.iterdir() if work.is_dir() else []):
        stage, _, key = d.name.partition("-")
        if key and d.is_dir() and store.exists(store.ref(stage, key)):
            shutil.rmtree(d, ignore_errors=True)


def _train(cfg, stage, base, ref, inputs, rows_fn, ref_logps):
    from avr_core.models import resolve_model_path
    from avr_core.training.launch import launch_command, write_spec
    from avr_core.training.dist import child_env

    store = store_of(cfg)
    if store.exists(ref):
        logger().info("%s: cache hit (%s)", stage, ref.path)
        return ref
    check_inputs(store, ref, [*inputs, *model_artifacts(cfg, base)])
    _sweep_work(store)
    rows = rows_fn()
    if not rows:
        raise ValueError(f"{stage}: no training rows in {inputs[0]} (see its manifest counts)")
    out = _local_dir(store, ref)
    work = Path(store.local_path(store.ref(".work", f"{stage}-{ref.key}")))
    work.mkdir(parents=True, exist_ok=True)
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = dict(model_path=resolve_model_path(base["path"]), rows=str(work / "rows.jsonl"), cfg=cfg[stage],
                out_dir=str(out / "model"), ckpt_dir=str(work / "ckpt"), progress=True)
    if ref_logps is not None:
        (work / "ref_logps.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in store.read_records(ref_logps)))
        spec["ref_logps"] = str(work / "ref_logps.jsonl")
    cmd = launch_command(str(write_spec(work / "spec.json", **spec)), cfg[stage]["num_gpus"])
    logger().info("%s: %s", stage, " ".join(cmd))
    proc = subprocess.run(cmd, env=child_env(dict(os.environ)), timeout=72 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage}: training exited with {proc.returncode}; checkpoints kept in {work / 'ckpt'}, "
                           f"a rerun resumes from the last one")
    summary = json.loads((out / "model" / "train_summary.json").read_text())
    w = store.writer(ref.stage, ref.key, {stage: cfg[stage], "base": policy_identity(base)}, inputs, _CODE)
    done = w.finalize(extra={"train": summary}, counts={f"tokenize_{k}": v for k, v in summary.get("tokenize", {}).items()})
    shutil.rmtree(work, ignore_errors=True)  # checkpoints are only for resuming an unfinished run
    logger().info("%s: wrote %s (steps=%s, final loss=%s)", stage, done.path, summary.get("steps"),
                  summary.get("final_loss"))
    return done
