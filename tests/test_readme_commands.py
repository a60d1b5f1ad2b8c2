"""Every `avr ...` command in README.md's code blocks still parses: its subcommand and flags through
the CLI's own argparse parser (nothing runs), and its `key=value` overrides through the config
loader, so a renamed flag or config key cannot leave the README behind."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from avr_core.config import CONF_DIR, load_config, parse_overrides

README = Path(__file__).resolve().parent.parent / "README.md"
SEPARATORS = {"&&", "||", ";", "|", "&"}


def readme_commands() -> list[list[str]]:
    """argv of each `avr` / `.venv/bin/avr` command in a fenced block: line continuations joined,
    comments dropped, `a && avr ...` split at the shell's separators, `<key>` placeholders kept as words."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if not re.search(r"(^|[\s/])avr ", line):   # other tools' lines, python snippets
                continue
            line = re.sub(r"<[^<>\s][^<>]*>", "KEY", line)   # placeholders like <key>, not redirections
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.commenters, lexer.whitespace_split = "#", True
            cmd: list[str] = []
            for tok in [*lexer, ";"]:
                if tok not in SEPARATORS:
                    cmd.append(tok)
                    continue
                if cmd and (cmd[0] == "avr" or cmd[0].endswith("/avr")):
                    found.append(cmd[1:])
                cmd = []
    return found


class _Parsed(Exception):
    def __init__(self, args):
        self.args_ns = args


def parse_only(argv: list[str], monkeypatch) -> argparse.Namespace:
    """The Namespace `avr argv` would run with: main() stops right after its parser (nothing runs)."""
    from avr_cli.main import main

    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Parsed) as e:
        main(argv)
    return e.value.args_ns


def test_the_readme_has_avr_commands():
    cmds = readme_commands()
    assert len(cmds) >= 15 and ["run", "--preset", "tiny"] in cmds
    assert any(c[:1] == ["chat"] for c in cmds) and any(c[:1] == ["serve"] for c in cmds)


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_readme_command_parses(argv, monkeypatch):
    args = parse_only(argv, monkeypatch)
    overrides = list(getattr(args, "overrides", None) or [])
    if not overrides:
        return
    if (CONF_DIR / f"{args.preset}.yaml").exists():
        load_config(args.preset, overrides)                 # every key exists, every value is valid
    else:
        parse_overrides(overrides)
