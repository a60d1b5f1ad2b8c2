"""What every stage task shares: the store-backed cache, sharded execution, run records.

The artifact store is the cache (docs/DESIGN.md "Cache key"). Prefect's own task cache is
layered on top through `StoreCache`, which offers Prefect the artifact key ONLY while that
artifact's manifest exists, so a deleted artifact can never come back from a stale Prefect
cache record: the task then runs and finds (or rebuilds) it in the store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.logging import get_run_logger
from prefect.utilities.callables import get_call_parameters
from tqdm.auto import tqdm

from avr_core import backends
from avr_core.codeversion import CodeVersion, code_version, reached_definitions
from avr_core.identity import model_identity
from avr_core.store import ArtifactRef, LeaseLost, Store, cache_key, sweep

log = logging.getLogger("avr")
RETRY_DELAY_S = float(os.environ.get("AVR_RETRY_DELAY_S", "10"))


def policy_identity(policy: dict, backend: dict | None = None) -> dict:
    """What a policy contributes to a cache key: a trained model is identified by its artifact
    key, not by its path, so moving the store does not invalidate everything downstream. A model
    given by name (hub id, local directory, `embedded:`) also carries its `identity`: revision or
    content digest (avr_core/identity.py), so a new snapshot or a re-pointed path is a new key.
    `backend`: the section that loads it; a model on someone else's server (`openai`, a
    `vllm_rm` with a `base_url`) cannot be looked into and is keyed by its name, said so."""
    if "artifact" in policy:
        return {k: v for k, v in policy.items() if k != "path"}
    if served_elsewhere(backend):
        return {**policy, "identity": "served:name-only"}
    return {**policy, "identity": model_identity(policy["path"], policy.get("revision"))}


def scorer_identity(scorer: dict) -> dict:
    """The scorer section for a cache key: its model with `policy_identity` (rules: no model)."""
    if scorer.get("kind") == "rules":
        return scorer
    return {**scorer, "model": policy_identity(scorer["model"], scorer)}


def served_elsewhere(backend: dict | None) -> bool:
    kind = (backend or {}).get("kind")
    return kind == "openai" or (kind == "vllm_rm" and bool(backend.get("base_url")))


def store_of(cfg: dict) -> Store:
    return Store(cfg["store"]["root"], lease_s=cfg["store"].get("lease_s"), stall_s=cfg["store"].get("stall_s"))


def lock_timeout(cfg: dict) -> float | None:
    """`store.lock_timeout_s`: how long a stage waits for another process computing the same
    artifact before it fails naming it (unset or 0: wait as long as that process runs)."""
    return (cfg["store"].get("lock_timeout_s") or None) if "store" in cfg else None


def logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a run (unit tests of helpers)
        return log


@dataclass
class StoreCache(CachePolicy):
    """Prefect cache policy whose key is the stage's artifact key, if the artifact exists."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        r = task_ctx.task.resolve(inputs)
        return f"{r.ref.stage}-{r.ref.key}" if r.store.exists(r.ref) else None


# Every stage call of this process, in order: what the run's wall-time table is made of.
# Flows run their stages one after another in the flow's own process, so a list suffices.
STAGE_LOG: list[dict] = []


@dataclass(frozen=True)
class Spec:
    """One stage call, described ONCE: its cache key hashes exactly this (with the stage's code
    version) and its manifest records exactly this, so key and manifest cannot drift apart.

    stage: the store directory; config: the hashed config section; inputs: the artifacts it
    reads (their keys go into the key); models: trained-model artifacts it loads (verified with
    the inputs before any work; a model is already in `config` through `policy_identity`).

    >>> Spec("critique", {"critique": {"k": 2}}, inputs=(ArtifactRef("/st", "respond", "ab12"),)).stage
    'critique'
    """

    stage: str
    config: Any
    inputs: tuple = ()
    models: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "config", lifetime_free(self.config))


def lifetime_free(config: Any) -> Any:
    """`config` with every `keep_engine` set to false: how long an engine lives (kept from stage
    to stage, or released after each) is not what it computes, so persistence never changes a key,
    and the keys of runs that never kept engines stay what they were.

    >>> lifetime_free({"generator": {"kind": "vllm", "keep_engine": True}, "k": [1]})
    {'generator': {'kind': 'vllm', 'keep_engine': False}, 'k': [1]}
    """
    if isinstance(config, dict):
        return {k: False if k == "keep_engine" else lifetime_free(v) for k, v in config.items()}
    if isinstance(config, list):
        return [lifetime_free(v) for v in config]
    return config


