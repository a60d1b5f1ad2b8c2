"""Resumable checkpoints and the final Hugging Face model directory, both written atomically.

Checkpoint layout (one directory per optimizer step, the newest `keep_last` kept):

    ckpt_dir/
      LATEST                      "step-000006" -- written LAST (tmp + rename): the commit point
      step-000006/
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed: model, optimizer, LR scheduler
        rng-rank0.json            python / numpy / torch (/ cuda) RNG states of each rank
        trainer_state.json        step, data position, shuffle seed, metrics so far, fingerprint

A step directory counts only once `trainer_state.json` is in it and LATEST names it; one a
killed run left half-written is ignored and overwritten. Our own state is JSON (the store holds
no pickles of ours; DeepSpeed's files are its own torch format).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from avr_core.training.dist import barrier

LATEST = "LATEST"
STATE = "trainer_state.json"
_TAG = re.compile(r"^step-(\d+)$")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The committed checkpoint to resume from, or None for a fresh start."""
    marker = Path(ckpt_dir) / LATEST
    if not marker.exists():
        return None
    tag = marker.read_text().strip()
    if not (Path(ckpt_dir) / tag / STATE).exists():
        raise RuntimeError(f"{marker} names {tag!r}, which has no {STATE}: the checkpoint "
                           "directory was modified by hand")
    return tag


def save(engine, ckpt_dir: str | Path, step: int, state: dict, rank: int, keep_last: int = 2) -> str:
    """All ranks call this. DeepSpeed writes its shards, each rank its RNG, then rank 0 commits."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step-{step:06d}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt_dir / tag / STATE     # left by a run killed after writing it but before LATEST
        if stale.exists():
            stale.unlink()
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    _write_atomic(ckpt_dir / tag / f"rng-rank{rank}.json", json.dumps(rng_state()))
    barrier()
    if rank == 0:
        _write_atomic(ckpt_dir / tag / STATE, json.dumps(state, indent=1))
        _write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last)
    barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """Drop all but the newest `keep_last` committed steps, and any uncommitted leftovers."""
    current = int(_TAG.match((ckpt_dir / LATEST).read_text().strip()).group(1))
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _TAG.match(p.name)))
    committed = [p for s, p in steps if s <= current and (p / STATE).exists()]
    keep = set(committed[-max(1, keep_last):])
    for _, p in steps:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, ckpt_dir: str | Path, rank: int) -> dict | None:
    """Restore model, optimizer, scheduler (DeepSpeed) and this rank's RNG; return our state."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _load_weights_only(engine)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    tagdir = Path(ckpt_dir) / tag
    state = json.loads((tagdir / STATE).read_text())
    rng = tagdir / f"rng-rank{rank}.json"
    if rng.exists():
        set_rng_state(json.loads(rng.read_text()))
    return state


def _allowed_globals() -> list:
    """The DeepSpeed classes its checkpoints hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str, map_location=None):
    """`torch.load(weights_only=True)` with DeepSpeed's few checkpoint classes allow-listed: the
    checkpoint lives in the store (`.work/`), and a planted pickle must not run code on resume."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(f"refusing to load checkpoint file {path}: it holds more than tensors and "
                           f"DeepSpeed's known classes ({_why(e)}). Delete the "
                           "checkpoint directory to restart training from scratch.") from None


def _why(e: Exception) -> str:
    lines = str(e).splitlines()
    last = lines[-1] if lines else ""
    return next((ln.strip() for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln), last)[:300]


def _load_weights_only(engine) -> None:
    """DeepSpeed's TorchCheckpointEngine unpickles everything (weights_only off): load safely instead."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if isinstance(ce, TorchCheckpointEngine):
        ce.load = safe_torch_load


def export_hf(engine, tokenizer, out_dir: str | Path, rank: int, files: dict[str, str] | None = None) -> None:
    """Write a Hugging Face model directory (safetensors, config, tokenizer with its chat
    template, plus `files`) to a temporary sibling, then rename it into place.

    All ranks call this: under ZeRO-3 the partitioned weights are first gathered (16-bit
    when training in bf16) onto rank 0, which alone writes.
    """
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        model = engine.module
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    barrier()
