"""The leaderboard: one row per (run, evaluated model), appended by every run, so a nightly
regression shows as a drop between consecutive rows of the same model.

    >>> rows = merge([], [{"run": "r1", "model": "stage1", "stage": "stage1", "R": 1, "n": 4, "win_rate": 50.0,
    ...                    "se": 12.5, "lc": None, "lc_kind": "unavailable", "avg_len": 120.0, "judge": "j",
    ...                    "evalset": "e", "artifact": "eval_metrics/ab", "date": "2026-11-25"}])
    >>> print(to_markdown(rows).splitlines()[2])
    | 2026-11-25 | r1 | stage1 | stage1 | 1 | 4 | 50.0 ± 12.5 | n/a (unavailable) | 120 | j |
"""
from __future__ import annotations

import csv
import io

COLUMNS = ["date", "run", "model", "stage", "R", "n", "win_rate", "se", "lc", "lc_kind", "avg_len", "judge",
           "evalset", "artifact"]


def merge(existing: list[dict], new: list[dict]) -> list[dict]:
    """Append `new`, replacing rows of the same (run, artifact): a rerun of one run never doubles it."""
    keys = {(r["run"], r["artifact"]) for r in new}
    return [r for r in existing if (r["run"], r["artifact"]) not in keys] + [{c: r.get(c) for c in COLUMNS} for r in new]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def from_csv(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    for r in rows:
        for k in ("win_rate", "se", "lc", "avg_len"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
        for k in ("R", "n"):
            r[k] = int(r[k]) if r.get(k) not in (None, "") else None
    return rows


def _num(x, fmt="{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def to_markdown(rows: list[dict], title: str | None = None) -> str:
    """Model, stage, R, n, WR ± se, LC (its kind when not the official one), average length."""
    head = "| date | run | model | stage | R | n | WR ± se | LC | avg len | judge |\n|---|---|---|---|---|---|---|---|---|---|\n"
    body = ""
    for r in rows:
        lc = _num(r["lc"]) if r["lc_kind"] == "official" else f"{_num(r['lc'])} ({r['lc_kind']})"
        body += (f"| {r['date']} | {r['run']} | {r['model']} | {r['stage']} | {r['R']} | {r['n']} | "
                 f"{_num(r['win_rate'])} ± {_num(r['se'])} | {lc} | {_num(r['avg_len'], '{:.0f}')} | {r['judge']} |\n")
    return (f"{title}\n\n" if title else "") + head + body
