"""Filesystem primitives the store is built on: conditional create, digests, JSONL, fsspec options.

Everything here works on any fsspec filesystem (a local directory, S3, ...) and knows nothing of
artifacts, leases or attempts.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Iterator

import fsspec


class IntegrityError(OSError):
    """A file read from the store does not match the digest its manifest (or marker) recorded."""


def put_exclusive(fs, path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist: one conditional PUT (If-None-Match: *)
    on S3 (s3fs's exclusive mode), O_EXCL locally. True if this call created it, False if someone
    else did: of two writers exactly one gets True.

    "Someone else" is checked by content, because `data` always names its writer (a holder, an
    attempt): after a lost response, s3fs's retry of OUR create sees the object and answers
    FileExistsError, and the object holding exactly our bytes means the create was ours. AWS answers
    409 ConditionalRequestConflict while two conditional writes race: the other one wins."""
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        pass
    except OSError as e:      # 412 Precondition Failed or 409 as a generic error, depending on the server
        if not any(s in str(e) for s in ("412", "recondition", "409", "ConditionalRequestConflict")):
            raise
    try:
        return fs.cat_file(path) == data
    except FileNotFoundError:   # 409: the racing write has not landed yet; it is theirs either way
        return False


_PROBED: set = set()


def check_conditional_create(fs, base: str) -> None:
    """Refuse, in one line, an object store that ignores If-None-Match: there two leases and two
    manifests would both "succeed" (older MinIO, some gateways). Checked once per process and root:
    two conditional creates of one new key must give True, then False."""
    if base in _PROBED:
        return
    probe = f"{base.rstrip('/')}/.locks/probe-{uuid.uuid4().hex}"
    try:
        first, second = put_exclusive(fs, probe, b"1"), put_exclusive(fs, probe, b"2")
    finally:
        try:
            fs.rm_file(probe)
        except Exception:   # noqa: BLE001  (a probe left behind is harmless)
            pass
    if not (first and not second):
        raise RuntimeError(f"{base}: this object store does not honour conditional create (If-None-Match: *); "
                           "leases and manifests would not be exclusive. Use a server that supports it "
                           "(AWS S3, MinIO >= RELEASE.2024-11, moto 5)")
    _PROBED.add(base)


def files_under(fs, base: str) -> list[str]:
    """Every file below `base` (none if it does not exist). Never a glob: a root may contain `[`."""
    try:
        return sorted(p for p in fs.find(base) if not p.endswith("/"))
    except FileNotFoundError:
        return []


def remove_tree(fs, base: str) -> None:
    """Remove every file below `base`, one by one (`fs.rm(recursive=True)` globs its argument), and
    abort the unfinished multipart uploads below it (a killed model upload): their parts are no
    object, so no listing shows them, yet they are stored and billed until aborted."""
    for p in files_under(fs, base):
        try:
            fs.rm_file(p)
        except FileNotFoundError:
            pass
    abort_uploads(fs, base)


def pending_uploads(fs, prefix: str) -> list[dict]:
    """The unfinished multipart uploads whose key starts with `prefix` (a path of `fs`), as
    {"path", "upload_id", "initiated"}; none on a filesystem that has no such thing (local, memory)."""
    if not hasattr(fs, "call_s3"):       # s3fs; other object stores' partial uploads are not handled here
        return []
    bucket, key, _ = fs.split_path(prefix)
    key = key.rstrip("/") + "/" if key else ""    # below `prefix`: never a sibling that starts alike
    out, marks = [], {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **marks)
        out += [{"path": f"{bucket}/{u['Key']}", "upload_id": u["UploadId"], "initiated": str(u.get("Initiated", ""))}
                for u in page.get("Uploads") or []]
        if not page.get("IsTruncated"):
            return out
        marks = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def abort_uploads(fs, prefix: str, keep=lambda path: False) -> int:
    """Abort every unfinished multipart upload below `prefix` except those `keep(path)` names;
    returns how many were aborted."""
    n = 0
    for u in pending_uploads(fs, prefix):
        if keep(u["path"]):
            continue
        bucket, key, _ = fs.split_path(u["path"])
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=u["upload_id"])
        n += 1
    return n


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


def protocols(fs) -> tuple:
    p = fs.protocol
    return p if isinstance(p, tuple) else (p,)


def digest(data: bytes) -> dict:
    """What a manifest records of one file: its sha256 and size."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# What recorded a file's digest -> what a mismatch means. A shard marker's files are not committed
# yet (an attempt in progress, or one a taker adopts): saying "changed after it was committed" of
# them would send the reader looking for a committed artifact that was never damaged.
_RECORDED_BY = {
    "manifest": ("its manifest names", "differs from its manifest (the file changed after it was committed); "
                 "`avr artifacts verify` lists every problem"),
    "marker": ("its shard marker names", "differs from its shard marker (the file changed after its shard was "
               "written, before any commit)"),
}


def checked_bytes(fs, path: str, meta: dict, what: str, recorded_by: str = "manifest") -> bytes:
    """The bytes of `path`, refused with `IntegrityError` (one line naming the file) unless they match
    the digest `meta` recorded when they were written; `recorded_by`: "manifest" (a committed file)
    or "marker" (a shard not committed yet). Hashing while reading is cheap next to the read."""
    names, differs = _RECORDED_BY[recorded_by]
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise IntegrityError(f"{what}: missing from the store ({names} {path}); "
                             "`avr artifacts verify` lists every problem") from None
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise IntegrityError(f"{what}: sha256 {differs}")
    return data


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def parse_jsonl(data: bytes) -> Iterator[dict]:
    for line in data.decode("utf-8").splitlines():
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


def local_file_meta(path: str) -> dict:
    """`digest` of a local file, streamed (a model shard is GBs)."""
    return {"sha256": file_digest(path), "bytes": os.path.getsize(path)}
