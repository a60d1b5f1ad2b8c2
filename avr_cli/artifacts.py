"""`avr artifacts list|show|lineage|verify`: read the store's manifests directly (no server; avr_core/catalog.py)."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    a = subparsers.add_parser("artifacts", help="list / show / lineage / verify artifacts from their manifests")
    a.add_argument("action", choices=["list", "show", "lineage", "verify"])
    a.add_argument("key", nargs="?", help="stage/key or a unique key prefix (show, lineage; optional for verify)")
    a.add_argument("--store", default=None, help="artifact store (default: AVR_STORE or ./artifacts)")
    a.add_argument("--stage", default=None, help="list: only this stage, e.g. po or cot_po (default: all)")


def run(args) -> int:
    import json

    from avr_core import catalog
    from avr_core.config import default_store_root
    from avr_core.store import IntegrityError, Store

    store = Store(args.store or default_store_root())
    try:
        _check_store(store, args.stage)
        ref = catalog.resolve(store, args.key) if args.key else None
        if args.action in ("show", "lineage") and ref is None:
            raise ValueError(f"`avr artifacts {args.action}` needs a KEY")
    except ValueError as e:
        print(f"avr: error: {e}", file=sys.stderr)
        return 2
    if args.action == "list":
        for r in catalog.list_rows(store, args.stage):
            print(f"{r['artifact']:40} {r['created']}  rows={r['rows']}  inputs={r['inputs']}")
    elif args.action == "show":
        try:
            print(json.dumps(store.manifest(ref), indent=2))
        except IntegrityError as e:          # a damaged manifest: its one line, as verify says it
            print(f"avr: error: {e}", file=sys.stderr)
            return 1
    elif args.action == "lineage":
        print("\n".join(catalog.lineage(store, ref)))
    else:
        problems = catalog.verify(store, ref)
        for line in problems:
            print(line)
        n = 1 if ref else len(store.list())
        print(f"verified {n} artifact(s): {'OK' if not problems else f'{len(problems)} problem(s)'}",
              file=sys.stderr)
        return 1 if problems else 0
    return 0


def _check_store(store, stage: str | None) -> None:
    """An empty listing must not hide a wrong --store or --stage: say which, and what exists."""
    if not store.fs.isdir(store.path()):
        raise ValueError(f"no artifact store at {store.root} (--store, or AVR_STORE; default ./artifacts)")
    stages = sorted({r.stage for r in store.list()}) if stage else []
    if stage and stage not in stages:
        raise ValueError(f"no stage {stage!r} in {store.root}; its stages: {', '.join(stages) or 'none yet'}")
