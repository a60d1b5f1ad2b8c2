"""Where a model runs: ONE helper for every model this project loads in-process (the hf
generator, reward scorer and judge scorer, reference log-probs, the local alpaca-eval judge).

A `device` setting is ``auto`` (the default: CUDA when present, else CPU), ``cpu``, ``cuda``
or ``cuda:N``. With CUDA, a model that does not fit on one GPU is spread over the allowed GPUs
with ``device_map="auto"`` and NOTHING is offloaded to CPU or disk: a layer that lands there is
an error, not a silent slowdown. ``device=cuda`` on a machine without CUDA is an error (and a
preflight error, `check_devices`), never a CPU fallback.

    >>> parse_device("cuda:3"), parse_device("auto")
    (('cuda', 3), ('auto', None))
    >>> place("/models/rm", "bfloat16", "cpu").label
    'cpu'
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")
FIT_MARGIN = 1.2        # weights x this (activations, KV cache of a forward) must fit one GPU's free memory
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class DeviceError(RuntimeError):
    """A device setting this machine cannot honour; the message is one line naming the key."""


def parse_device(spec: str) -> tuple[str, int | None]:
    m = _DEVICE.match(str(spec).strip())
    if not m or (m.group(1) != "cuda" and m.group(2) is not None):
        raise DeviceError(f"device {spec!r}: must be auto, cpu, cuda or cuda:N")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def cuda_count() -> int:
    """Visible CUDA devices (0 without torch or CUDA); honours CUDA_VISIBLE_DEVICES."""
    if os.environ.get("AVR_FORCE_NO_CUDA") == "1":      # tests: pretend there is no GPU
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_problem(spec: str, key: str = "device", gpus: Sequence[int] = ()) -> str | None:
    """Why `spec` cannot run here (one line naming `key`), or None."""
    try:
        kind, index = parse_device(spec)
    except DeviceError as e:
        return f"key '{key}': {e}"
    if kind in ("auto", "cpu") and not gpus:
        return None
    n = cuda_count()
    if kind == "cuda" and n == 0:
        return (f"key '{key}': {spec} asked for, but no CUDA device is visible on this machine "
                f"(torch.cuda.is_available() is False); set {key}=auto or {key}=cpu")
    if index is not None and index >= n:
        return f"key '{key}': {spec} asked for, but only {n} CUDA device(s) are visible"
    bad = [g for g in gpus if n and g >= n]
    if bad:
        return f"key '{key}': gpus {list(gpus)} name device(s) {bad}, but only {n} CUDA device(s) are visible"
    return None


def resolve(spec: str, key: str = "device", gpus: Sequence[int] = ()) -> str:
    """'cpu' or 'cuda[:N]' as this machine will run `spec`; DeviceError when it cannot."""
    if problem := device_problem(spec, key, gpus):
        raise DeviceError(problem)
    kind, index = parse_device(spec)
    if kind == "cpu" or (kind == "auto" and cuda_count() == 0):
        return "cpu"
    if index is not None:
        return f"cuda:{index}"
    return "cuda"


@dataclass(frozen=True)
class Placement:
    """How one model is loaded: `kwargs` for `from_pretrained`, `device` for its inputs (None:
    read it off the loaded model, see `input_device`), `label` for the manifest."""

    label: str
    kwargs: dict
    device: str | None


def weight_bytes(path: str | os.PathLike, dtype: str) -> int | None:
    """Bytes of a local model's weights in `dtype`, from the safetensors headers (parameter
    counts, no tensor is read); None when unknown (a hub id, .bin files)."""
    n = param_count(path)
    return None if n is None else n * DTYPE_BYTES.get(dtype, 4)


def param_count(path: str | os.PathLike) -> int | None:
    """Parameters of a local safetensors checkpoint, from its headers (no tensor is read);
    None when unknown (a hub id, .bin files)."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        return None
    params = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                k = 1
                for d in t["shape"]:
                    k *= d
                params += k
    return params


def _free_bytes(i: int) -> int:
    import torch
    return int(torch.cuda.mem_get_info(i)[0])


