"""Scale-out of a stage's shards over many workers, on Ray (docs/SCALING.md "Many machines").

`Output.shards` (tasks/runtime/output.py) is the one shard loop; with `scale.engine: ray` it hands the
pending shards here. What travels is the RECIPE, not the engine: the stage's `work(shard, i)`
closure (and its `stats`), pickled by Ray (cloudpickle) with its backends still unbuilt (`Backend`),
goes once into each of `scale.workers` Ray actors; each actor builds its engine on its first shard
and reuses it for every later shard of the stage (an actor holds one engine, on one GPU with
`scale.gpus_per_worker: 1`). The driver -- the Prefect task, which holds the artifact's lock --
hands one shard at a time to each idle actor and commits every result as it returns, so each
shard's marker is written exactly once, by one process, and the store is only ever written by the
driver. A worker process that dies mid-shard (OOM, kill -9, a lost node) is restarted by Ray and
the shard it was computing is retried there (`scale.retries` times): it is redone, never lost, and
never committed twice. Ray is not part of any key: which worker computes a shard changes the
manifest's `shard_workers`, never a record.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from avr_core.identity import IdentityError, model_identity, package_versions
from avr_core.store import worker_id
from tasks.runtime.keys import stage_code

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {"engine": "local", "workers": 2, "address": "", "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
            "retries": 1, "max_restarts": 4}


def settings(scale) -> dict:
    """`cfg.scale` with defaults (a plain dict; a missing section is the sequential local run)."""
    if scale is None:
        scale = {}
    if hasattr(scale, "items"):
        try:
            from omegaconf import OmegaConf
            scale = OmegaConf.to_container(scale, resolve=True) if not isinstance(scale, dict) else scale
        except Exception:
            scale = dict(scale)
    s = {**DEFAULTS, **{k: v for k, v in scale.items() if v is not None}}
    if s["engine"] not in ("local", "ray"):
        raise ValueError(f"scale.engine={s['engine']!r}: must be local or ray")
    return s


def ensure_ray(s: dict):
    """Connect to the cluster at `scale.address` (`ray start --head` on one node, `ray start
    --address=...` on the others), or start a local one sized for `scale.workers` when empty."""
    import ray

    if not ray.is_initialized():
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        for k in ("AWS_ENDPOINT_URL", "AVR_CACHE_DIR", "HF_HOME", "AVR_DATA_DIR"):
            if os.environ.get(k):
                env[k] = os.environ[k]
        kw = dict(runtime_env={"env_vars": env}, include_dashboard=False, logging_level="WARNING",
                  log_to_driver=True, configure_logging=True)
        if s["address"]:
            ray.init(address=s["address"], **kw)
        else:
            ray.init(num_cpus=max(int(s["workers"] * s["cpus_per_worker"] + 0.999), 1), **kw)
    return ray


class WorkerMismatch(RuntimeError):
    """A worker whose code, packages or model differ from the driver's: it refuses its shards."""


@dataclass(frozen=True)
class Expect:
    """What a stage's shards must be computed with, and how a node computes it for itself.

    `entry`, `cfg` and `body` give the stage's code version (`tasks.runtime.keys.stage_code`, on the
    node's own checkout); `models` are the (path, revision) of every model the stage loads by
    name; `driver` is what `environment(self)` gave on the driver."""

    entry: str
    cfg: Any
    body: Callable | None = None
    models: tuple = ()
    driver: dict = field(default_factory=dict)


def environment(expect: Expect) -> dict:
    """This node's stage code version, torch/transformers/vllm versions and model identities:
    the same function on the driver and in every worker. A model that cannot be resolved here
    gets its error as its value, so the comparison names it."""
    env: dict = {"code": stage_code(expect.entry, expect.cfg, body=expect.body).version, **package_versions()}
    for path, revision in expect.models:
        try:
            env[f"model {path}"] = model_identity(path, revision)
        except IdentityError as e:
            env[f"model {path}"] = f"unresolved: {e}"
    return env


def mismatch(driver: dict, worker: dict, host: str) -> str | None:
    """The refusal line for the first field where `worker` differs from `driver`, or None.

    >>> mismatch({"code": "a1", "torch": "2.6"}, {"code": "a1", "torch": "2.5"}, "node-2:71")
    "worker node-2:71 refuses its shard: torch is '2.5' there, '2.6' on the driver"
    >>> mismatch({"code": "a1"}, {"code": "a1"}, "node-2:71") is None
    True
    """
    for k in [*driver, *(k for k in worker if k not in driver)]:
        if driver.get(k) != worker.get(k):
            return f"worker {host} refuses its shard: {k} is {worker.get(k)!r} there, {driver.get(k)!r} on the driver"
    return None