def stage_code(entry: str, cfg: dict, root: str | None = None, body: Callable | None = None) -> CodeVersion:
    """The code version of the stage whose task body is `entry` ("module:function"): every
    definition of this repository it can reach, plus the backend classes its config selects
    when it reaches a backend factory (the factories name their classes only as strings).

    A body outside this repository's packages (a test's fake stage, a benchmark's) is versioned
    by its own source and the skeleton's."""
    from avr_core.backends import REGISTRIES

    try:
        reached = reached_definitions([entry], root)
    except KeyError:
        if body is None:
            raise
        own = hashlib.sha256(inspect.getsource(body).encode()).hexdigest()[:12]
        skeleton = code_version([f"{__name__}:run_stage"], root)
        return CodeVersion(f"{skeleton.version}-{own}", {**skeleton.files, entry: own})
    extra = []
    for factory, section, registry in REGISTRIES:
        kind = (cfg.get(section) or {}).get("kind")
        if factory in reached and kind in registry:
            extra.append(registry[kind])
    return code_version([entry, *extra], root)


@dataclass(frozen=True)
class Resolved:
    """A stage call resolved against the store: its spec, code version and artifact ref."""

    spec: Spec
    code: CodeVersion
    store: Store
    ref: ArtifactRef


class Output:
    """What a stage body writes into: the artifact's writer, plus what goes into its manifest.

    A body commits shards (`shards`, or `commit` for a one-shot stage), writes whole-artifact
    files (`write_file`) and may add manifest fields (`extra`, `counts`); the skeleton
    (`run_stage`) writes the manifest after it returns."""

    def __init__(self, store: Store, ref: ArtifactRef, writer, scale: Any = None, expect: Any = None):
        self.store, self.ref, self.writer = store, ref, writer
        self.scale = scale           # cfg.scale: where shards run (never part of a key; tasks/scale.py)
        self.expect = expect         # what Ray workers must match (tasks/scale.py, Expect)
        self.extra: dict = {}
        self.counts: dict = {}
        self.after: list[Callable[[], None]] = []   # run once the manifest exists (clean-ups)

    @property
    def dir(self) -> str:
        return self.writer.dir

    def write_file(self, relpath: str, data: bytes) -> None:
        self.writer.write_file(relpath, data)

    def upload(self, local_dir: str, relpath: str) -> int:
        """A directory of files (a trained model) into the artifact at `relpath` (one fenced PUT each)."""
        return self.writer.upload(local_dir, relpath)

    def commit(self, outputs: dict[str, list[dict]], counts: dict | None = None, index: int = 0) -> None:
        self.writer.commit_shard(index, outputs, dict(counts or {}))

    def committed_records(self, name: str = "records") -> list[dict]:
        return self.writer.committed_records(name)

    def shards(self, records: Callable[[], list[dict]], shard_size: int,
               work: Callable[[list[dict], int], tuple[dict[str, list[dict]], Counter]],
               stats: Callable[[], dict] | None = None) -> None:
        """Run `work(shard_records, shard_index)` over shards, committing each; skip committed ones.

        The artifact appears (manifest written) only after the last shard: a killed run restarts
        here and redoes at most the shard it was in, never a committed one."""
        rows = records()  # read only on a miss
        shards = [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)] or [[]]
        done = self.writer.committed()
        if done:
            logger().info("%s: resuming, %d of %d shards already committed", self.ref.stage, len(done), len(shards))
        pending = [i for i in range(len(shards)) if i not in done]
        t0 = time.time()

        def commit(i: int, outputs: dict, counts: Counter, backend: dict, worker: str | None = None) -> None:
            counts["input_records"] += len(shards[i])
            # backend counters (tokens generated, failed requests, ...) travel with the shard,
            # so a resumed stage's manifest still adds up over all shards
            counts.update({f"backend_{k}": v for k, v in backend.items()})
            self.writer.commit_shard(i, outputs, dict(counts), worker=worker)

        from tasks.scale import run_on_ray, settings
        scale = settings(self.scale)      # validated: scale.engine is local or ray
        if scale["engine"] == "ray" and len(pending) > 1:   # many workers; the driver commits (tasks/scale.py)
            self.extra["workers"] = run_on_ray(shards, pending, work, stats, scale, commit, logger(), self.expect)
        else:                             # one after another, here (also a single pending shard on ray)
            for i in tqdm(pending, desc=self.ref.stage, unit="shard"):
                before = stats() if stats else {}  # the first call builds the backend: only on a real miss
                outputs, counts = work(shards[i], i)
                after = stats() if stats else {}
                commit(i, outputs, Counter(counts), {k: after[k] - before.get(k, 0) for k in after})
        self.extra.update(compute_s=round(time.time() - t0, 3), shards=len(shards))


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
    if task.publish_fn is not None:     # a stage's own view (a plot), cached or computed
        try:
            task.publish_fn(store, ref)
        except Exception as e:
            logger().warning("%s: could not publish Prefect artifacts: %s", ref, e)
    return ref


