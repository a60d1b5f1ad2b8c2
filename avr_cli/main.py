"""`avr` -- the parser and the dispatch. Each subcommand is a module of avr_cli with
`add_parser(subparsers)` and `run(args) -> int` (avr_cli/__init__.py lists the commands); this
module only wires them. Each module imports what it needs when it runs, so `avr --help` or a bad
flag answers at once, and the environment below is set before Prefect or an HF library loads."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from avr_cli import artifacts, chat, compare, config, eval as eval_cmd, resume, run, serve, server

# subcommand -> the module that adds its parser and runs it, in the order `avr --help` lists them
COMMANDS = {"run": run, "config": config, "serve": serve, "deploy": serve, "chat": chat, "eval": eval_cmd,
            "resume": resume, "server": server, "artifacts": artifacts, "compare": compare}


def _env_defaults() -> None:
    # No internet on many research clusters: keep Prefect from phoning home. The hub is NOT forced
    # offline here: that is the user's choice (HF_HUB_OFFLINE, or the preset's hub.offline:
    # avr_core/hub.py), so an online machine downloads what the paper preset names.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect waits 20 s for `avr run`'s temporary API server: on a loaded 2-core machine it
    # started later than that and the run failed before its first stage (seen 2026-12-03)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()          # inside the try: a closed pipe shows up at this flush
        return code
    except BrokenPipeError:         # `avr ... | head` stopped reading: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so the exit's own flush is quiet
        return 141                  # 128 + SIGPIPE, what a shell tool reports


def _main(argv: list[str] | None = None) -> int:
    _env_defaults()
    from avr_core.redact import install
    install()   # no key value in any log line from here on
    # alpaca-eval raises the root logger to INFO on import; keep httpx's per-request lines out of a run's log
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="avr", description="AvR: Alignment via Refinement pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)
    for module in dict.fromkeys(COMMANDS.values()):     # serve.py adds `serve` and `deploy`
        module.add_parser(sub)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)   # `avr run` / `avr resume`: the worker's command line
    return COMMANDS[args.cmd].run(args)
