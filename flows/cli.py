"""`avr` -- the command line.

    avr run --preset tiny [key=value ...]     the whole pipeline
    avr config --preset paper [key=value ...] print the resolved, validated config
"""
from __future__ import annotations

import argparse
import os
import sys


def _env_defaults() -> None:
    # No internet on many research clusters: keep Prefect from phoning home, and never touch a hub.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    _env_defaults()
    p = argparse.ArgumentParser(prog="avr", description="AvR: Alignment via Refinement pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in [("run", "run the whole pipeline"), ("config", "print the resolved config")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--preset", default="tiny", help="conf/<preset>.yaml or a YAML path")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. critique.k=3")
    args = p.parse_args(argv)

    from avr_core.config import ConfigError, load_config, to_yaml
    from avr_core.inputs import InputError
    try:
        if args.cmd == "config":
            print(to_yaml(load_config(args.preset, args.overrides)), end="")
            return 0
        # fail fast on bad config or prompts, before Prefect starts a server or anything is written
        from omegaconf import OmegaConf
        from tasks.synthesis import validate_prompts
        validate_prompts(OmegaConf.to_container(load_config(args.preset, args.overrides), resolve=True))
        from flows.pipeline import pipeline
        pipeline(preset=args.preset, overrides=list(args.overrides))
        return 0
    except (ConfigError, InputError) as e:
        print(f"avr: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