COMPUTED: set[str] = set()   # artifacts this process computed (not cache hits): for STAGE_LOG


def _build(task: "StageTask", r: "Resolved", params: dict, body: Callable[..., None]) -> None:
    """Under the lock: a cache hit, or compute the artifact and commit its manifest."""
    store, ref, spec = r.store, r.ref, r.spec
    if store.exists(ref):
        logger().info("%s: cache hit (%s)", ref.stage, ref.path)
        return
    check_inputs(store, ref, [*spec.inputs, *spec.models])   # before any work and before anything is written
    expect = expectation(task, params["cfg"], spec)
    out = Output(store, ref, store.writer(ref.stage, ref.key, spec.config, list(spec.inputs), r.code.version),
                 scale=params["cfg"].get("scale") if hasattr(params["cfg"], "get") else None, expect=expect)
    out.extra["environment"] = expect.driver     # code, torch/transformers/vllm, models: W-4
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
    logger().info("%s: wrote %s rows=%s counts=%s", ref.stage, ref.path, m["rows"], m["counts"])
    try:
        publish_stage(store, ref, m)
    except Exception as e:  # showing a stage must never fail it: the store is the record
        logger().warning("%s: could not publish Prefect artifacts: %s", ref, e)


def expectation(task: "StageTask", cfg: dict, spec: Spec):
    """The driver's `Expect` for this stage call: its code version, package versions and the
    identities of the models it loads by name (computed here, once; workers recompute theirs)."""
    from tasks.scale import Expect, environment

    expect = Expect(task.entry, cfg, task.body, tuple(named_models(spec.config)))
    return dataclasses.replace(expect, driver=environment(expect))


def named_models(config: Any) -> list[tuple[str, str | None]]:
    """(path, revision) of every model in a spec's config keyed by `policy_identity` (not the
    ones on someone else's server: no worker loads those)."""
    if isinstance(config, list):
        return [m for v in config for m in named_models(v)]
    if not hasattr(config, "items"):
        return []
    identity = config.get("identity")
    own = isinstance(identity, str) and not identity.startswith("served:") and "path" in config
    found = [(config["path"], config.get("revision"))] if own else []
    return found + [m for v in config.values() for m in named_models(v)]


def release_engines(out: "Output", keep: bool = True) -> None:
    """End of a stage: record the devices its backends ran on (manifest `device`), then close
    them, so the next stage starts with the accelerator free (`avr_core.backends.release`;
    `keep_engine: true` in a backend's section keeps that one for the next stage). `keep=False`
    (the stage failed) closes kept engines too: one may be dead or owe replies to the failed
    call, and a Prefect retry must not inherit it."""
    from avr_core import backends

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
    publish_fn: Callable[[Store, ArtifactRef], None] | None = None

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


def log_engine_events(stage_name: str, events: list[dict]) -> None:
    """One line per engine start or weight reload of a stage, on its Prefect run: what a run
    pays for engines, and why a start was not a reload (`avr_core.backends.builds`)."""
    for b in events:
        if b.get("event") == "reload":
            logger().info("%s: new weights into the running %s engine in %.1fs (%s)", stage_name, b["role"],
                          b["seconds"], b.get("why") or "woken")
        else:
            logger().info("%s: started a %s %s in %.1fs%s", stage_name, b["kind"], b["role"], b["seconds"],
                          f" (not a reload: {b['why']})" if b.get("why") else "")


def stage(spec_fn: Callable[..., Spec], *, retries: int = 2, timeout_s: float = 6 * 3600,
          publish: Callable[[Store, ArtifactRef], None] | None = None):
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
        t.spec_fn, t.body, t.publish_fn = spec_fn, body, publish
        return t
    return deco


class Lazy:
    """A value (the stage's input records, say) computed on first use, then kept."""

    def __init__(self, build):
        self.build, self.obj = build, None

    def get(self):
        if self.obj is None:
            self.obj = self.build()
        return self.obj


