"""DeepSpeed process setup: the same engine on GPUs and on a CPU-only machine.

- GPUs, several processes: the `deepspeed` launcher starts `python -m avr_core.training --spec
  spec.json` once per GPU (`launch_command`) and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*.
- One process (a laptop, CI, one GPU): `train()` runs in the caller's process or as
  `python -m avr_core.training`; `setup()` fills in the single-process variables so
  `deepspeed.init_distributed` does not go looking for MPI, and picks gloo on CPU.

On CPU, DeepSpeed's first `init_distributed` compiles a shared-memory all-reduce op (measured
here: ~90 s on 2 cores with an empty TORCH_EXTENSIONS_DIR, ~0.1 s once cached). With one process
there is nothing to all-reduce, so `setup()` skips building it for world size 1 (init then
takes ~3 s cold, nothing compiled). With several CPU processes the op is built once and cached
as usual; even cached, a 2-process start measured ~27 s init against ~7 s without it, so
`AVR_DS_CPU_SHM=0` skips it there too and all-reduces with plain gloo.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from avr_core.backends.device import size_cpu_threads
from avr_core.backends.net import free_port  # the one free-port helper; launch.py imports it from here

_SET_HERE: dict[str, str] = {}   # the variables setup() put into this process's environment


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def session():
    """`with session() as (rank, world_size, local_rank):` -- `setup()`, and on exit remove the
    single-process variables it put into os.environ, so that a caller (a Prefect worker, a test
    session) that later starts a training subprocess does not hand it this process's
    RANK / WORLD_SIZE / MASTER_PORT. The process group itself stays, for the next call."""
    try:
        yield setup()
    finally:
        for k, v in list(_SET_HERE.items()):
            if os.environ.get(k) == v:
                del os.environ[k]
        _SET_HERE.clear()


def setup() -> tuple[int, int, int]:
    """Environment for DeepSpeed, then import it and join (or create) the process group.

    Returns (rank, world_size, local_rank). Safe to call again in the same process: the
    process group of the first call is reused (two trainings back to back work).
    """
    cuda = has_cuda()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:   # one process, no launcher: we own these variables
        mine = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()))
        os.environ.update(mine)
        _SET_HERE.update(mine)
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))

    import deepspeed
    import deepspeed.comm as dist

    world = int(os.environ["WORLD_SIZE"])
    if not cuda and (world == 1 or os.environ.get("AVR_DS_CPU_SHM") == "0"):
        _skip_cpu_shm_op()
    _quiet(deepspeed)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=None if cuda else "gloo", verbose=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    # the node's cores are split among its ranks (DeepSpeed's launcher: LOCAL_SIZE; torchrun: LOCAL_WORLD_SIZE)
    size_cpu_threads(int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1))
    if cuda:
        import torch

        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def _skip_cpu_shm_op() -> None:
    """World size 1 on CPU: don't compile DeepSpeed's shared-memory all-reduce (nothing to reduce).

    `deepspeed.comm.torch.build_shm_op` returns None when the op is not available, and the
    backend then uses plain torch.distributed (gloo). Note `import deepspeed.comm.torch` would
    hand back the `torch` package re-exported by deepspeed.comm, hence import_module.
    """
    import importlib

    mod = importlib.import_module("deepspeed.comm.torch")
    if not getattr(mod.build_shm_op, "_avr_skipped", False):
        def build_shm_op():
            return None
        build_shm_op._avr_skipped = True
        mod.build_shm_op = build_shm_op


def _quiet(deepspeed) -> None:
    import logging

    if not os.environ.get("AVR_DS_VERBOSE"):
        deepspeed.utils.logger.setLevel(logging.WARNING)


def barrier() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def child_env(env: dict | None = None) -> dict:
    """A copy of the environment for a training SUBPROCESS: without the single-process
    variables `setup()` set here (a child must not reuse this process's MASTER_PORT)."""
    env = dict(os.environ if env is None else env)
    for k, v in _SET_HERE.items():
        if env.get(k) == v:
            env.pop(k)
    return env
