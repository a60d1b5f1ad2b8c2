"""Building one artifact: `ArtifactWriter`, one ATTEMPT at it.

On an object store every attempt writes under names no other attempt uses::

    <artifact>/attempts/<attempt>/data/records-00000.jsonl   a shard's records
    <artifact>/attempts/<attempt>/shards/00000.json          its marker: counts, rows, files + digests
    <artifact>/attempts/<attempt>/model/...                  write_file / upload
    <artifact>/manifest.json                                 the commit: names ONE attempt's files

so a stale holder (paused past its lease, then resumed) can never overwrite or mix into what another
attempt wrote or committed: its files are garbage under its own name, and its commit fails. A
restarted attempt resumes: it adopts the shards earlier attempts committed (their markers, read once
when it starts) by copying them under its own name (a server-side copy on S3) and hashing the copy
against the marker, so the manifest names exactly one attempt's files, every one with the digest
recorded when it was written and checked before it is committed; a shard whose data no longer
matches its marker is not adopted but computed again. After a commit the other attempts' files are
swept (`sweep`), unfinished multipart uploads included.

On a local store the kernel's `flock` makes one writer at a time a certainty, so files go in place
(`<artifact>/data/...`, `<artifact>/shards/...`), where tools read them directly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
import uuid
from pathlib import Path
from typing import Any

from avr_core.store import manifests
from avr_core.store.leases import LeaseLost, assert_lease, commit, note_progress
from avr_core.store.manifests import MANIFEST
from avr_core.store.objects import (
    IntegrityError,
    abort_uploads,
    checked_bytes,
    digest,
    file_digest,
    files_under,
    jsonl,
    local_file_meta,
    parse_jsonl,
    remove_tree,
)

FORMAT_VERSION = 2    # part of every cache key; 2: code versions by definition, not by file (issue 33)
ATTEMPTS = "attempts"
log = logging.getLogger("avr")


class ArtifactWriter:
    """Builds one artifact. Usage in a task::

        w = store.writer("critique", key, cfg_section, inputs=[answers], code=version)
        for i, shard in enumerate(shards):
            if i in w.committed():
                continue                      # done before a kill: skip, do not redo
            w.commit_shard(i, {"records": new_records}, counts={"dropped_unparsable": 3})
        w.finalize()                          # manifest last
    """

    def __init__(self, store, ref, config: Any, inputs: list, code: str):
        self.store, self.ref, self.config, self.inputs, self.code = store, ref, config, inputs, code
        self.dir = store._p(ref.stage, ref.key)
        self.started = time.time()
        self.attempt = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        # where this attempt's files go: its own prefix on an object store, in place locally
        self.base = f"{self.dir}/{ATTEMPTS}/{self.attempt}" if store.remote else self.dir
        self.files: dict[str, dict] = {}      # logical name -> {sha256, bytes, object}: what this attempt wrote
        self.markers: dict[int, dict] = self._adopt()   # shard index -> marker (adopted or own)

    # -- what earlier attempts left ------------------------------------------------------------
    def _earlier_markers(self) -> dict[int, list[dict]]:
        """Shard markers earlier attempts wrote (a killed run), per shard index, in path order: read
        ONCE, when this attempt starts, under the lock. A marker a stale holder writes later is
        never adopted; one that landed before this listing is (docs/RELIABILITY.md: only a marker,
        never a shard's data, can land after a takeover)."""
        fs = self.store.fs
        where = f"{self.dir}/{ATTEMPTS}" if self.store.remote else f"{self.dir}/shards"
        found: dict[int, list[dict]] = {}
        for p in files_under(fs, where):
            if p.rsplit("/", 2)[-2] != "shards" or not p.endswith(".json"):
                continue
            try:
                m = json.loads(fs.cat_file(p))
            except (FileNotFoundError, ValueError):   # a marker is one PUT; a torn local one is no commit
                continue
            if "files" in m:
                found.setdefault(int(m["index"]), []).append(m)
        return found

    def _adopt(self) -> dict[int, dict]:
        """The earlier shards this attempt keeps: each shard's files made this attempt's (on an
        object store a server-side copy under its own name) and hashed against the marker. A shard
        whose data no longer matches its marker (a flipped bit, a truncated object) is not adopted:
        it is computed again, rather than committed into an artifact that would fail `verify`."""
        adopted: dict[int, dict] = {}
        for index, candidates in sorted(self._earlier_markers().items()):
            for m in candidates:
                files = self._adopt_files(index, m)
                if files is not None:
                    adopted[index] = {**m, "files": files}
                    break
        return adopted

    def _adopt_files(self, index: int, m: dict) -> dict[str, dict] | None:
        """The marker's files as this attempt's (copied and checked), or None if one fails its check
        (then no copy of this shard stays under this attempt's name: the shard is computed again)."""
        files, fs = {}, self.store.fs
        for rel, meta in m["files"].items():
            if self.store.remote:
                assert_lease(self.store, self.ref)
                try:
                    fs.cp_file(f"{self.dir}/{meta['object']}", f"{self.base}/{rel}")   # no glob
                except FileNotFoundError:
                    pass                  # reported by the check below, as missing
                meta = {**meta, "object": self._object(rel)}
            files[rel] = meta
            try:
                checked_bytes(fs, f"{self.dir}/{meta['object']}", meta, f"{self.ref}: {rel}", "marker")
            except IntegrityError as e:
                log.warning("%s (shard %d of attempt %s): not adopted, computed again", e, index, m.get("attempt"))
                for copy in files if self.store.remote else ():
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm_file(f"{self.base}/{copy}")
                return None
        return files

    def committed(self) -> set[int]:
        return set(self.markers)

    # -- writing -------------------------------------------------------------------------------
    def _put(self, rel: str, data: bytes) -> dict:
        """One file of this attempt, fenced: the lease is checked right before the write."""
        assert_lease(self.store, self.ref)
        path = f"{self.base}/{rel}"
        self.store.write_atomic(path, data)
        note_progress(self.store, self.ref)
        return {**digest(data), "object": self._object(rel)}

    def _object(self, rel: str) -> str:
        """A file's object name relative to the artifact (what the manifest's `object` says)."""
        return f"{ATTEMPTS}/{self.attempt}/{rel}" if self.store.remote else rel

    def commit_shard(self, index: int, outputs: dict[str, list[dict]], counts: dict[str, int],
                     worker: str | None = None) -> None:
        """Data files first, then the marker, which records their digests: a shard counts only once
        its marker exists. `worker`: who computed it (scale-out), recorded in the marker and manifest."""
        files = {f"data/{name}-{index:05d}.jsonl": self._put(f"data/{name}-{index:05d}.jsonl", jsonl(records))
                 for name, records in outputs.items()}
        marker = {"index": index, "counts": counts, "rows": {n: len(r) for n, r in outputs.items()},
                  "time": time.time(), "attempt": self.attempt, "files": files,
                  **({"worker": worker} if worker else {})}
        self._put(f"shards/{index:05d}.json", json.dumps(marker).encode())
        self.markers[index] = marker

    def write_file(self, relpath: str, data: bytes) -> None:
        self.files[relpath] = self._put(relpath, data)

    def upload(self, local_dir: str, relpath: str) -> int:
        """Every file under `local_dir` into `relpath/...` of this attempt, one fenced PUT each (each
        visible whole), digests taken locally; returns the number of files. On a local store the
        files must already be in place (training writes into the artifact directly)."""
        n = 0
        for f in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = "/".join([relpath, *f.relative_to(local_dir).parts])
            assert_lease(self.store, self.ref)
            if self.store.remote:
                self.store.fs.put_file(str(f), f"{self.base}/{rel}")
            note_progress(self.store, self.ref)
            self.files[rel] = {**local_file_meta(str(f)), "object": self._object(rel)}
            n += 1
        return n

    # -- reading back what is committed so far -------------------------------------------------
    def committed_records(self, name: str = "records") -> list[dict]:
        """Records of one named output over every committed shard, in shard order, checked."""
        out: list[dict] = []
        for i in sorted(self.markers):
            rel = f"data/{name}-{i:05d}.jsonl"
            meta = self.markers[i]["files"].get(rel)
            if meta is not None:
                path = f"{self.dir}/{meta['object']}"
                out.extend(parse_jsonl(checked_bytes(self.store.fs, path, meta, f"{self.ref}: {rel}", "marker")))
        return out

    def shard_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Summed filter counts and row counts of every committed shard."""
        counts: dict[str, int] = {}
        rows: dict[str, int] = {}
        for m in self.markers.values():
            for k, v in m["counts"].items():
                counts[k] = counts.get(k, 0) + v
            for k, v in m["rows"].items():
                rows[k] = rows.get(k, 0) + v
        return counts, rows

    # -- the commit ----------------------------------------------------------------------------
    def finalize(self, extra: dict | None = None, counts: dict | None = None):
        """Write the manifest, last, with its own digest (manifests.py): on an object store a
        conditional create naming only this attempt's files, fenced by the lease's generation
        (`leases.commit`): a holder whose lease was taken over, or that finds another manifest
        committed, fails with `LeaseLost`."""
        assert_lease(self.store, self.ref)
        shard_counts, rows = self.shard_counts()
        files = {**self._shard_files(), **self.files}
        if not self.store.remote:
            self._drop_leftovers()
            files.update(self._unrecorded_local_files(files))
        workers = {f"{i:05d}": m["worker"] for i, m in sorted(self.markers.items()) if m.get("worker")}
        manifest = {
            "stage": self.ref.stage, "key": self.ref.key, "format": FORMAT_VERSION,
            "inputs": [str(r) for r in self.inputs], "config": self.config, "code_version": self.code,
            "rows": rows, "counts": {**shard_counts, **(counts or {})}, "files": dict(sorted(files.items())),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_s": round(time.time() - self.started, 3), "host": platform.node(), "attempt": self.attempt,
            # scale-out: which worker computed which shard (shard index -> worker), none when sequential
            **({"shard_workers": workers} if workers else {}),
            **(extra or {}),
        }
        data = manifests.seal(manifest)
        path = f"{self.dir}/{MANIFEST}"
        if not self.store.remote:
            self.store.write_atomic(path, data)   # under the flock: the one writer
            return self.ref
        if not commit(self.store, self.ref, path, data):
            sweep(self.store, self.ref, only=self.attempt)   # our files are garbage now
            raise LeaseLost(f"{self.ref}: another attempt committed this artifact first; its manifest stands "
                            "and this attempt's files were removed")
        sweep(self.store, self.ref)
        return self.ref

    def _shard_files(self) -> dict[str, dict]:
        """Every committed shard's files, all this attempt's (adopted ones were copied under its name
        when it started), so the manifest names one attempt."""
        return {rel: meta for _, m in sorted(self.markers.items()) for rel, meta in m["files"].items()}

    def _unrecorded_local_files(self, recorded: dict) -> dict[str, dict]:
        """Local store: files a tool wrote into the artifact directory itself (a trained model, the
        judge's config), hashed here. Never shard markers, leftovers or a data file whose marker
        never landed."""
        fs, out = self.store.fs, {}
        for p in sorted(fs.find(self.dir)):
            rel = p[len(self.dir.rstrip("/")) + 1:]
            if rel in recorded or rel == MANIFEST or rel.startswith("shards/") or rel.startswith("data/") \
                    or any(_leftover(n) for n in rel.split("/")):
                continue
            out[rel] = {"sha256": file_digest(p, fs), "bytes": fs.size(p), "object": rel}
        return out

    def _drop_leftovers(self) -> None:
        """Remove what a writer killed mid-write left in this artifact: `*.tmp-*` files
        (write_atomic) and `.model.tmp-*` / `.model.old-*` directories (training's export_hf).
        They are no part of the artifact, and a killed export's is a whole model copy."""
        fs = self.store.fs
        for p in sorted(fs.find(self.dir, withdirs=True)):
            if _leftover(p.rsplit("/", 1)[-1]) and fs.exists(p):
                fs.rm(p, recursive=True)


def sweep(store, ref, only: str | None = None) -> int:
    """Remove attempts the manifest does not name (or just attempt `only`): a stale holder's or a
    killed attempt's files, and their unfinished multipart uploads (a killed model upload, which no
    listing of files shows). Returns how many attempts had files removed. Never fails the caller,
    and never sweeps on the word of a manifest that fails its own check."""
    fs, base = store.fs, f"{store._p(ref.stage, ref.key)}/{ATTEMPTS}"
    path = f"{store._p(ref.stage, ref.key)}/{MANIFEST}"
    try:
        keep = None if only else manifests.parse(fs.cat_file(path), path).get("attempt")
    except (FileNotFoundError, IntegrityError):   # nothing committed (a live attempt may write), or damaged
        return 0
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
    except FileNotFoundError:                     # no attempt has a file; one may have an unfinished upload
        names = []

    def gone_attempt(a: str) -> bool:
        return (a == only) if only else (a != keep)
    gone = 0
    for a in names:
        if gone_attempt(a):
            try:
                remove_tree(fs, f"{base}/{a}")
                gone += 1
            except Exception as e:  # noqa: BLE001  garbage left for the next sweep
                log.warning("%s: could not remove attempt %s (%s)", ref, a, e)
    try:    # an attempt whose only trace is an unfinished upload has no file for `ls` to list
        abort_uploads(fs, base, keep=lambda p: not gone_attempt(p[len(base.rstrip("/")) + 1:].split("/", 1)[0]))
    except Exception as e:  # noqa: BLE001
        log.warning("%s: could not abort unfinished uploads (%s)", ref, e)
    return gone


def _leftover(name: str) -> bool:
    """A name that write_atomic or export_hf gives a file or directory only until its rename."""
    return ".tmp-" in name or (name.startswith(".") and ".old-" in name)
