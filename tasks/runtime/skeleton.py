"""THE stage skeleton (`run_stage`) and the Prefect task every stage is (`StageTask`, made by
`@stage`).

The artifact store is the cache (docs/DESIGN.md "Cache key"). Prefect's own task cache is
layered on top through `StoreCache`, which offers Prefect the artifact key ONLY while that
artifact's manifest exists, so a deleted artifact can never come back from a stale Prefect
cache record: the task then runs and finds (or rebuilds) it in the store.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.utilities.callables import get_call_parameters

from avr_core import backends
from avr_core.catalog import verify
from avr_core.codeversion import CodeVersion
from avr_core.store import ArtifactRef, LeaseLost, Store, cache_key, sweep
from tasks.runtime.keys import Spec, named_models, stage_code
from tasks.runtime.ledger import COMPUTED, RUN, STAGE_LOG, STARTED, log_engine_events, logger
from tasks.runtime.output import Output
from tasks.runtime.publish import publish_stage
from tasks.runtime.ray_workers import Expect, environment

RETRY_DELAY_S = float(os.environ.get("AVR_RETRY_DELAY_S", "10"))



store_of = Store.of       # the stages' name for it


def lock_timeout(cfg: dict) -> float | None:
    """`store.lock_timeout_s`: how long a stage waits for another process computing the same
    artifact before it fails naming it (unset or 0: wait as long as that process runs)."""
    return (cfg["store"].get("lock_timeout_s") or None) if "store" in cfg else None


@dataclass
class StoreCache(CachePolicy):
    """Prefect cache policy whose key is the stage's artifact key, if the artifact exists."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        r = task_ctx.task.resolve(inputs)
        return f"{r.ref.stage}-{r.ref.key}" if r.store.exists(r.ref) else None


@dataclass(frozen=True)
class Resolved:
    """A stage call resolved against the store: its spec, code version and artifact ref."""

    spec: Spec
    code: CodeVersion
    store: Store
    ref: ArtifactRef


def run_stage(task: "StageTask", params: dict, body: Callable[..., None]) -> ArtifactRef:
    """THE stage skeleton: lock -> cache check -> input verification -> writer -> body -> manifest
    -> publish. Every stage runs through here.

    The lock (`Store.lock`) is held from the cache check to the manifest: the ONE place that makes
    concurrent runs of any stage (sharded or not, training included) compute an artifact once.
    It is taken inside the task, so a Prefect retry takes a fresh one. On an object store the lease
    can be lost (its holder paused past it): then this attempt stops writing, waits for the taker
    and uses what it committed, and computes again only if nobody did."""
    r = task.resolve(params)
    store, ref = r.store, r.ref
    lost = 0
    while True:
        try:
            with store.lock(ref, timeout=lock_timeout(params["cfg"]), logger=logger()):
                _build(task, r, params, body)
            break
        except LeaseLost as e:
            lost += 1
            if lost == 2:
                raise LeaseLost(f"{ref}: lost the lease twice; stopping (rerun to compute it)") from e
            logger().error("%s; waiting for the process that took it over, to use its artifact", e)
    if lost and store.exists(ref):    # the taker committed: what this attempt wrote is garbage
        sweep(store, ref)
    return ref


