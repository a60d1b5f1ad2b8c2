"""`avr config`: print the resolved, validated config of a preset and overrides."""
from __future__ import annotations

from avr_cli.presets import add_preset_parser, with_params


def add_parser(subparsers) -> None:
    add_preset_parser(subparsers, "config", "print the resolved config")


def run(args) -> int:
    return with_params(args, _print_config)


def _print_config(params) -> int:
    from avr_core.config import to_yaml

    print(to_yaml(params.config()), end="")
    return 0
