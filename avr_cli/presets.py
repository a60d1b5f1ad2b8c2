"""What `avr run`, `avr config`, `avr serve` and `avr deploy` share: a preset, `key=value`
overrides and the run form's fields as flags (flows/params.py RunParams), the RunParams made of
them, and the one line (exit status 2) a bad value, config or input ends with."""
from __future__ import annotations

import sys
from typing import Callable

# the form's fields (flows/params.py RunParams) as flags of run / config / serve / deploy
PARAM_FLAGS = ("prompts", "policy", "store_root", "iterations", "iterate_model", "continue_from")


def add_preset_parser(subparsers, name: str, help_: str):
    """The subcommand `name` with --preset, the overrides and the form's flags; returns its parser."""
    s = subparsers.add_parser(name, help=help_)
    s.add_argument("--preset", default="tiny", help=f"a shipped preset ({', '.join(_presets())}) "
                   "or a YAML path (default: %(default)s)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. critique.k=3")
    _param_flags(s)
    return s


def with_params(args, command: Callable) -> int:
    """`command(params)` with the RunParams of the parsed flags; a bad field, config or input, there
    or in what `command` does, is one line on stderr and exit status 2."""
    from pydantic import ValidationError

    from avr_core.config import ConfigError
    from avr_core.inputs import InputError
    from flows.params import RunParams
    try:
        params = RunParams(preset=args.preset, overrides=list(args.overrides),
                           **{f: getattr(args, f) for f in PARAM_FLAGS if getattr(args, f) is not None})
        return command(params)
    except ValidationError as e:
        print(f"avr: error: {validation_message(e)}", file=sys.stderr)
        return 2
    except (ConfigError, InputError) as e:
        print(f"avr: error: {e}", file=sys.stderr)
        return 2


def apply_hub_mode(params) -> None:
    """The run's hub.offline as HF_HUB_OFFLINE, before any HF library is imported (avr_core/hub.py)."""
    from avr_core.hub import apply_mode
    apply_mode(bool(params.config().hub.offline))


def validation_message(e) -> str:
    """One line from a pydantic ValidationError of RunParams: the field and what is wrong."""
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    return msg if msg.startswith("field '") or not err["loc"] else f"field '{err['loc'][0]}': {msg}"


def _presets() -> list[str]:
    from avr_core.config import CONF_DIR
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _param_flags(s) -> None:
    from typing import get_args

    from flows.params import RunParams

    for name in PARAM_FLAGS:
        f = RunParams.model_fields[name]
        kw = {"choices": list(get_args(f.annotation))} if get_args(f.annotation) else {}
        s.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, type=f.annotation if
                       f.annotation is int else str, help=f.description.replace("%", "%%"), **kw)