def _build(task: "StageTask", r: "Resolved", params: dict, body: Callable[..., None]) -> None:
    """Under the lock: a cache hit, or compute the artifact and commit its manifest."""
    store, ref, spec = r.store, r.ref, r.spec
    if store.exists(ref):
        logger().info("%s: cache hit (%s)", ref.stage, ref.path)
        try:                            # this run's page shows the stage too, marked as a cache hit
            m = store.manifest(ref)
            publish_stage(store, ref, m, cached=True, view=_view(task, store, ref, m))
        except Exception as e:
            logger().warning("%s: could not publish Prefect artifacts: %s", ref, e)
        return
    check_inputs(store, ref, [*spec.inputs, *spec.models])   # before any work and before anything is written
    expect = expectation(task, params["cfg"], spec)
    out = Output(store, ref, store.writer(ref.stage, ref.key, spec.config, list(spec.inputs), r.code.version),
                 scale=params["cfg"].get("scale") if hasattr(params["cfg"], "get") else None, expect=expect)
    out.extra["environment"] = expect.driver     # code, torch/transformers/vllm, models: W-4
    if RUN["id"]:
        out.extra["run"] = RUN["id"]             # which run computed it: a cache hit's page names it
    if RUN.get("on_compute"):
        RUN["on_compute"](ref.stage)
    ok = False
    try:
        body(out, **params)
        ok = True
    finally:
        release_engines(out, keep=ok)     # a failed stage keeps nothing: its retry starts clean
    out.writer.finalize(extra={**out.extra, "code_files": r.code.files}, counts=out.counts or None)
    COMPUTED.add(str(ref))
    for fn in out.after:
        fn()
    m = store.manifest(ref)
    logger().info("%s: wrote %s rows=%s counts=%s", ref.stage, ref.path, m["rows"], readable(m["counts"]))
    try:
        publish_stage(store, ref, m, view=_view(task, store, ref, m))
    except Exception as e:  # showing a stage must never fail it: the store is the record
        logger().warning("%s: could not publish Prefect artifacts: %s", ref, e)


def _view(task: "StageTask", store: Store, ref: ArtifactRef, manifest: dict) -> str:
    """The stage's own view for its report (markdown: a plot), cached or computed; "" if none or
    if drawing it failed (showing a stage never fails it)."""
    if task.view_fn is None:
        return ""
    try:
        return task.view_fn(store, ref, manifest)
    except Exception as e:
        logger().warning("%s: could not draw the stage's view: %s", ref, e)
        return ""


def readable(counts: dict) -> dict:
    """Counts for a log line: floats to 4 significant digits (the manifest keeps them exact).

    >>> readable({"answers": 12, "mean_score": 6.123456789, "share": 0.000123456})
    {'answers': 12, 'mean_score': 6.123, 'share': 0.0001235}
    """
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in counts.items()}


def expectation(task: "StageTask", cfg: dict, spec: Spec):
    """The driver's `Expect` for this stage call: its code version, package versions and the
    identities of the models it loads by name (computed here, once; workers recompute theirs)."""
    expect = Expect(task.entry, cfg, task.body, tuple(named_models(spec.config)))
    return dataclasses.replace(expect, driver=environment(expect))


def release_engines(out: "Output", keep: bool = True) -> None:
    """End of a stage: record the devices its backends ran on (manifest `device`), then close
    them, so the next stage starts with the accelerator free (`avr_core.backends.release`;
    `keep_engine: true` in a backend's section keeps that one for the next stage). `keep=False`
    (the stage failed) closes kept engines too: one may be dead or owe replies to the failed
    call, and a Prefect retry must not inherit it."""
    if used := backends.used():
        out.extra.setdefault("device", used)
    closed = backends.release(keep=keep)
    if not keep:
        logger().warning("%s: stage failed: released every engine, kept ones included (%s), so a retry "
                         "starts clean", out.ref.stage, ", ".join(closed) or "none held")
    elif closed:
        logger().info("%s: released %s", out.ref.stage, ", ".join(closed))


