"""The leaderboard: one row per result (a judged artifact: a run and an evaluated model), appended
by the run that computed it, so a nightly regression shows as a drop between consecutive rows of
the same model, and a cached rerun (the same models, answers and judge) adds no row (`merge`).

    >>> rows = merge([], [{"run": "r1", "model": "stage1", "stage": "stage1", "R": 1, "n": 4, "win_rate": 50.0,
    ...                    "se": 12.5, "lc": None, "lc_kind": "unavailable", "avg_len": 120.0, "judge": "j",
    ...                    "evalset": "e", "artifact": "eval_metrics/ab", "date": "2026-11-25"}])
    >>> print(to_markdown(rows).splitlines()[2])
    | 2026-11-25 | r1 | 0 | stage1 | stage1 | 1 | 4 | 50.0 ± 12.5 | n/a (unavailable) | 120 | j |

`iteration` is the AvR iteration the model came from (0: the first; README "Iterations"); a
leaderboard written before that column existed reads as iteration 0.

Storage (append-only; docs/RELIABILITY.md "The leaderboard: append-only")::

    <root>/leaderboard/rows/<UTC time>-<run>-<random>.json   the rows of one `append`: THE TRUTH
    <root>/leaderboard/leaderboard.csv, leaderboard.md       views for people, derived from the rows

Every `append` creates one new object under `rows/` with a conditional create and never
rewrites or deletes one, so no writer -- however stale, paused or slow -- can remove or change
another's rows, and no lock is needed. `read` lists `rows/`, reads every file in name order and
`merge`s them (a later file replaces the earlier rows of the same (run, artifact); a row of an
artifact an earlier file holds for another run is dropped: two racing reruns still show one row). A store from
before `rows/` existed has only `leaderboard.csv`; it is read as it is, and the first `append`
copies it into `rows/` under a name that sorts first (`LEGACY`).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import time
import uuid

from avr_core.store import put_exclusive

DIR, ROWS = "leaderboard", "rows"
LEGACY = "00000000T000000.000000Z-legacy.json"    # the migrated leaderboard.csv: sorts before every row file

COLUMNS = ["date", "run", "iteration", "model", "stage", "R", "n", "win_rate", "se", "lc", "lc_kind", "avg_len",
           "judge", "evalset", "artifact"]


def merge(existing: list[dict], new: list[dict]) -> list[dict]:
    """Append `new`, one row per result (judged artifact): a row of the same run and artifact
    replaces its earlier one (a resumed run never doubles), and a row of an artifact another run
    already recorded is dropped -- a cached rerun reused that run's result, so the row stays the
    one of the run that computed it.

    >>> a = {"run": "r1", "artifact": "eval_judge/ab", "win_rate": 50.0}
    >>> [r["run"] for r in merge(merge([], [a]), [{**a, "run": "r2"}])]
    ['r1']
    """
    owner = {r["artifact"]: r["run"] for r in existing}
    new = [r for r in new if owner.get(r["artifact"], r["run"]) == r["run"]]
    keys = {(r["run"], r["artifact"]) for r in new}
    kept = [r for r in existing if (r["run"], r["artifact"]) not in keys]
    return kept + [{c: r.get(c) for c in COLUMNS} for r in new]


def reused(existing: list[dict], new: list[dict]) -> list[dict]:
    """The rows of `existing` whose result (artifact) another run's `new` rows would repeat."""
    runs = {r["artifact"]: r["run"] for r in new}
    return [r for r in existing if r["artifact"] in runs and runs[r["artifact"]] != r["run"]]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def from_csv(text: str) -> list[dict]:
    """Rows of a leaderboard CSV; a damaged one is a ValueError naming the line and the column."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or []) and c != "iteration"]
    if missing:
        raise ValueError(f"line 1: missing column(s) {', '.join(map(repr, missing))} (not a leaderboard CSV)")
    rows = []
    for r in reader:
        for k, kind in [("win_rate", float), ("se", float), ("lc", float), ("avg_len", float), ("R", int), ("n", int),
                        ("iteration", int)]:
            try:
                r[k] = kind(r[k]) if r.get(k) not in (None, "") else None
            except ValueError:
                raise ValueError(f"line {reader.line_num}: field '{k}': not a number ({r[k]!r})") from None
        r["iteration"] = r.get("iteration") or 0
        rows.append(r)
    return rows


def _num(x, fmt="{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def to_markdown(rows: list[dict], title: str | None = None) -> str:
    """Model, stage, R, n, WR ± se, LC (its kind when not the official one), average length."""
    head = ("| date | run | iteration | model | stage | R | n | WR ± se | LC | avg len | judge |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        lc = _num(r["lc"]) if r["lc_kind"] == "official" else f"{_num(r['lc'])} ({r['lc_kind']})"
        body += (f"| {r['date']} | {r['run']} | {r.get('iteration') or 0} | {r['model']} | {r['stage']} | "
                 f"{r['R']} | {r['n']} | "
                 f"{_num(r['win_rate'])} ± {_num(r['se'])} | {lc} | {_num(r['avg_len'], '{:.0f}')} | {r['judge']} |\n")
    return (f"{title}\n\n" if title else "") + head + body


def _shown(store, *parts: str) -> str:
    """A store path as the user wrote the root (`s3://b/avr/leaderboard/...`), for messages."""
    return "/".join([store.root.rstrip("/"), *parts])


def _row_names(store) -> list[str]:
    """Names of the row files, in name (= creation time) order; temporary files are not rows."""
    try:
        paths = store.fs.ls(store.path(DIR, ROWS), detail=False)
    except FileNotFoundError:
        return []
    return sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in paths)
                  if n.endswith(".json") and not n.startswith("."))


def _row_file(text: str, name: str) -> list[dict]:
    """The rows of one row file; a damaged one is a ValueError of one line naming what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("not a leaderboard row file (expected {\"rows\": [{...}, ...]})")
    for i, r in enumerate(rows, 1):
        for k in ("run", "artifact"):
            if not isinstance(r.get(k), str) or not r[k]:
                raise ValueError(f"row {i}: field '{k}': missing or not a string")
        for k in ("win_rate", "se", "lc", "avg_len", "R", "n", "iteration"):
            if r.get(k) is not None and (isinstance(r[k], bool) or not isinstance(r[k], (int, float))):
                raise ValueError(f"row {i}: field '{k}': not a number ({r[k]!r})")
    return [{**{c: r.get(c) for c in COLUMNS}, "iteration": r.get("iteration") or 0} for r in rows]


