"""The artifact store: one directory per artifact, `manifest.json` written last.

Layout (root is a path or any fsspec URL, e.g. s3://bucket/avr)::

    <root>/<stage>/<key>/data/<name>-00000.jsonl   records, one shard per file
    <root>/<stage>/<key>/shards/00000.json         a shard's commit marker + its counts
    <root>/<stage>/<key>/manifest.json             written LAST, atomically

An artifact without its manifest does not exist. A long stage commits shards as it goes;
a restarted stage skips committed shards (their marker exists), so a kill loses at most the
shard in flight and never duplicates a record. Nothing is ever pickled into the store.

Concurrency: `Store.lock(ref)` is an exclusive per-artifact lock that a stage holds around
"exists? -> compute -> manifest", so two processes running the same stage with the same config
compute it once: the second waits, then finds the manifest and reuses the artifact.

* A local (or locally mounted) store: `flock` on `<root>/.locks/<stage>.<key>.lock`. The kernel
  drops a `flock` when its holder dies, even by SIGKILL, so a killed holder never blocks the
  restart. A lock file holds only who holds it, lives outside every artifact directory, is no
  data, and is removed by its holder on release.
* An object store (s3://, gs://, ...): a LEASE (`_lease`), taken with a conditional create
  (If-None-Match: `fs.open(path, "xb")`) of `<root>/.locks/<stage>.<key>/lease-<gen>.json`. The
  holder renews it from a heartbeat thread every `lease_s / 3`; a waiter that sees no renewal for
  `lease_s` of ITS OWN clock (no clock is compared across machines) takes it over by creating the
  next generation, which exactly one taker can do. A killed holder therefore blocks the others
  for at most `lease_s`. A holder that stalls past its lease (a frozen VM) may be taken over while
  it still runs; then two writers compute the same artifact, and the manifest decides: it is
  committed with a conditional create too, so exactly one of them commits and the other's equal
  shard files are overwritten, never mixed (see docs/RELIABILITY.md "Object stores").

Object stores: every write is one PUT (visible whole or not at all, so no temporary name and
rename), listings are never cached (another machine's writes are seen at once), and a model
directory that a tool must open from a local path is fetched into a local cache keyed by artifact
key and manifest checksum (`Store.fetch`) and uploaded with `Store.upload`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import fsspec

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
LOCKS = ".locks"   # <root>/.locks/: lock files, outside every artifact (dot dirs are not stages)
log = logging.getLogger("avr")


class ArtifactLockTimeout(TimeoutError):
    """Another process held an artifact's lock for longer than the caller agreed to wait."""


@dataclass(frozen=True)
class ArtifactRef:
    """What tasks pass around: a pointer into the store, never the data itself."""

    root: str
    stage: str
    key: str

    @property
    def path(self) -> str:
        return f"{self.root.rstrip('/')}/{self.stage}/{self.key}"

    def __str__(self) -> str:
        return f"{self.stage}/{self.key}"