class StageTask(Task):
    """A Prefect task that also logs (stage, key, cached or computed, wall time) per call.
    The wall time includes Prefect's own overhead and the cache lookup, as a user waits it.
    The body holds its artifact's lock (`run_stage`); flows call stages one at a time, so a
    process never holds two."""

    spec_fn: Callable[..., Spec]
    body: Callable[..., None]
    view_fn: Callable[[Store, ArtifactRef, dict], str] | None = None    # markdown for the stage's report

    @property
    def entry(self) -> str:
        return f"{self.body.__module__}:{self.body.__name__}"

    def resolve(self, params: dict) -> Resolved:
        spec = self.spec_fn(**params)
        cfg = params["cfg"]
        code = stage_code(self.entry, cfg, body=self.body)
        store = store_of(cfg)
        key = cache_key(spec.stage, spec.config, [str(i) for i in spec.inputs], code.version)
        return Resolved(spec, code, store, store.ref(spec.stage, key))

    def ref(self, *args, **kwargs) -> ArtifactRef:
        """The artifact this call computes or reuses (nothing is run)."""
        return self.resolve(get_call_parameters(self.fn, args, kwargs)).ref

    def __call__(self, *args, **kwargs):
        if os.environ.get("AVR_FAIL_TASK") == self.name:   # fault injection for resume and chaos tests
            raise RuntimeError(f"injected failure in stage {self.name!r} (AVR_FAIL_TASK)")
        params = get_call_parameters(self.fn, args, kwargs)
        ref = self.resolve(params).ref
        t0 = time.perf_counter()
        built = len(backends.builds())
        COMPUTED.discard(str(ref))
        STARTED.append(self.name)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            events = backends.builds()[built:]      # engines started / models loaded, weights reloaded
            log_engine_events(self.name, events)
            starts = [b for b in events if b.get("event", "start") == "start"]
            reloads = [b for b in events if b.get("event") == "reload"]
            cached = str(ref) not in COMPUTED and store_of(params["cfg"]).exists(ref)
            STAGE_LOG.append({"task": self.name, "artifact": str(ref), "cached": cached,
                              "wall_s": round(time.perf_counter() - t0, 2), "loads": len(starts),
                              "load_s": round(sum(b["seconds"] for b in starts), 2), "reloads": len(reloads),
                              "reload_s": round(sum(b["seconds"] for b in reloads), 2)})


def stage(spec_fn: Callable[..., Spec], *, retries: int = 2, timeout_s: float = 6 * 3600,
          view: Callable[[Store, ArtifactRef, dict], str] | None = None):
    """Make `body(out, cfg, ...)` a stage task called as `task(cfg, ...)`: cached on the key of
    `spec_fn(cfg, ...)`, locked, retried, time-limited; the body only fills `out` (an Output).

        @stage(critique_spec)
        def critique(out: Output, cfg: dict, policy: dict, answers: ArtifactRef) -> None:
            out.shards(lambda: read(answers), cfg["shard_size"], lambda shard, i: ...)
    """
    def deco(body):
        params = list(inspect.signature(body).parameters.values())[1:]
        signature = inspect.Signature(params, return_annotation=ArtifactRef)

        def run(*args, **kwargs) -> ArtifactRef:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return run_stage(t, dict(bound.arguments), body)
        run.__signature__ = signature  # type: ignore[attr-defined]  # what Prefect reads for parameters
        run.__name__, run.__qualname__, run.__doc__ = body.__name__, body.__qualname__, body.__doc__
        run.__module__ = body.__module__
        t = StageTask(run, name=body.__name__, cache_policy=StoreCache(), persist_result=True, retries=retries,
                      retry_delay_seconds=RETRY_DELAY_S, timeout_seconds=timeout_s, task_run_name=body.__name__)
        t.spec_fn, t.body, t.view_fn = spec_fn, body, view
        return t
    return deco


class InputIntegrityError(RuntimeError):
    """An input artifact's files no longer match its manifest: the stage refuses to run on it."""


def check_inputs(store: Store, ref: ArtifactRef, inputs: list[ArtifactRef]) -> None:
    """Verify every input artifact's files (size and sha256) against its manifest. A damaged
    input would silently poison everything downstream; refuse, name it, and say how to recover."""
    problems = [p for i in inputs for p in verify(store, i)]
    if problems:
        raise InputIntegrityError(f"{ref.stage}: refusing to run on damaged input(s): " + "; ".join(problems[:5])
                                  + ". Delete the damaged artifact's manifest.json to have it rebuilt, "
                                  "or restore it (`avr artifacts verify` lists every problem).")


def model_artifacts(cfg: dict, *policies: dict | None) -> list[ArtifactRef]:
    """The trained-model artifacts among `policies` (a policy from the config has none): what a
    stage must also verify before it loads a model, besides its data inputs."""
    store = store_of(cfg)
    return [store.ref(*p["artifact"].split("/", 1)) for p in policies if p and p.get("artifact")]