class Backend:
    """A stage's generator or scorer, fetched from its factory on EVERY use, and passed to the
    method's code as the Generator/Scorer itself.

    Why not build it once and keep it: building one backend closes the others that share its
    accelerator (avr_core/backends/__init__.py, `_make_room`). In a stage that alternates policy
    and reward model (search, thought sampling, test-time scaling) a kept reference would be a
    closed engine after the first switch. The factory is a cache lookup: it hands back the live
    backend, or builds it again after a switch. Nothing is built before the first call, so a
    cache hit never loads a model, and no reference is held between calls, so a switch really
    frees the memory. `stats()` sums the counters of every backend this stage was handed.
    """

    def __init__(self, build):
        self.build = build
        self._stats: list = []          # BackendStats of each backend handed out (not the backends)

    def get(self):
        obj = self.build()
        if not any(s is obj.stats for s in self._stats):
            self._stats.append(obj.stats)
        return obj

    def generate(self, conversations, params):
        return self.get().generate(conversations, params)

    def score(self, conversations):
        return self.get().score(conversations)

    def stats(self) -> dict:
        if not self._stats:
            self.get()
        total: dict = {}
        for s in self._stats:
            for k, v in s.as_dict().items():
                total[k] = total.get(k, 0) + v
        return total


def publish(ref: ArtifactRef, key: str, table: list[dict] | None = None, markdown: str | None = None) -> None:
    """Show a stage's result on its Prefect run (UI "Artifacts" tab): a table and/or markdown,
    plus a link to the artifact directory. Never fails the stage: the store is the record."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    from avr_core.redact import redact  # artifacts live in Prefect's database: no secret goes there
    if table is not None:
        table = [{k: redact(v) if isinstance(v, str) else v for k, v in row.items()} for row in table]
    markdown = redact(markdown) if markdown is not None else None
    try:
        if table is not None:
            create_table_artifact(table=table, key=key, description=f"{ref} ({ref.path})")
        if markdown is not None:
            create_markdown_artifact(markdown=markdown, key=f"{key}-report", description=str(ref))
        create_link_artifact(link=ref.path if "://" in ref.path else f"file://{os.path.abspath(ref.path)}",
                             link_text=str(ref), key=f"{key}-dir", description="artifact directory")
    except Exception as e:  # no API reachable: the artifact in the store is what counts
        logger().warning("could not publish Prefect artifact %s: %s", key, e)


class InputIntegrityError(RuntimeError):
    """An input artifact's files no longer match its manifest: the stage refuses to run on it."""


def check_inputs(store: Store, ref: ArtifactRef, inputs: list[ArtifactRef]) -> None:
    """Verify every input artifact's files (size and sha256) against its manifest. A damaged
    input would silently poison everything downstream; refuse, name it, and say how to recover."""
    from avr_core.inspect import verify

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


def publish_plot(ref: ArtifactRef, key: str, png: bytes, table: list[dict], caption: str, text: str = "") -> None:
    """A plot (embedded as a data URI: the UI renders markdown, not local files) and its table."""
    import base64

    img = f"![{caption}](data:image/png;base64,{base64.b64encode(png).decode()})"
    publish(ref, key, table=table, markdown=f"{img}\n\n{text}\n\nstore: `{ref.path}`")


def publish_stage(store: Store, ref: ArtifactRef, manifest: dict) -> None:
    """The stage's Prefect artifacts: counts (inputs, outputs, every filter's drops, parse
    failures, tokens, time), a sample of three records, and a link to its directory."""
    from avr_core.inspect import sample_markdown

    table = [{"count": f"rows:{k}", "value": v} for k, v in manifest["rows"].items()]
    table += [{"count": k, "value": v} for k, v in sorted(manifest["counts"].items())]
    table.append({"count": "compute_s", "value": manifest.get("compute_s")})
    names = sorted(manifest["rows"], key=lambda n: (n != "records", n))
    first = next((f for f in sorted(manifest["files"]) if names and f.startswith(f"data/{names[0]}-")), None)
    recs: list[dict] = []
    if first:   # three records from the first data file: never the whole (possibly huge) artifact
        with store.fs.open(store.object_path(ref, first, manifest), "r", encoding="utf-8") as f:
            recs = [json.loads(line) for _, line in zip(range(3), f)]
    sample = sample_markdown(recs)
    publish(ref, ref.stage.replace("_", "-"), table=table,
            markdown=f"### {ref}\n\n{sample}\n\nstore: `{ref.path}`")
