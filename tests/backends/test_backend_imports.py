"""Backends import nothing from the method side: every module under avr_core/backends/ is
parsed with `ast` and each import of an `avr_core` module (absolute or relative, at module
level or inside a function) must be a backend module, `avr_core.model_refs` (model paths),
`avr_core.hub` (hub mode, fetching weights) or `avr_core.redact` (secret masking in log lines:
infrastructure, no method)."""
import ast
from pathlib import Path

import pytest

BACKENDS = Path(__file__).resolve().parents[2] / "avr_core" / "backends"
ALLOWED = ("avr_core.backends", "avr_core.model_refs", "avr_core.redact",
           "avr_core.inputs",   # reading a validated prompt file (the rules scorer's constraints): data, no method
           "avr_core.hub")      # the hub mode and fetching a model before an engine starts: infrastructure


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against the package avr_core.backends
                base = ["avr_core", "backends"][:max(0, 2 - (node.level - 1))]
                mod = ".".join(base + ([node.module] if node.module else []))
                out += [(node.lineno, mod)] if node.module else [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module or ""))
                if node.module == "avr_core":          # `from avr_core import prompts`
                    out += [(node.lineno, f"avr_core.{a.name}") for a in node.names]
    return out


def _method_imports(path: Path) -> list[str]:
    bad = []
    for line, mod in _imports(path):
        if mod == "avr_core" or mod.startswith("avr_core."):
            if mod != "avr_core" and not any(mod == a or mod.startswith(a + ".") for a in ALLOWED):
                bad.append(f"{path.name}:{line} imports {mod}")
    return bad


MODULES = sorted(BACKENDS.glob("*.py"))


def test_every_backend_module_is_checked():
    assert {p.name for p in MODULES} >= {"__init__.py", "base.py", "hf.py", "openai_api.py", "vllm_offline.py",
                                         "vllm_server.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_backend_imports_no_method_module(path):
    assert _method_imports(path) == []


def test_the_check_catches_method_imports(tmp_path):
    f = tmp_path / "hf.py"
    f.write_text("from avr_core.prompts import judge_conversation\nimport avr_core.thought\n"
                 "from avr_core import synthesis\nfrom .base import Scorer\nfrom ..selection import select\n"
                 "def f():\n    from avr_core.training.dist import free_port\n")
    assert _method_imports(f) == ["hf.py:1 imports avr_core.prompts", "hf.py:2 imports avr_core.thought",
                                  "hf.py:3 imports avr_core.synthesis", "hf.py:5 imports avr_core.selection",
                                  "hf.py:7 imports avr_core.training.dist"]
