"""The leaderboard: one row per (run, evaluated model), appended by every run, so a nightly
regression shows as a drop between consecutive rows of the same model.

    >>> rows = merge([], [{"run": "r1", "model": "stage1", "stage": "stage1", "R": 1, "n": 4, "win_rate": 50.0,
    ...                    "se": 12.5, "lc": None, "lc_kind": "unavailable", "avg_len": 120.0, "judge": "j",
    ...                    "evalset": "e", "artifact": "eval_metrics/ab", "date": "2026-11-25"}])
    >>> print(to_markdown(rows).splitlines()[2])
    | 2026-11-25 | r1 | 0 | stage1 | stage1 | 1 | 4 | 50.0 ± 12.5 | n/a (unavailable) | 120 | j |

`iteration` is the AvR iteration the model came from (0: the first; README "Iterations"); a
leaderboard written before that column existed reads as iteration 0.
"""
from __future__ import annotations

import csv
import io

COLUMNS = ["date", "run", "iteration", "model", "stage", "R", "n", "win_rate", "se", "lc", "lc_kind", "avg_len",
           "judge", "evalset", "artifact"]


def merge(existing: list[dict], new: list[dict]) -> list[dict]:
    """Append `new`, replacing rows of the same (run, artifact): a rerun of one run never doubles it."""
    keys = {(r["run"], r["artifact"]) for r in new}
    kept = [r for r in existing if (r["run"], r["artifact"]) not in keys]
    return kept + [{c: r.get(c) for c in COLUMNS} for r in new]


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


def append(store, new: list[dict], title: str | None = None) -> str:
    """Add `new` to `<store>/leaderboard/leaderboard.{csv,md}` and return the markdown. A
    read-modify-write, so it holds the store's "leaderboard" lock (`Store.lock`): two runs that
    finish at once both keep their rows, and readers see whole files (atomic writes)."""
    csv_path, md_path = store.path("leaderboard", "leaderboard.csv"), store.path("leaderboard", "leaderboard.md")
    with store.lock("leaderboard"):
        rows = merge(from_csv(store.fs.cat_file(csv_path).decode()) if store.fs.exists(csv_path) else [], new)
        md = to_markdown(rows, title)
        store.write_atomic(csv_path, to_csv(rows).encode())
        store.write_atomic(md_path, md.encode())
    return md
