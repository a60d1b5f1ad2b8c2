"""What a stage body writes into (`Output`: its shards, files and manifest fields) and how it
reaches its generator and scorer (`Backend`, `Lazy`): the objects a stage declaration handles."""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from tqdm.auto import tqdm

from avr_core.store import ArtifactRef, Store
from tasks.runtime.ledger import logger
from tasks.runtime.progress import StageProgress
from tasks.runtime.ray_workers import run_on_ray, settings


class Output:
    """What a stage body writes into: the artifact's writer, plus what goes into its manifest.

    A body commits shards (`shards`, or `commit` for a one-shot stage), writes whole-artifact
    files (`write_file`) and may add manifest fields (`extra`, `counts`); the skeleton
    (`run_stage`) writes the manifest after it returns."""

    def __init__(self, store: Store, ref: ArtifactRef, writer, scale: Any = None, expect: Any = None):
        self.store, self.ref, self.writer = store, ref, writer
        self.scale = scale           # cfg.scale: where shards run (never part of a key; tasks/runtime/ray_workers.py)
        self.expect = expect         # what Ray workers must match (tasks/runtime/ray_workers.py, Expect)
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

    def progress(self, total: int, unit: str, done: int = 0) -> StageProgress:
        """This stage's progress artifact (`tasks/runtime/progress.py`): `.update(done)` as units complete."""
        return StageProgress(self.ref.stage, self.ref.key, total, unit, done)

    def progress_hook(self, unit: str) -> Callable[[int, int], None]:
        """`hook(done, total)` for work whose size the method learns as it goes (batches it plans)."""
        made: list[StageProgress] = []

        def hook(done: int, total: int) -> None:
            if not made:
                made.append(self.progress(total, unit, done))
            made[0].total = max(1, total)
            made[0].update(done)
        return hook

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
        progress = self.progress(len(shards), "shards", done=len(done))

        committed: list[int] = []

        def commit(i: int, outputs: dict, counts: Counter, backend: dict, worker: str | None = None) -> None:
            counts["input_records"] += len(shards[i])
            # backend counters (tokens generated, failed requests, ...) travel with the shard,
            # so a resumed stage's manifest still adds up over all shards
            counts.update({f"backend_{k}": v for k, v in backend.items()})
            self.writer.commit_shard(i, outputs, dict(counts), worker=worker)
            committed.append(i)
            progress.update(len(done) + len(committed))

        scale = settings(self.scale)      # validated: scale.engine is local or ray
        if scale["engine"] == "ray" and len(pending) > 1:   # Ray workers; the driver commits (ray_workers.py)
            self.extra["workers"] = run_on_ray(shards, pending, work, stats, scale, commit, logger(), self.expect)
        else:                             # one after another, here (also a single pending shard on ray)
            for i in tqdm(pending, desc=self.ref.stage, unit="shard", disable=None):   # no bar in a log file
                before = stats() if stats else {}  # the first call builds the backend: only on a real miss
                outputs, counts = work(shards[i], i)
                after = stats() if stats else {}
                commit(i, outputs, Counter(counts), {k: after[k] - before.get(k, 0) for k in after})
        self.extra.update(compute_s=round(time.time() - t0, 3), shards=len(shards))


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

