"""Is an object store there before a run starts? `probe(root)` writes and deletes one small object
under the root within a few seconds, and returns one line naming the store and the cause when it
cannot (an endpoint that does not answer, refused credentials, a missing bucket, no network), instead
of a stage failing a minute later after SDK retries and tracebacks. A local root is checked by
run_records/preflight.py (a writable directory): this is for URLs."""
from __future__ import annotations

import threading
import uuid

import fsspec

from avr_core.store.objects import storage_options

PROBE_S = 10.0


def probe(root: str, timeout_s: float = PROBE_S) -> str | None:
    """None when a put and a delete under `root` worked, else "store <root>: <cause>"."""
    outcome: list = []

    def attempt() -> None:
        try:
            fs, base = fsspec.core.url_to_fs(root, **_quick(root))
            path = f"{base.rstrip('/')}/.probe-{uuid.uuid4().hex}"
            fs.pipe_file(path, b"")
            fs.rm_file(path)
            outcome.append(None)
        except BaseException as e:               # what failed, in its own words, on one line
            outcome.append(_cause(e))

    t = threading.Thread(target=attempt, name="store-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    if not outcome:
        return f"store {root}: no answer in {timeout_s:.0f} s (is the endpoint up and reachable?)"
    return None if outcome[0] is None else f"store {root}: {outcome[0]}"


def _quick(root: str) -> dict:
    """The store's own fsspec options, with S3's timeouts short and one attempt: a probe is a question."""
    opts = {**storage_options(root), "skip_instance_cache": True}
    if fsspec.core.split_protocol(root)[0] in ("s3", "s3a"):
        opts["config_kwargs"] = {"connect_timeout": 3, "read_timeout": 5, "retries": {"max_attempts": 1}}
    return opts


def _cause(e: BaseException) -> str:
    """A readable cause: the S3 error code and message when there is one, else the exception's first line.

    >>> _cause(PermissionError("The AWS Access Key Id you provided does not exist in our records.\\nmore"))
    'PermissionError: The AWS Access Key Id you provided does not exist in our records.'
    """
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
