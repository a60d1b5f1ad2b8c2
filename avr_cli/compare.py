"""`avr compare [RUN_A] RUN_B`: two runs stage by stage (avr_core/compare.py); RUN_B alone: against
the previous run of its deployment."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    cp = subparsers.add_parser("compare", help="compare two runs: per stage computed/cached, counts, metrics, "
                                               "leaderboard")
    cp.add_argument("runs", nargs="+", metavar="RUN", help="RUN_A RUN_B (ids or unique prefixes), or RUN_B alone: "
                                                           "against the previous run of its deployment")
    cp.add_argument("--store", default=None, help="artifact store (default: AVR_STORE or ./artifacts)")


def run(args) -> int:
    from avr_core import compare
    from avr_core.config import default_store_root
    from avr_core.store import Store

    store = Store(args.store or default_store_root())
    if len(args.runs) > 2:
        print("avr: error: `avr compare` takes RUN_A RUN_B, or RUN_B alone", file=sys.stderr)
        return 2
    try:
        ids = [compare.resolve_run(store, r) for r in args.runs]
        if len(ids) == 1:
            prev = compare.previous_run(store, compare.load_run(store, ids[0]))
            if prev is None:
                raise ValueError(f"run {ids[0]} has no earlier run of the same deployment in {store.root}")
            ids.insert(0, prev)
    except ValueError as e:
        print(f"avr: error: {e}", file=sys.stderr)
        return 2
    print(compare.to_markdown(compare.compare(store, ids[0], ids[1])), end="")
    return 0
