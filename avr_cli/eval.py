"""`avr eval`: the leaderboard every run appends to, read from the store (no server needed), as
markdown (with the smoke banner where its rows are smoke results) or CSV."""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="show the leaderboard every run appends to (no server needed)")
    e.add_argument("--store", default=None, help="artifact store (default: AVR_STORE or ./artifacts)")
    e.add_argument("--model", default=None, help="only this model: seed, rsft, stage1 or stage2 "
                                                 "(default: every model)")
    e.add_argument("--last", type=_non_negative, default=0, help="only the last N rows (default: 0 = all)")
    e.add_argument("--csv", action="store_true", help="print CSV instead of markdown (default: off)")


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def run(args) -> int:
    from avr_core.config import default_store_root
    from avr_core.evaluation import leaderboard as lb
    from avr_core.store import Store

    root = args.store or default_store_root()
    try:
        rows = lb.read(Store(root))
    except ValueError as e:   # a damaged row file or legacy leaderboard.csv: the file, its line/row and field
        print(f"avr: error: {e}", file=sys.stderr)
        return 2
    models = sorted({r["model"] for r in rows})
    if args.model and rows and args.model not in models:
        print(f"avr: error: no rows of model {args.model!r} in {root}; its models: {', '.join(models)}",
              file=sys.stderr)
        return 2
    if args.model:
        rows = [r for r in rows if r["model"] == args.model]
    if args.last:
        rows = rows[-args.last:]
    if not rows:
        print(f"avr: no leaderboard rows in {root} (run `avr run` first)", file=sys.stderr)
        return 1
    banner = None if args.csv else _smoke_banner(root, rows)
    print(lb.to_csv(rows) if args.csv else lb.to_markdown(rows, banner), end="")
    return 0


def _smoke_banner(root: str, rows: list[dict]) -> str | None:
    """leaderboard.md's rule, per row: a row from a run whose config has eval.smoke (tiny) is a smoke
    result. A run whose config.yaml is gone counts as smoke when leaderboard.md carries the banner."""
    from omegaconf import OmegaConf

    from avr_core.store import Store
    from tasks.evaluate import SMOKE_TITLE

    store = Store(root)
    md = store.path("leaderboard", "leaderboard.md")
    md_smoke = store.fs.exists(md) and store.fs.cat_file(md).decode().startswith("SMOKE RUN")

    def smoke(run: str) -> bool:
        path = store.path("runs", run, "config.yaml")
        if not store.fs.exists(path):
            return md_smoke
        return bool(OmegaConf.select(OmegaConf.create(store.fs.cat_file(path).decode()), "eval.smoke"))
    runs = {r["run"]: smoke(r["run"]) for r in rows}
    if not any(runs.values()):
        return None
    if all(runs.values()):
        return SMOKE_TITLE
    return f"{SMOKE_TITLE}\n\nsmoke rows: runs {', '.join(r for r, yes in runs.items() if yes)}"
