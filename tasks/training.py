"""Training tasks (docs/DESIGN.md step 6): reference log-probs, RSFT and preference optimisation.

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

from avr_core.losses import NEEDS_REFERENCE
from avr_core.store import ArtifactRef, Store
from tasks.common import Output, Spec, logger, model_artifacts, policy_identity, stage


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
def reference_logps_spec(cfg: dict, reference: dict, pairs: ArtifactRef, section: str = "po") -> Spec:
    keyed = {"reference": policy_identity(reference), "max_length": cfg[section]["max_length"]}
    return Spec("ref_logps", keyed, (pairs,), tuple(model_artifacts(cfg, reference)))


@stage(reference_logps_spec, retries=1, timeout_s=12 * 3600)
def reference_logps(out: Output, cfg: dict, reference: dict, pairs: ArtifactRef, section: str = "po") -> None:
    """log pi_ref(chosen), log pi_ref(rejected) for every pair, computed once and stored, so
    preference training does zero reference-model forward passes."""
    from transformers import AutoTokenizer

    from avr_core.models import resolve_model_path
    from avr_core.training.data import tokenize_pairs
    from avr_core.training.logps import compute_reference_logps

    path = resolve_model_path(reference["path"])
    examples, counts = tokenize_pairs(_pairs_rows(out.store, pairs), AutoTokenizer.from_pretrained(path),
                                      cfg[section]["max_length"])
    device = cfg[section].get("device", "auto")
    rows = compute_reference_logps(path, examples, batch_size=cfg[section]["micro_batch_size"],
                                   dtype=reference["dtype"], device=device, progress=True) if examples else []
    from avr_core.backends.device import place
    out.extra["device"] = {"reference": place(path, reference["dtype"], device, key=f"{section}.device").label}
    out.commit({"records": rows}, {f"tokenize_{k}": v for k, v in counts.items()})


# -- training ---------------------------------------------------------------------------------
def _train_spec(cfg: dict, stage_name: str, base: dict, inputs: tuple) -> Spec:
    return Spec(stage_name, {stage_name: cfg[stage_name], "base": policy_identity(base)}, inputs,
                tuple(model_artifacts(cfg, base)))


def train_sft_spec(cfg, base, data, section="rsft"):
    return _train_spec(cfg, section, base, (data,))


@stage(train_sft_spec, retries=1, timeout_s=72 * 3600)
def train_sft(out: Output, cfg: dict, base: dict, data: ArtifactRef, section: str = "rsft") -> None:
    """Supervised fine-tuning of `base` on the `sft` rows of `data`: RSFT on the selected
    refinement conversations (section rsft), CoT RSFT on long thoughts (section cot_sft)."""
    _train(out, cfg, section, base, data, out.store.read_records(data, "rsft"), None)


def train_po_spec(cfg, base, pairs, ref_logps, section="po"):
    return _train_spec(cfg, section, base, (pairs, ref_logps))


@stage(train_po_spec, retries=1, timeout_s=72 * 3600)
def train_po(out: Output, cfg: dict, base: dict, pairs: ArtifactRef, ref_logps: ArtifactRef,
             section: str = "po") -> None:
    """Preference optimisation (cfg.<section>.loss; the paper: dpo) of `base`, which is also
    the reference model whose log-probs `ref_logps` holds."""
    refs = ref_logps if cfg[section]["loss"] in NEEDS_REFERENCE else None
    _train(out, cfg, section, base, pairs, _pairs_rows(out.store, pairs), refs)


def _sweep_work(store: Store) -> None:
    """Remove the checkpoints of training runs whose model artifact is finished: a kill while
    the last run removed them would otherwise leave them (a model's size, and more) forever."""
    work = Path(store.local_path(store.ref(".work", "")))
    for d in (work.iterdir() if work.is_dir() else []):
        stage_name, _, key = d.name.partition("-")
        if key and d.is_dir() and store.exists(store.ref(stage_name, key)):
            shutil.rmtree(d, ignore_errors=True)


def _train(out: Output, cfg, stage_name, base, data: ArtifactRef, rows: list[dict], ref_logps):
    """Write the rows (and reference log-probs) for the training subprocess, run it, and put the
    exported model into the artifact; its checkpoints go once the manifest is written."""
    from avr_core.models import resolve_model_path
    from avr_core.training.dist import child_env
    from avr_core.training.launch import launch_command, write_spec

    store, ref = out.store, out.ref
    _sweep_work(store)
    if not rows:
        raise ValueError(f"{stage_name}: no training rows in {data} (see its manifest counts)")
    model_dir = _local_dir(store, ref)
    work = Path(store.local_path(store.ref(".work", f"{stage_name}-{ref.key}")))
    work.mkdir(parents=True, exist_ok=True)
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = dict(model_path=resolve_model_path(base["path"]), rows=str(work / "rows.jsonl"), cfg=cfg[stage_name],
                out_dir=str(model_dir / "model"), ckpt_dir=str(work / "ckpt"), progress=True)
    if ref_logps is not None:
        (work / "ref_logps.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in store.read_records(ref_logps)))
        spec["ref_logps"] = str(work / "ref_logps.jsonl")
    cmd = launch_command(str(write_spec(work / "spec.json", **spec)), cfg[stage_name]["num_gpus"])
    logger().info("%s: %s", stage_name, " ".join(cmd))
    proc = subprocess.run(cmd, env=child_env(dict(os.environ)), timeout=72 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage_name}: training exited with {proc.returncode}; checkpoints kept in "
                           f"{work / 'ckpt'}, a rerun resumes from the last one")
    summary = json.loads((model_dir / "model" / "train_summary.json").read_text())
    out.extra["train"] = summary
    out.counts.update({f"tokenize_{k}": v for k, v in summary.get("tokenize", {}).items()})
    out.after.append(lambda: shutil.rmtree(work, ignore_errors=True))  # checkpoints only resume an unfinished run
    logger().info("%s: trained (steps=%s, final loss=%s)", stage_name, summary.get("steps"), summary.get("final_loss"))