def cache_key(stage: str, config: Any, inputs: Iterable[str], code_version: str) -> str:
    """hash(stage, resolved stage config, input artifact keys, stage code version).

    >>> k = cache_key("critique", {"k": 2}, ["respond/ab12"], "v1")
    >>> k == cache_key("critique", {"k": 2}, ["respond/ab12"], "v1"), k == cache_key("critique", {"k": 3}, [], "v1")
    (True, False)
    """
    blob = json.dumps({"stage": stage, "config": config, "inputs": sorted(inputs),
                       "code": code_version, "format": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Store:
    def __init__(self, root: str, lease_s: float | None = None):
        self.root = root
        self.fs, self._base = fsspec.core.url_to_fs(root, **storage_options(root))
        self.lease_s = float(lease_s or os.environ.get("AVR_LEASE_S") or 60.0)

    def _p(self, *parts: str) -> str:
        return "/".join([self._base.rstrip("/"), *parts])

    def path(self, *parts: str | ArtifactRef) -> str:
        """A path in the store's filesystem (`store.fs`): an artifact ref stands for its directory.

        >>> s = Store("/tmp/st")
        >>> s.path(s.ref("respond", "ab12"), "data", "records-00000.jsonl"), s.path("leaderboard", "leaderboard.csv")
        ('/tmp/st/respond/ab12/data/records-00000.jsonl', '/tmp/st/leaderboard/leaderboard.csv')
        """
        return self._p(*[q for p in parts for q in ((p.stage, p.key) if isinstance(p, ArtifactRef) else (p,))])

    def ref(self, stage: str, key: str) -> ArtifactRef:
        return ArtifactRef(self.root, stage, key)

    def local_path(self, ref: ArtifactRef) -> str:
        """Filesystem path of an artifact (for `from_pretrained` and friends on a local store)."""
        return self.path(ref)

    @property
    def remote(self) -> bool:
        """An object store (s3://, gs://, ...): no flock, no rename, files reach tools through `fetch`."""
        return not self.lockable

    def url(self, *parts: str | ArtifactRef) -> str:
        """`path(...)` with the store's protocol (`s3://bucket/...`): what another process opens."""
        p = self.path(*parts)
        return self.fs.unstrip_protocol(p) if self.remote else p

    # -- local copies of remote artifacts ------------------------------------------------------
    def fetch(self, ref: ArtifactRef, cache_dir: str | None = None) -> str:
        """A local directory with the artifact's files: on a local store the artifact's own
        directory; on an object store a copy in the local cache (`AVR_CACHE_DIR`, default
        `~/.cache/avr/artifacts`) at `<stage>/<key>-<sha of the manifest>`, downloaded once, every
        file checked against the manifest's sha256, and renamed into place whole (a killed download
        leaves only a `.tmp-` directory, never a half cache entry). HF and vLLM loading and training
        read trained models from here."""
        if not self.remote:
            return self.path(ref)
        import shutil
        from pathlib import Path

        raw = self.fs.cat_file(self.path(ref, MANIFEST))
        manifest = json.loads(raw)
        dest = Path(cache_dir or artifact_cache_dir()) / ref.stage / f"{ref.key}-{hashlib.sha256(raw).hexdigest()[:12]}"
        if dest.is_dir():
            return str(dest)
        tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            for rel, meta in manifest["files"].items():
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self.path(ref, rel), str(local))
                if file_digest(str(local)) != meta["sha256"]:
                    raise OSError(f"{ref}: {rel} does not match its manifest (sha256); the store copy is damaged")
            (tmp / MANIFEST).write_bytes(raw)
            try:
                tmp.rename(dest)
            except OSError:       # another process of this machine fetched it meanwhile: theirs is the same
                if not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("fetched %s into %s", ref, dest)
        return str(dest)

    def upload(self, local_dir: str, *parts: str | ArtifactRef) -> int:
        """Put every file under `local_dir` at `path(*parts)/<relative path>`, one PUT each
        (each visible whole); returns the number of files. On a local store: a copy."""
        from pathlib import Path

        n = 0
        for f in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            dst = self.path(*parts, *f.relative_to(local_dir).parts)
            if not self.remote:
                self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(f), dst)
            n += 1
        return n

    def download(self, local_dir: str, *parts: str | ArtifactRef) -> int:
        """The reverse of `upload`: every file under `path(*parts)` into `local_dir`; 0 if none."""
        from pathlib import Path

        base = self.path(*parts)
        try:
            files = [p for p in self.fs.find(base) if not p.endswith("/")]
        except FileNotFoundError:
            return 0
        for p in files:
            local = Path(local_dir) / p[len(base.rstrip("/")) + 1:]
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(p, str(local))
        return len(files)

    # -- reading --------------------------------------------------------------------------
    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(self._p(ref.stage, ref.key, MANIFEST))

    def manifest(self, ref: ArtifactRef) -> dict:
        with self.fs.open(self._p(ref.stage, ref.key, MANIFEST), "r") as f:
            return json.load(f)

    def read_records(self, ref: ArtifactRef, name: str = "records") -> list[dict]:
        """All records of one named output, shards in order."""
        if not self.exists(ref):
            raise FileNotFoundError(f"artifact {ref} has no manifest: it does not exist (yet)")
        out: list[dict] = []
        for fname in self.manifest(ref)["files"]:
            if fname.startswith(f"data/{name}-") and fname.endswith(".jsonl"):
                out.extend(_read_jsonl(self.fs, self._p(ref.stage, ref.key, fname)))
        return out

    def list(self, stage: str | None = None) -> list[ArtifactRef]:
        stages = [stage] if stage else [p.rsplit("/", 1)[-1] for p in self._ls(self._base)]
        refs = []
        for s in stages:
            for k in self._ls(self._p(s)):
                r = self.ref(s, k.rsplit("/", 1)[-1])
                if self.exists(r):
                    refs.append(r)
        return refs

    def _ls(self, path: str) -> list[str]:
        try:
            return sorted(p for p in self.fs.ls(path, detail=False) if self.fs.isdir(p))
        except FileNotFoundError:
            return []

    # -- writing --------------------------------------------------------------------------
    def writer(self, stage: str, key: str, config: Any, inputs: list[ArtifactRef],
               code: str) -> "ArtifactWriter":
        return ArtifactWriter(self, self.ref(stage, key), config, inputs, code)

    # -- locking --------------------------------------------------------------------------
    @property
    def lockable(self) -> bool:
        """Only a local (or locally mounted) store can be locked; see the module docstring."""
        return "file" in _protocols(self.fs)

    def lock(self, target: "ArtifactRef | str", timeout: float | None = None,
             logger: logging.Logger | None = None) -> "contextlib.AbstractContextManager[None]":
        """Exclusive lock on one artifact (or a named shared file such as "leaderboard") across
        processes. Waits (logging once who it waits for) until the holder finishes or dies;
        `timeout` seconds (None: forever) raises `ArtifactLockTimeout` naming the artifact.
        Re-entrant within one process. A local store: `flock`; an object store: a lease renewed by
        a heartbeat and taken over `lease_s` after its holder stopped renewing it (module docstring).
        `logger`: where the waiting is said (a Prefect run logger shows it in the UI); default the
        "avr" logger.

            with store.lock(ref):
                if not store.exists(ref):      # re-check: a process we waited for made it
                    compute_and_finalize()
        """
        what = str(target)
        name = f"{target.stage}.{target.key}" if isinstance(target, ArtifactRef) else str(target)
        if not self.lockable:
            return _lease(self, self._p(LOCKS, name), what, timeout, logger or log)
        return _flock(self._p(LOCKS, f"{name}.lock"), what, timeout, logger or log)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write to a temporary name, then rename: readers see all of it or nothing. On an object
        store one PUT already is all or nothing (and a rename would be a copy)."""
        if self.remote:
            self.fs.pipe_file(path, data)
            return
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)


class ArtifactWriter:
    """Builds one artifact. Usage in a task::

        w = store.writer("critique", key, cfg_section, inputs=[answers], code=version)
        for i, shard in enumerate(shards):
            if i in w.committed():
                continue                      # done before a kill: skip, do not redo
            w.commit_shard(i, {"records": new_records}, counts={"dropped_unparsable": 3})
        w.finalize()                          # manifest last
    """

    def __init__(self, store: Store, ref: ArtifactRef, config: Any, inputs: list[ArtifactRef], code: str):
        self.store, self.ref, self.config, self.inputs, self.code = store, ref, config, inputs, code
        self.dir = store._p(ref.stage, ref.key)
        self.started = time.time()

    def committed(self) -> set[int]:
        try:
            names = self.store.fs.ls(f"{self.dir}/shards", detail=False)
        except FileNotFoundError:
            return set()
        return {int(n.rsplit("/", 1)[-1][:5]) for n in names if n.endswith(".json")}

    def commit_shard(self, index: int, outputs: dict[str, list[dict]], counts: dict[str, int],
                     worker: str | None = None) -> None:
        """Data files first, then the marker: a shard counts only once its marker exists.
        `worker`: who computed it (scale-out), recorded in the marker and the manifest."""
        assert_lease(self.store, self.ref)
        for name, records in outputs.items():
            self.store.write_atomic(f"{self.dir}/data/{name}-{index:05d}.jsonl", _jsonl(records))
        marker = {"index": index, "counts": counts, "rows": {n: len(r) for n, r in outputs.items()},
                  "time": time.time(), **({"worker": worker} if worker else {})}
        self.store.write_atomic(f"{self.dir}/shards/{index:05d}.json", json.dumps(marker).encode())

    def committed_records(self, name: str = "records") -> list[dict]:
        """Records of one named output over every committed shard, in shard order."""
        out: list[dict] = []
        for i in sorted(self.committed()):
            path = f"{self.dir}/data/{name}-{i:05d}.jsonl"
            if self.store.fs.exists(path):
                out.extend(_read_jsonl(self.store.fs, path))
        return out

    def write_file(self, relpath: str, data: bytes) -> None:
        self.store.write_atomic(f"{self.dir}/{relpath}", data)

    def shard_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Summed filter counts and row counts of every committed shard."""
        counts: dict[str, int] = {}
        rows: dict[str, int] = {}
        self.workers: dict[int, str] = {}
        for i in sorted(self.committed()):
            with self.store.fs.open(f"{self.dir}/shards/{i:05d}.json", "r") as f:
                m = json.load(f)
            if m.get("worker"):
                self.workers[i] = m["worker"]
            for k, v in m["counts"].items():
                counts[k] = counts.get(k, 0) + v
            for k, v in m["rows"].items():
                rows[k] = rows.get(k, 0) + v
        return counts, rows

    def finalize(self, extra: dict | None = None, counts: dict | None = None) -> ArtifactRef:
        """Checksum every file and write the manifest, last and atomically."""
        fs = self.store.fs
        assert_lease(self.store, self.ref)
        shard_counts, rows = self.shard_counts()
        if self.store.lockable:   # an unlocked (remote) store may have a live concurrent writer's
            self._drop_leftovers()  # temporary file: there, leftovers are only left out (below)
        files = {}
        for p in sorted(fs.find(self.dir)):
            rel = p[len(self.dir.rstrip("/")) + 1:]
            if rel == MANIFEST or rel.startswith("shards/") or any(_leftover(n) for n in rel.split("/")):
                continue
            if rel.startswith("data/") and rel.endswith(".jsonl") and not self._is_committed_file(rel):
                continue  # a data file whose shard marker never landed
            files[rel] = {"sha256": file_digest(p, fs), "bytes": fs.size(p)}
        manifest = {
            "stage": self.ref.stage, "key": self.ref.key, "format": FORMAT_VERSION,
            "inputs": [str(r) for r in self.inputs], "config": self.config, "code_version": self.code,
            "rows": rows, "counts": {**shard_counts, **(counts or {})}, "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_s": round(time.time() - self.started, 3), "host": platform.node(),
            # scale-out: which worker computed which shard (shard index -> worker), none when sequential
            **({"shard_workers": {f"{i:05d}": w for i, w in sorted(self.workers.items())}} if self.workers else {}),
            **(extra or {}),
        }
        data = json.dumps(manifest, indent=2, default=str).encode()
        if not self.store.remote:
            self.store.write_atomic(f"{self.dir}/{MANIFEST}", data)   # under the flock: one writer
        elif not put_exclusive(self.store.fs, f"{self.dir}/{MANIFEST}", data):
            log.warning("%s: another writer committed this artifact first; its manifest stands", self.ref)
        return self.ref

    def _drop_leftovers(self) -> None:
        """Remove what a writer killed mid-write left in this artifact: `*.tmp-*` files
        (write_atomic) and `.model.tmp-*` / `.model.old-*` directories (training's export_hf).
        They are no part of the artifact, and a killed export's is a whole model copy."""
        fs = self.store.fs
        for p in sorted(fs.find(self.dir, withdirs=True)):
            if _leftover(p.rsplit("/", 1)[-1]) and fs.exists(p):
                fs.rm(p, recursive=True)

    def _is_committed_file(self, rel: str) -> bool:
        stem = rel.rsplit("-", 1)[-1].split(".")[0]
        return stem.isdigit() and int(stem) in self.committed()