def _legacy(store) -> list[dict] | None:
    """The rows of a `leaderboard.csv` written before `rows/` existed (None: there is none)."""
    path = store.path(DIR, "leaderboard.csv")
    if not store.fs.exists(path):
        return None
    try:
        return from_csv(store.fs.cat_file(path).decode())
    except ValueError as e:
        raise ValueError(f"{_shown(store, DIR, 'leaderboard.csv')}: {e}") from None


def read(store) -> list[dict]:
    """Every row, from the row files in name order (`merge`: a rerun's rows replace the earlier
    ones of the same (run, artifact)). A store with no row file yet: its legacy `leaderboard.csv`.
    A damaged row file is a ValueError of one line naming the file. Never reads the views."""
    names = _row_names(store)
    if not names:
        return _legacy(store) or []
    paths = [store.path(DIR, ROWS, n) for n in names]
    blobs = store.fs.cat(paths)      # one dict; on S3 the GETs run concurrently
    rows: list[dict] = []
    for n, p in zip(names, paths):
        try:
            rows = merge(rows, _row_file(blobs[p].decode(), n))
        except ValueError as e:      # UnicodeDecodeError is one too
            raise ValueError(f"{_shown(store, DIR, ROWS, n)}: {e}") from None
    return rows


def _create(store, name: str, data: bytes) -> bool:
    """Create `rows/<name>` only if it does not exist: True if this call created it. On S3 one
    conditional PUT (`put_exclusive`). Locally `put_exclusive` (O_EXCL) would show a reader the
    file before its bytes are in it, so the bytes go to a temporary name first and a hard link,
    which fails if the name exists, publishes them whole."""
    path = store.path(DIR, ROWS, name)
    if store.remote:
        return put_exclusive(store.fs, path, data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:                  # a filesystem without hard links: O_EXCL
        return put_exclusive(store.fs, path, data)
    finally:
        os.unlink(tmp)


def _dump(rows: list[dict]) -> bytes:
    return json.dumps({"rows": rows}, indent=1, default=str).encode()


def _migrate(store) -> None:
    """Copy a legacy `leaderboard.csv` into `rows/` (as `LEGACY`) if no row file exists yet. The
    CSV is read BEFORE `rows/` is listed again: a view is only ever written after some row file
    exists, so a CSV read while `rows/` was still empty is the legacy table, not a view. Of two
    migrating writers exactly one creates `LEGACY` (with the same content)."""
    if _row_names(store):
        return
    legacy = _legacy(store)
    if legacy and not _row_names(store):
        _create(store, LEGACY, _dump(legacy))


def append(store, new: list[dict], title: str | None = None) -> str:
    """Add `new` to the leaderboard as ONE new immutable row file and return the markdown of all
    rows. Append-only: no lock, nothing read-modify-written, so of any number of concurrent,
    stalled or resumed writers every one keeps its rows (module docstring)."""
    if new:
        _migrate(store)
        run = re.sub(r"[^A-Za-z0-9._-]+", "_", str(new[0].get("run") or "run"))[:80]
        data = _dump(merge([], new))
        for _ in range(20):          # a name collision (same microsecond, run and 32 random bits): retry
            t = time.time()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t * 1e6) % 10**6:06d}Z"
            if _create(store, f"{stamp}-{run}-{secrets.token_hex(4)}.json", data):
                break
        else:
            raise RuntimeError(f"{_shown(store, DIR, ROWS)}: could not create a new row file in 20 tries")
    rows = read(store)
    md = to_markdown(rows, title)
    # The views are DERIVED from the rows, for people; code never reads them (`read` does not).
    # Writers are not serialised, so a stale writer (one paused between `read` and here) may
    # write a view without rows added meanwhile; it loses nothing -- the rows are intact -- and
    # the next `append` rewrites both views from all rows.
    store.write_atomic(store.path(DIR, "leaderboard.csv"), to_csv(rows).encode())
    store.write_atomic(store.path(DIR, "leaderboard.md"), md.encode())
    return md
