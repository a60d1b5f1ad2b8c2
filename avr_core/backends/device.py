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
    if bad:   # the list is the culprit, so name it (not `key`, the device setting beside it)
        lk = gpus_key(key)
        return (f"key '{lk}': {list(gpus)} names device(s) {bad}, but {visible_note(n)}; "
                f"set {lk} to indices below {n}, or [] for every visible GPU")
    return None


def gpus_key(device_key: str) -> str:
    """The `gpus` key beside a device key: 'generator.device' -> 'generator.gpus'."""
    section, _, _ = device_key.rpartition(".")
    return f"{section}.gpus" if section else "gpus"


def visible_note(n: int) -> str:
    """'1 is visible on this machine (CUDA_VISIBLE_DEVICES=3)': the count and where it comes from,
    since a restricted CUDA_VISIBLE_DEVICES (a Slurm slice, a pinned worker) is the usual reason a
    node shows fewer GPUs than it has."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = "CUDA_VISIBLE_DEVICES is not set" if env is None else f"CUDA_VISIBLE_DEVICES={env}"
    return f"{n} {'is' if n == 1 else 'are'} visible on this machine ({where})"


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


TRAINING_SECTIONS = ("rsft", "po", "cot_sft", "cot_po")


def check_devices(cfg: dict, trained: Sequence[str] = TRAINING_SECTIONS) -> None:
    """Preflight: every device setting of a resolved config can run on this machine, the vLLM
    engines fit the GPUs they may use, and each training section in `trained` (those the run's
    flow trains) asks for no more GPUs than are visible. Raises DeviceError with one line naming
    the key. Nothing is loaded."""
    for key, spec, gpus in device_settings(cfg):
        if problem := device_problem(spec, key, gpus):
            raise DeviceError(problem)
    for problem in (engines_problem(cfg), training_gpus_problem(cfg, trained)):
        if problem:
            raise DeviceError(problem)


def device_settings(cfg: dict) -> list[tuple[str, str, list]]:
    """(key, device setting, gpus) of every model the config loads in a process of ours."""
    from avr_core.backends import backend_class

    out = []
    for name in ("generator", "scorer"):       # a model on someone else's server has no device here
        sec = cfg.get(name, {})
        if not backend_class(sec.get("kind")).served_elsewhere(sec) and "device" in sec:
            out.append((f"{name}.device", sec["device"], list(sec.get("gpus") or [])))
    judge = (cfg.get("eval") or {}).get("judge") or {}
    if judge.get("kind") == "local" and "device" in judge:
        out.append(("eval.judge.device", judge["device"], []))
    for t in TRAINING_SECTIONS:
        if "device" in (cfg.get(t) or {}):
            out.append((f"{t}.device", cfg[t]["device"], []))
    return out


def vllm_sections(cfg: dict) -> list[str]:
    """The sections that start vLLM engines in a process of ours (a served vllm_rm starts none)."""
    from avr_core.backends import backend_class

    def starts(sec: dict) -> bool:
        cls = backend_class(sec.get("kind"))
        return cls.vllm_engines and not cls.served_elsewhere(sec)
    return [name for name in ("generator", "scorer") if starts(cfg.get(name, {}))]


def engine_gpus(section: dict) -> int:
    """GPUs a vLLM section's engines need at least: tensor_parallel_size x data_parallel_size
    (data_parallel_size 0 = as many engines as the GPUs hold, so at least one engine's worth)."""
    tp = int(section.get("tensor_parallel_size", 1))
    return tp * max(1, int(section.get("data_parallel_size", 1)))


def engines_problem(cfg: dict) -> str | None:
    """Why a vLLM section's engines cannot be laid out on the GPUs it may use (one line naming
    the key), or None. Checked only where the engines will run on CUDA: on the CPU every engine
    gets no GPU at all (engine_pool.gpu_groups), whatever the sizes say."""
    for name in vllm_sections(cfg):
        sec, need = cfg[name], engine_gpus(cfg[name])
        gpus = list(sec.get("gpus") or [])
        if need <= 1 or resolve(sec.get("device", "auto"), f"{name}.device", gpus) == "cpu":
            continue
        n = cuda_count()
        allowed = len(gpus) or n
        if need > allowed:
            return _engines_line(name, sec, need, allowed, f"{name}.gpus {gpus} allows {len(gpus)}" if gpus
                                 else visible_note(n))
    return None


def _engines_line(name: str, sec: dict, need: int, allowed: int, have: str) -> str:
    """Names the size to change: tensor_parallel_size when one engine alone does not fit,
    else data_parallel_size (0 lays out as many engines as the GPUs hold)."""
    tp, dp = int(sec.get("tensor_parallel_size", 1)), int(sec.get("data_parallel_size", 1))
    head = f"{tp} x data_parallel_size {dp} = {need} GPUs asked for, but {have}"
    if tp > allowed:
        return f"key '{name}.tensor_parallel_size': {head}; set {name}.tensor_parallel_size to at most {allowed}"
    return (f"key '{name}.data_parallel_size': {dp} engines x tensor_parallel_size {tp} = {need} GPUs asked for, "
            f"but {have}; set {name}.data_parallel_size=0 (as many engines as the GPUs hold)")


def training_gpus_problem(cfg: dict, trained: Sequence[str] = TRAINING_SECTIONS) -> str | None:
    """Why a training section's `num_gpus` cannot run here (one line naming the key), or None.

    Checked only when training will run on CUDA (the training process takes CUDA whenever it is
    visible: training/recipe.py). On the CPU `num_gpus > 1` starts that many CPU ranks, which is
    how the multi-rank path is tested without a GPU. With `scale.hostfile` the launcher takes the
    GPUs from the hostfile's slots and `num_gpus` is not used (training/launch.py)."""
    if (cfg.get("scale") or {}).get("hostfile"):
        return None
    asked = {t: int((cfg.get(t) or {}).get("num_gpus") or 0) for t in trained}
    over_one = {t: k for t, k in asked.items() if k > 1}
    if not over_one:   # one process: nothing to count (and no torch import to do it)
        return None
    n = cuda_count()
    if n == 0:
        return None
    over = [t for t, k in over_one.items() if k > n]
    return _too_many_gpus(cfg, over, n) if over else None


def _too_many_gpus(cfg: dict, over: list[str], n: int) -> str:
    """The line for training sections asking for more GPUs than `n`: the first one in full, with
    the grad_accum that keeps its global batch (micro_batch_size x grad_accum x GPUs: fewer GPUs
    alone would silently train a smaller batch), then the others that need the same fix."""
    t, sec = over[0], cfg[over[0]]
    mbs, gas, k = int(sec.get("micro_batch_size", 1)), int(sec.get("grad_accum", 1)), int(sec["num_gpus"])
    batch = mbs * gas * k
    keep = (f" (and {t}.grad_accum={batch // (mbs * n)} to keep its global batch of {batch})"
            if batch % (mbs * n) == 0 else "")
    rest = ", ".join(f"{o}.num_gpus={cfg[o]['num_gpus']}" for o in over[1:])
    return (f"key '{t}.num_gpus': {k} GPUs asked for, but {visible_note(n)}; set {t}.num_gpus={n}{keep}"
            + (f"; the same for {rest}" if rest else ""))


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


def cpu_threads(share: int = 1) -> int:
    """Torch's CPU threads for this process: `AVR_THREADS` when set, else the cores this process
    may run on (its affinity mask: `taskset`, a container's cpuset), divided among the `share`
    processes that split them (training ranks on one node), at least 1.

    Why: two runs on one machine each ran torch with a thread per core, so 4 threads fought for 2
    cores and both ran 7-14x slower (issue 37). `AVR_THREADS=1` (or `taskset -c N`) for each run
    gives each its own core; bench/threads.py measures it.

        AVR_THREADS=1 avr run --preset tiny &   AVR_THREADS=1 avr run --preset tiny store.root=/tmp/b
    """
    raw = os.environ.get("AVR_THREADS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"AVR_THREADS={raw!r}: expected a positive number of threads")
        return max(1, int(raw) // max(1, share))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, share))


def size_cpu_threads(share: int = 1) -> int:
    """Set torch's intra-op threads to `cpu_threads(share)` (called where a process starts its
    work: a run's flow, a training rank, `avr chat`). Returns the number set."""
    import torch

    n = cpu_threads(share)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
