"""`avr serve` (register the deployments and serve them: the UI's runs, the nightly schedule) and
`avr deploy` (register them on a work pool for workers, docker/compose.yaml). Both need a running
Prefect server; the deployments themselves are flows/deploy.py's."""
from __future__ import annotations

import sys

from avr_cli.presets import add_preset_parser, apply_hub_mode, with_params


def add_parser(subparsers) -> None:
    add_preset_parser(subparsers, "serve", "register the pipeline and stage deployments (UI, nightly cron) "
                                           "and serve them")
    s = add_preset_parser(subparsers, "deploy", "register the deployments on a work pool for workers "
                                                "(docker/compose.yaml)")
    s.add_argument("--pool", default="avr-gpu", help="the work pool the workers pull from (default: %(default)s)")


def run(args) -> int:
    return with_params(args, lambda params: _register(args, params))


def _register(args, params) -> int:
    overrides = params.to_overrides()
    if problem := _no_api_server(args.cmd):
        print(f"avr: error: {problem}", file=sys.stderr)
        return 2
    apply_hub_mode(params)   # the served runs inherit this process's hub mode
    if args.cmd == "serve":
        from flows.deploy import serve
        serve(params.preset, overrides)
        return 0
    from flows.deploy import deploy_to_pool
    ids = deploy_to_pool(params.preset, overrides, args.pool)
    print(f"registered {len(ids)} deployments on work pool {args.pool!r}")
    return 0


def _no_api_server(cmd: str) -> str | None:
    """Why `avr serve` / `avr deploy` must not go on: without PREFECT_API_URL (env or profile), Prefect
    would start a temporary server for them; nothing else sees its deployments, no schedule of it
    ever fires, and it shares ~/.prefect/prefect.db with `avr server`, so its shutdown paused the
    real server's deployments (seen 2026-12-03). Refusing removes that case."""
    from prefect.settings import get_current_settings
    if get_current_settings().api.url:
        return None
    return (f"avr {cmd} needs a running Prefect server, else its deployments land on a temporary one "
            "that nothing sees: start `avr server`, then export PREFECT_API_URL=http://127.0.0.1:4200/api")
