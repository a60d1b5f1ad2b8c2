"""The artifact store: one directory per artifact, `manifest.json` written last.

Layout (root is a path or any fsspec URL, e.g. s3://bucket/avr)::

    <root>/<stage>/<key>/manifest.json    the commit: files (logical name -> sha256, bytes, object),
                                          and the sha256 of its own content (manifests.py)
    <root>/<stage>/<key>/data/...         a local store: files in place
    <root>/<stage>/<key>/attempts/<a>/... an object store: each attempt's own files (attempts.py)
    <root>/.locks/...                     locks and leases (leases.py)

An artifact without its manifest does not exist. A long stage commits shards as it goes; a
restarted stage skips committed shards (their marker exists), so a kill loses at most the shard in
flight and never duplicates a record. Nothing is ever pickled into the store. Every read through
the store (`read_records`, `read_file`, `fetch`) is checked against the manifest's digests, and the
manifest against its own.

Concurrency: `Store.lock(ref)` is an exclusive per-artifact lock that a stage holds around
"exists? -> compute -> manifest", so two processes running the same stage with the same config
compute it once: the second waits, then finds the manifest and reuses the artifact. A local store
locks with `flock`; an object store with a fenced lease, and every attempt writes under its own
names, so a holder paused past its lease can neither change a committed artifact nor mix into one
(leases.py, attempts.py, docs/RELIABILITY.md "Object stores").

Object stores: every write is one PUT (visible whole or not at all), listings are never cached
(another machine's writes are seen at once), the server must honour conditional create (checked
once per process), and a model directory a tool opens from a local path is fetched into a local
cache keyed by artifact key and manifest checksum (`Store.fetch`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import fsspec

from avr_core.store import manifests
from avr_core.store.attempts import ATTEMPTS, FORMAT_VERSION, ArtifactWriter, sweep
from avr_core.store.leases import (
    LOCKS,
    ArtifactLockTimeout,
    LeaseLost,
    assert_lease,
    flock,
    held_state,
    lease,
    note_progress,
    worker_id,
)
from avr_core.store.manifests import MANIFEST
from avr_core.store.objects import (
    IntegrityError,
    check_conditional_create,
    checked_bytes,
    file_digest,
    parse_jsonl,
    protocols,
    put_exclusive,
    storage_options,
)

__all__ = ["ATTEMPTS", "FORMAT_VERSION", "LOCKS", "MANIFEST", "ArtifactLockTimeout", "ArtifactRef", "ArtifactWriter",
           "IntegrityError", "LeaseLost", "Store", "artifact_cache_dir", "assert_lease", "cache_key", "fetch_url",
           "file_digest", "held_state", "note_progress", "put_exclusive", "storage_options", "sweep", "worker_id"]
log = logging.getLogger("avr")


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
    """One store root. `lease_s`, `stall_s`: object-store leases (leases.py)."""

    def __init__(self, root: str, lease_s: float | None = None, stall_s: float | None = None):
        """A store by its root alone (the CLI's `--store`); a run's store is `Store.of(cfg)`."""
        self.root = root
        self.fs, self._base = fsspec.core.url_to_fs(root, **storage_options(root))
        self.lease_s = float(lease_s or os.environ.get("AVR_LEASE_S") or 60.0)
        self.stall_s = float(stall_s or 0) or None

    @classmethod
    def of(cls, cfg: dict) -> "Store":
        """THE store of a run's config: `store.root` with the config's lease settings, so every
        reader and writer of one run locks alike.

        >>> Store.of({"store": {"root": "/tmp/avr", "lease_s": 30}}).lease_s
        30.0
        """
        s = cfg["store"]
        return cls(s["root"], lease_s=s.get("lease_s"), stall_s=s.get("stall_s"))

    def _check_server(self) -> None:
        """Before the first lock or write of this process on an object store: does the server honour
        conditional create? (Once per root; reading needs no check.)"""
        if self.remote:
            check_conditional_create(self.fs, self._base)

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
    def lockable(self) -> bool:
        """Only a local (or locally mounted) store can be `flock`ed; see the module docstring."""
        return "file" in protocols(self.fs)

    @property
    def remote(self) -> bool:
        """An object store (s3://, gs://, ...): no flock, no rename, files reach tools through `fetch`."""
        return not self.lockable

    def url(self, *parts: str | ArtifactRef) -> str:
        """`path(...)` with the store's protocol (`s3://bucket/...`): what another process opens."""
        p = self.path(*parts)
        return self.fs.unstrip_protocol(p) if self.remote else p

    # -- reading, checked ----------------------------------------------------------------------
    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(self._p(ref.stage, ref.key, MANIFEST))

    def manifest(self, ref: ArtifactRef) -> dict:
        """The artifact's manifest, checked against its own digest: `IntegrityError` in one line
        naming the file if it is damaged (FileNotFoundError if there is none)."""
        return manifests.parse(self.fs.cat_file(self._p(ref.stage, ref.key, MANIFEST)), self.url(ref, MANIFEST))

    def object_path(self, ref: ArtifactRef, rel: str, manifest: dict | None = None) -> str:
        """Where the file the manifest calls `rel` lives (an attempt's object on an object store)."""
        meta = (manifest or self.manifest(ref))["files"][rel]
        return self.path(ref, meta.get("object", rel))

    def read_file(self, ref: ArtifactRef, rel: str, manifest: dict | None = None) -> bytes:
        """One committed file's bytes, checked against the manifest's sha256 (`IntegrityError`)."""
        m = manifest or self.manifest(ref)
        if rel not in m["files"]:
            raise FileNotFoundError(f"{ref}: no file {rel} in its manifest")
        return checked_bytes(self.fs, self.object_path(ref, rel, m), m["files"][rel], f"{ref}: {rel}")

    def read_records(self, ref: ArtifactRef, name: str = "records") -> list[dict]:
        """All records of one named output, shards in order, every file checked as it is read."""
        if not self.exists(ref):
            raise FileNotFoundError(f"artifact {ref} has no manifest: it does not exist (yet)")
        m = self.manifest(ref)
        out: list[dict] = []
        for rel in m["files"]:
            if rel.startswith(f"data/{name}-") and rel.endswith(".jsonl"):
                out.extend(parse_jsonl(self.read_file(ref, rel, m)))
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
        manifest = manifests.parse(raw, self.url(ref, MANIFEST))
        dest = Path(cache_dir or artifact_cache_dir()) / ref.stage / f"{ref.key}-{hashlib.sha256(raw).hexdigest()[:12]}"
        if dest.is_dir() and _sizes_match(dest, manifest):
            return str(dest)
        tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            for rel, meta in manifest["files"].items():
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self.object_path(ref, rel, manifest), str(local))
                if file_digest(str(local)) != meta["sha256"]:
                    raise IntegrityError(f"{ref}: {rel} does not match its manifest (sha256); "
                                         "the store copy is damaged")
                _fsync(local)
            (tmp / MANIFEST).write_bytes(raw)
            if dest.is_dir():         # a damaged cache entry (sizes differ): replaced whole
                shutil.rmtree(dest, ignore_errors=True)
            try:
                tmp.rename(dest)
            except OSError:       # another process of this machine fetched it meanwhile: theirs is the same
                if not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("fetched %s into %s", ref, dest)
        return str(dest)

    # -- files outside artifacts (work areas): plain transfers ---------------------------------
    def upload(self, local_dir: str, *parts: str | ArtifactRef) -> int:
        """Put every file under `local_dir` at `path(*parts)/<relative path>`, one PUT each
        (each visible whole); returns the number of files. On a local store: a copy. For a work
        area (checkpoints); an artifact's files go through its writer (`ArtifactWriter.upload`)."""
        from pathlib import Path

        n = 0
        for f in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            dst = self.path(*parts, *f.relative_to(local_dir).parts)
            if not self.remote:
                self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(f), dst)
            n += 1
        return n

    # -- writing -------------------------------------------------------------------------------
    def writer(self, stage: str, key: str, config: Any, inputs: list[ArtifactRef], code: str) -> ArtifactWriter:
        self._check_server()
        return ArtifactWriter(self, self.ref(stage, key), config, inputs, code)

    def lock(self, target: "ArtifactRef | str", timeout: float | None = None, logger: logging.Logger | None = None):
        """Exclusive lock on one artifact (or a named shared file) across processes. Waits (logging
        once who it waits for) until the holder finishes or dies; `timeout` seconds (None: forever)
        raises `ArtifactLockTimeout` naming the artifact. Re-entrant within one thread. A local
        store: `flock`; an object store: a fenced lease (leases.py). `logger`: where the waiting is
        said (a Prefect run logger shows it in the UI); default the "avr" logger.

            with store.lock(ref):
                if not store.exists(ref):      # re-check: a process we waited for made it
                    compute_and_finalize()
        """
        what = str(target)
        name = f"{target.stage}.{target.key}" if isinstance(target, ArtifactRef) else str(target)
        if self.remote:
            self._check_server()
            held = lease(self, self._p(LOCKS, name), what, timeout, logger or log, stall_s=self.stall_s)
            return self._swept_after(held, target) if isinstance(target, ArtifactRef) else held
        return flock(self._p(LOCKS, f"{name}.lock"), what, timeout, logger or log)

    @contextlib.contextmanager
    def _swept_after(self, held, ref: ArtifactRef):
        """An artifact's lease that, when released after a commit (or a cache hit), sweeps what a
        stale holder wrote after the committing attempt's own sweep: late garbage never stays past
        the next process that takes the artifact's lock (docs/RELIABILITY.md "Object stores")."""
        with held:
            yield
            if not (held_state(self, ref) or {}).get("lost") and self.exists(ref):
                sweep(self, ref)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write to a temporary name, fsync, then rename: readers see all of it or nothing. On an
        object store one PUT already is all or nothing (and a rename would be a copy)."""
        if self.remote:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _sizes_match(dest, manifest: dict) -> bool:
    """A cache hit is trusted only if every file is there with its manifest size (a power loss, or
    someone editing the cache, shows here; the digests were checked when it was fetched)."""
    for rel, meta in manifest["files"].items():
        p = dest / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return False
    return True


def _fsync(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