class _Worker:
    """One Ray actor: holds the stage's recipe and, after its first shard, its engine. At start
    (and at every restart, maybe on another node) it computes its own `environment`, and refuses
    every shard while that differs from the driver's: a node on another commit, another vLLM or
    another snapshot of the model would write shards the driver's key does not describe."""

    def __init__(self, recipe, expect: Expect | None = None):
        self.work, self.stats = recipe     # one pickle: `work` and `stats` share their Backend
        self.me = f"{worker_id()}"
        self.env = environment(expect) if expect else {}
        self.refusal = mismatch(expect.driver, self.env, self.me) if expect else None

    def check(self) -> str | None:
        return self.refusal

    def run(self, shard: list[dict], i: int):
        if self.refusal:
            raise WorkerMismatch(self.refusal)
        before = self.stats() if self.stats else {}   # the first call builds the engine, here
        outputs, counts = self.work(shard, i)
        after = self.stats() if self.stats else {}
        return i, outputs, dict(counts), {k: after[k] - before.get(k, 0) for k in after}, self.me

    def who(self) -> str:
        return self.me


def no_gpu_env(gpus_per_worker: float) -> dict | None:
    """An actor that asked Ray for no GPU sees none. Ray no longer hides the GPUs from such an
    actor (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO defaults to off since 2026): each would lay its
    engines over EVERY GPU of its node, and the second actor's engines would fail vLLM's
    free-memory check. GPU work asks for GPUs (`scale.gpus_per_worker`, checked in avr_core/config.py).

    >>> no_gpu_env(0), no_gpu_env(1)
    ({'env_vars': {'CUDA_VISIBLE_DEVICES': ''}}, None)
    """
    return {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}} if not gpus_per_worker else None


def run_on_ray(shards: list[list[dict]], pending: list[int], work: Callable, stats: Callable | None,
               scale: dict, commit: Callable[[int, dict, Counter, dict, str], None], log,
               expect: Expect | None = None) -> dict[str, int]:
    """Compute `pending` shards on `scale.workers` actors, committing each result as it returns
    (`commit(i, outputs, counts, backend_deltas, worker)`). Returns shards per worker.
    With `expect`, no shard is dispatched before every worker matched the driver (`mismatch`)."""
    ray = ensure_ray(scale)
    n = max(1, min(int(scale["workers"]), len(pending)))
    actor_cls = ray.remote(_Worker).options(num_cpus=scale["cpus_per_worker"], num_gpus=scale["gpus_per_worker"],
                                            max_restarts=int(scale["max_restarts"]),
                                            max_task_retries=int(scale["retries"]),
                                            runtime_env=no_gpu_env(scale["gpus_per_worker"]))
    actors = [actor_cls.remote((work, stats), expect) for _ in range(n)]
    log.info("scale-out: %d shards on %d Ray workers (%s)", len(pending), n, scale["address"] or "local cluster")
    todo, inflight, per_worker = list(pending), {}, Counter()
    idle = list(actors)
    t0 = time.time()
    try:
        refuse_mismatched(ray, actors)
        while todo or inflight:
            while todo and idle:
                a, i = idle.pop(), todo.pop(0)
                inflight[a.run.remote(shards[i], i)] = a
            ready, _ = ray.wait(list(inflight), num_returns=1)
            a = inflight.pop(ready[0])
            i, outputs, counts, deltas, who = _get(ray, ready[0])   # a shard whose retries ran out raises here
            commit(i, outputs, Counter(counts), deltas, f"ray:{who}")
            per_worker[f"ray:{who}"] += 1
            idle.append(a)
    finally:
        for a in actors:
            ray.kill(a)
    log.info("scale-out: done in %.1f s, shards per worker %s", time.time() - t0, dict(per_worker))
    return dict(per_worker)


def refuse_mismatched(ray, actors: list) -> None:
    """Raise the first worker's refusal line, before any shard is dispatched."""
    for refusal in ray.get([a.check.remote() for a in actors]):
        if refusal:
            raise WorkerMismatch(refusal)


def _get(ray, ref):
    """`ray.get`, with a worker's refusal (a restarted actor on another node) as its one line,
    not Ray's wrapped traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), WorkerMismatch):
            raise WorkerMismatch(str(e.cause)) from None
        raise