def place(path: str | os.PathLike, dtype: str, spec: str = "auto", gpus: Sequence[int] = (),
          key: str = "device") -> Placement:
    """Placement of the model at `path` for the device setting `spec`, on the allowed `gpus`
    (empty: every visible GPU). One GPU when the weights fit the first allowed GPU's free memory
    (or `cuda:N` names one); otherwise ``device_map="auto"`` over the allowed GPUs with no CPU
    share. The caller moves the model (`load`)."""
    where = resolve(spec, key, gpus)
    if where == "cpu":
        return Placement("cpu", {}, "cpu")
    if where.startswith("cuda:"):
        return Placement(where, {}, where)
    allowed = list(gpus) or list(range(cuda_count()))
    need = weight_bytes(path, dtype)
    fits = need is not None and need * FIT_MARGIN <= _free_bytes(allowed[0])
    if len(allowed) == 1 or fits:
        return Placement(f"cuda:{allowed[0]}", {}, f"cuda:{allowed[0]}")
    max_memory: dict[Any, int] = {i: int(_free_bytes(i) / FIT_MARGIN) for i in allowed}
    return Placement(f"cuda:{','.join(map(str, allowed))} (device_map=auto)",
                     {"device_map": "auto", "max_memory": max_memory}, None)


def load(cls, path: str, dtype: str, spec: str = "auto", gpus: Sequence[int] = (), key: str = "device",
         **kwargs):
    """`cls.from_pretrained(path, ...)` placed by `place`: (model in eval mode, Placement)."""
    import torch

    pl = place(path, dtype, spec, gpus, key)
    model = cls.from_pretrained(path, dtype=getattr(torch, dtype), **pl.kwargs, **kwargs)
    if pl.device is not None:
        model = model.to(pl.device)
    else:
        off = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()
                      if str(d) in ("cpu", "disk")})
        if off:
            raise DeviceError(f"key '{key}': {path} does not fit the GPUs {list(gpus) or 'visible'} "
                              f"(parts would go to {off}); give it more GPUs or a smaller dtype")
    return model.eval(), pl


def input_device(model) -> Any:
    """Where a (possibly device_map-spread) model wants its input ids: its embedding's device."""
    try:
        return model.get_input_embeddings().weight.device
    except Exception:
        return next(model.parameters()).device


def check_devices(cfg: dict) -> None:
    """Preflight: every device setting of a resolved config can run on this machine; raises
    DeviceError with one line naming the key. Nothing is loaded."""
    for key, spec, gpus in device_settings(cfg):
        if problem := device_problem(spec, key, gpus):
            raise DeviceError(problem)


def device_settings(cfg: dict) -> list[tuple[str, str, list]]:
    """(key, device setting, gpus) of every model the config loads in a process of ours."""
    out = []
    g, s = cfg.get("generator", {}), cfg.get("scorer", {})
    if g.get("kind") != "openai" and "device" in g:
        out.append(("generator.device", g["device"], list(g.get("gpus") or [])))
    if s.get("kind") != "vllm_rm" or not s.get("base_url"):
        if "device" in s:
            out.append(("scorer.device", s["device"], list(s.get("gpus") or [])))
    judge = (cfg.get("eval") or {}).get("judge") or {}
    if judge.get("kind") == "local" and "device" in judge:
        out.append(("eval.judge.device", judge["device"], []))
    for t in ("rsft", "po", "cot_sft", "cot_po"):
        if "device" in (cfg.get(t) or {}):
            out.append((f"{t}.device", cfg[t]["device"], []))
    return out


def release_accelerator() -> None:
    """Give freed accelerator memory back (after a model's last reference is dropped)."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    # Only where this process already holds a CUDA context: `synchronize()` would otherwise create
    # one (~0.5 GB on GPU 0) in the Prefect flow process, which never uses CUDA itself and whose
    # context would then sit there for its lifetime, under every engine's memory check.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.synchronize()


def peak_memory_gb() -> float | None:
    """Peak CUDA memory allocated by this process since start (GiB, summed over GPUs); None on CPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():   # never create a context to read 0
        return None
    return round(sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30, 3)