def put_exclusive(fs, path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist: one conditional PUT (If-None-Match: *)
    on S3 (s3fs's exclusive mode), O_EXCL locally. True if this call created it, False if it was
    there: of two writers exactly one gets True."""
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False
    except OSError as e:      # some servers answer 412 Precondition Failed as a generic error
        if "412" in str(e) or "recondition" in str(e):
            return False
        raise


def storage_options(root: str) -> dict:
    """fsspec options for a store root. Object stores: never serve a listing from cache (another
    machine may have written since). S3: the endpoint of an S3-compatible server (MinIO, a test
    server) comes from `AWS_ENDPOINT_URL`, as for every AWS SDK; it is passed explicitly so that
    s3fs's instance cache keeps stores on different endpoints apart. Credentials come from the
    environment (`AWS_ACCESS_KEY_ID`, ... or an instance role), never from the config."""
    proto = fsspec.core.split_protocol(root)[0]
    if proto in (None, "file", "local"):
        return {}
    opts: dict = {"use_listings_cache": False}
    if proto in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL"):
        opts["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return opts


def fetch_url(url: str) -> str:
    """A local path for a URL into an artifact of a remote store (`s3://bucket/avr/po/KEY/model`):
    the artifact (the nearest enclosing directory with a manifest) fetched by `Store.fetch`, plus
    the rest of the path."""
    parts = url.rstrip("/").split("/")
    for n in range(1, 4):                  # <root>/<stage>/<key>/<n trailing parts>
        root, stage, key, rest = "/".join(parts[:-(n + 2)]), parts[-(n + 2)], parts[-(n + 1)], parts[-n:]
        store = Store(root)
        if "://" in root and store.exists(store.ref(stage, key)):
            return os.path.join(store.fetch(store.ref(stage, key)), *rest)
    raise FileNotFoundError(f"{url}: not inside an artifact of a store (no manifest.json above it)")


def artifact_cache_dir() -> str:
    """Where `Store.fetch` keeps local copies of remote artifacts: `AVR_CACHE_DIR`, default
    `~/.cache/avr/artifacts`."""
    return os.environ.get("AVR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "avr", "artifacts")


def worker_id() -> str:
    """Who computed something, for manifests: host and process id (`host:pid`)."""
    return f"{platform.node()}:{os.getpid()}"


def _protocols(fs) -> tuple:
    p = fs.protocol
    return p if isinstance(p, tuple) else (p,)


_HELD: dict[str, list] = {}    # lock path -> [fd, depth]: this process's locks (re-entrancy)
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def _flock(path: str, what: str, timeout: float | None, log: logging.Logger, poll_s: float = 0.1) -> Iterator[None]:
    """`flock(LOCK_EX)` on `path`, polled so a timeout can fail cleanly. The fd is close-on-exec
    (Python's default), so a training subprocess never inherits the lock past its parent."""
    import fcntl

    with _HELD_GUARD:
        if path in _HELD:          # this process already holds it (a nested call): re-enter
            _HELD[path][1] += 1
            held = True
        else:
            held = False
    if held:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[path][1] -= 1
        return
    t0, warned = time.monotonic(), False
    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                warned = _still_waiting(log, what, lambda: _holder(path), f"lock {path}", "", timeout, t0, warned)
                time.sleep(poll_s)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)   # the holder we waited for removed this file on release: lock the current one
    try:
        if warned:
            log.info("%s: lock acquired after %.1f s waiting", what, time.monotonic() - t0)
        os.ftruncate(fd, 0)   # who holds it, for the message of whoever waits next
        os.pwrite(fd, f"pid={os.getpid()} host={platform.node()} since={time.strftime('%H:%M:%S')}".encode(), 0)
        with _HELD_GUARD:
            _HELD[path] = [fd, 1]
        try:
            yield
        finally:
            with _HELD_GUARD:
                del _HELD[path]
            # Remove the file while still holding it, so no lock file outlives a finished stage.
            # Safe: a waiter that then gets the lock on the removed file sees it is no longer
            # the one at `path` (_same_file) and locks the current one instead.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)      # closing the fd releases the flock (and so does the kernel on SIGKILL)


class LeaseLost(RuntimeError):
    """This process's lease on an artifact was taken over (it stopped renewing for longer than
    `lease_s`): it must not write more of that artifact; the taker computes it."""


def assert_lease(store: "Store", ref: ArtifactRef) -> None:
    """Raise `LeaseLost` if this process held `ref`'s lease and lost it (a no-op otherwise)."""
    held = _HELD.get(store._p(LOCKS, f"{ref.stage}.{ref.key}")) if store.remote else None
    if held is not None and held[0].get("lost"):
        raise LeaseLost(f"{ref}: the lease was taken over by {held[0]['lost']} after this process did not renew "
                        f"it for {store.lease_s:g} s; stopping without writing more (the taker computes it)")


def _lease_name(gen: int) -> str:
    return f"lease-{gen:08d}.json"


def _leases(fs, d: str) -> list[int]:
    try:
        names = fs.ls(d, detail=False)
    except FileNotFoundError:
        return []
    return sorted(int(n.rsplit("-", 1)[-1][:8]) for n in names if n.rsplit("/", 1)[-1].startswith("lease-"))


@contextlib.contextmanager
def _lease(store: "Store", d: str, what: str, timeout: float | None, log: logging.Logger,
           poll_s: float = 0.2) -> Iterator[None]:
    """An expiring lock on an object store (see the module docstring). `d` holds generations
    `lease-<gen>.json`; the highest one is the lease. Its holder rewrites it (`seq` + 1) every
    `lease_s / 3`; anyone takes over by creating generation + 1 with a conditional create, when the
    current one is released or has shown no new `seq` for `lease_s` of the taker's monotonic clock."""
    fs, lease_s = store.fs, store.lease_s
    with _HELD_GUARD:
        held = _HELD.get(d)
        if held is not None:
            held[1] += 1
    if held is not None:       # re-entrant within this process
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[d][1] -= 1
        return
    me = f"{worker_id()} since={time.strftime('%H:%M:%S')}"
    t0, warned, seen = time.monotonic(), False, {}    # (gen, seq) -> when this process first saw it
    while True:
        gens = _leases(fs, d)
        top = gens[-1] if gens else -1
        take = top < 0
        if not take:
            try:
                cur = json.loads(fs.cat_file(f"{d}/{_lease_name(top)}"))
            except FileNotFoundError:   # released and cleaned up between the listing and the read
                continue
            if cur.get("released"):
                take = True
            else:
                first = seen.setdefault((top, cur.get("seq")), time.monotonic())
                if time.monotonic() - first >= lease_s:
                    log.warning("%s: lease of %s not renewed for %.0f s: taking it over", what, cur.get("holder"),
                                time.monotonic() - first)
                    take = True
        if take and put_exclusive(fs, f"{d}/{_lease_name(top + 1)}",
                                  json.dumps({"holder": me, "seq": 0, "what": what}).encode()):
            gen = top + 1
            break
        if not take:
            warned = _still_waiting(log, what, lambda c=cur: c.get("holder"), f"lease {d}",
                                    f", taken over after {lease_s:g} s without renewal", timeout, t0, warned)
            time.sleep(poll_s)
    if warned:
        log.info("%s: lease acquired after %.1f s waiting", what, time.monotonic() - t0)
    for g in gens:             # older generations are history: only the highest counts
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{d}/{_lease_name(g)}")
    state: dict = {"gen": gen}
    stop = threading.Event()

    def heartbeat():
        seq = 0
        while not stop.wait(lease_s / 3):
            seq += 1
            try:
                if fs.exists(f"{d}/{_lease_name(gen + 1)}"):
                    taker = json.loads(fs.cat_file(f"{d}/{_lease_name(gen + 1)}")).get("holder")
                    state["lost"] = taker or "another process"
                    log.error("%s: lease lost to %s (not renewed in time); this process stops writing it", what,
                              state["lost"])
                    return
                fs.pipe_file(f"{d}/{_lease_name(gen)}", json.dumps({"holder": me, "seq": seq, "what": what}).encode())
            except Exception as e:   # a blip: the next beat tries again; a long outage loses the lease
                log.warning("%s: lease renewal failed (%s); retrying", what, e)

    beat = threading.Thread(target=heartbeat, name=f"lease:{what}", daemon=True)
    with _HELD_GUARD:
        _HELD[d] = [state, 1]
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with _HELD_GUARD:
            del _HELD[d]
        if not state.get("lost"):   # release: the next generation says so; then drop our own
            with contextlib.suppress(Exception):
                put_exclusive(fs, f"{d}/{_lease_name(gen + 1)}", json.dumps({"released": True, "holder": me}).encode())
                fs.rm_file(f"{d}/{_lease_name(gen)}")


def _still_waiting(log: logging.Logger, what: str, holder, where: str, note: str, timeout: float | None,
                   t0: float, warned: bool) -> bool:
    """One poll of a lock (flock or lease) held by another process: say so once on the caller's
    logger, and give up after `timeout`. `holder()` is read only then, not on every poll.
    Returns True: the caller has now warned."""
    if not warned:
        log.warning("waiting for another process computing %s (%s; %s%s)%s", what, holder(), where, note,
                    f", for at most {timeout:g} s" if timeout else "")
    if timeout is not None and time.monotonic() - t0 >= timeout:
        raise ArtifactLockTimeout(f"{what}: another process ({holder()}) has been computing it for more than "
                                  f"{timeout:g} s ({where}); rerun later, or raise store.lock_timeout_s")
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "holder unknown"
    except OSError:
        return "holder unknown"


def _leftover(name: str) -> bool:
    """A name that write_atomic or export_hf gives a file or directory only until its rename."""
    return ".tmp-" in name or (name.startswith(".") and ".old-" in name)


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _read_jsonl(fs, path: str) -> Iterator[dict]:
    with fs.open(path, "r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def file_digest(path: str, fs=None) -> str:
    """sha256 (hex) of a file's bytes; of a directory: of its files' bytes, in path order. `fs`: an
    fsspec filesystem (default: the local one). The ONE file-hashing helper (manifests, `avr
    artifacts verify`, the prompt/eval-set keys)."""
    fs = fs or fsspec.filesystem("file")
    files = [path] if fs.isfile(path) else sorted(fs.find(path), key=lambda q: q.split("/"))
    h = hashlib.sha256()
    for p in files:
        with fs.open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
