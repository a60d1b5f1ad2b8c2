"""A manifest checks itself: it carries the sha256 of its own content (`manifest_sha256`).

The files of an artifact are checked against the digests its manifest records; this is what checks
the manifest. A flipped `rows` count or a changed digest in it is caught by every read
(`Store.manifest`) and by `avr artifacts verify`, as is a manifest that no longer parses; each is
one line naming the file. The digest is over the manifest's canonical JSON (sorted keys, no
whitespace) without the digest itself, so it does not depend on how the file is indented.

A manifest written before manifests carried their digest has none: it still reads (its files are
still checked), and `verify` says how many such manifests it read.
"""
from __future__ import annotations

import hashlib
import json

from avr_core.store.objects import IntegrityError

MANIFEST = "manifest.json"
DIGEST = "manifest_sha256"


def seal(manifest: dict) -> bytes:
    """The manifest's bytes, with its digest. Sealed as a reader will parse it back (values that
    JSON cannot hold are written as strings, `default=str`), so reading it back gives the same digest."""
    body = json.loads(json.dumps(manifest, default=str))
    body.pop(DIGEST, None)
    body[DIGEST] = _digest(body)
    return json.dumps(body, indent=2).encode()


def parse(raw: bytes, where: str) -> dict:
    """The manifest in `raw`, checked: `IntegrityError` in one line naming `where` (its path) when
    it does not parse, is not a manifest, or does not match its own digest."""
    fix = "the manifest is damaged: restore it, or delete it to have the artifact computed again"
    try:
        m = json.loads(raw)
    except UnicodeDecodeError as e:
        raise IntegrityError(f"{where}: not UTF-8 at byte {e.start}; {fix}") from None
    except ValueError as e:           # JSONDecodeError, or an integer too long to convert
        raise IntegrityError(f"{where}: not valid JSON ({str(e).splitlines()[0]}); {fix}") from None
    except RecursionError:
        raise IntegrityError(f"{where}: not valid JSON (nested too deeply to parse); {fix}") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        raise IntegrityError(f"{where}: not a manifest (no 'files' object); {fix}")
    want = m.get(DIGEST)
    if want is not None and _digest({k: v for k, v in m.items() if k != DIGEST}) != want:
        raise IntegrityError(f"{where}: its content does not match its {DIGEST} (the manifest changed after it "
                             f"was committed); {fix}")
    return m


def sealed(manifest: dict) -> bool:
    """False for a manifest written before manifests carried their digest."""
    return DIGEST in manifest


def _digest(body: dict) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
