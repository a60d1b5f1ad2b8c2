"""`avr` -- the command line. avr_cli/main.py builds the parser and dispatches; each subcommand is
a module here with `add_parser(subparsers)` and `run(args) -> int` (avr_cli/serve.py holds both
`serve` and `deploy`; avr_cli/presets.py what run / config / serve / deploy share).

    avr run --preset tiny [--store-root DIR --iterations N ...] [key=value ...]   the whole pipeline
    avr config --preset paper [key=value ...] print the resolved, validated config
    avr chat --model DIR [--rounds R | --thought] "prompt"   try a trained model
    avr eval [--store PATH] [--model NAME] [--last N]        the leaderboard, read from the store
    avr artifacts list|show KEY|lineage KEY|verify [KEY]     read manifests directly (no server)
    avr compare [RUN_A] RUN_B [--store PATH]                 two runs stage by stage (A: B's previous run)
    avr resume RUN_ID [--store PATH]                         run a failed run again: done stages from cache
    avr server [--host 127.0.0.1] [--port 4200]              a Prefect server + UI, telemetry off
    avr deploy --preset paper --pool avr-gpu [key=value ...] the deployments on a work pool (docker/)
    avr serve --preset tiny [key=value ...]                  deployments for the UI + the nightly schedule

`python -m avr_cli` is `avr`. Importing this package masks secrets in every log record of the
process (avr_core/redact.py), as importing flows/ does.
"""
from avr_core.redact import install as _install_redaction

_install_redaction()
