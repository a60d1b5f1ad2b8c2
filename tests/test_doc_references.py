"""Every file a text in this repository points to exists in the repository.

Scope: every file `git ls-files` lists (falling back to a walk of the checkout when git is
absent), except data files (.json, .jsonl, .csv, .parquet and other non-UTF-8 files).

What counts as a reference, and when it resolves:

1. A repository path: a token whose first component is a top-level directory of this
   repository (derived from the tracked files: avr_core, tasks, flows, conf, tests, docs,
   ...), e.g. `avr_core/store/leases.py` or `tests/core/`. It resolves if it is a tracked file or a
   directory holding tracked files. A path followed by `::name` (the notation docs/DESIGN.md
   uses) must also define `name` in that Python file (a def, class or assignment).
2. A bare Markdown file name (`README.md`, `RELIABILITY.md`, not preceded by a slash). It
   resolves if that exact name is tracked at the repository root, in docs/, or in the
   directory of the file that mentions it.

Not references, by rule: anything inside a URL (`scheme://...`, `github.com/...`), and paths
whose first component is not one of this repository's top-level directories, such as the
authors' upstream files (`src/...` of Banner-Z/AvR) or store paths (`artifacts/...`,
`<root>/<stage>/...`); a path written right after `authors'` or `Banner-Z/AvR` (then a space
or a colon), as in "the authors' scripts/stage1_generation.sh", which names a file of the
upstream repository even when its first component matches one of ours; and lowercase
Markdown names (`scaling.md`, `timings.md`: files the pipeline writes into the store), since
the bare-name rule checks only capitalised names, the repository's naming for documents.
Placeholders are skipped: a path token that continues with `<`, `*`
or `{` (a template, a glob) is not checked.

Also: docs/DESIGN.md names every stage task, i.e. every function in tasks/*.py decorated with
a function of tasks/runtime/skeleton.py (`@stage(...)`), as `tasks/<file>.py::<function>` (the list is
read from the code, so a new or
renamed stage task fails here until the design page follows).
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".png", ".gguf", ".safetensors", ".bin"}
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+|\b[\w.-]*github\.com/\S*")
UPSTREAM = re.compile(r"(?:authors['\u2019]|Banner-Z/AvR)[ :]`?$")
BARE_MD = re.compile(r"(?<![\w./~-])([A-Z][A-Z0-9_-]*\.md)\b")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
        files = [f for f in out.stdout.decode().split("\0") if f]
        if files:
            return [f for f in files if (ROOT / f).is_file()]
    except (OSError, subprocess.SubprocessError):
        pass
    skip = {".git", ".venv", ".venv-vllm", "__pycache__", "artifacts", "runs"}
    found = []
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
        found += [str(Path(d, n).relative_to(ROOT)) for n in names if not n.endswith(".pyc")]
    return found


def repo_index(files: list[str]) -> tuple[set[str], set[str], list[str]]:
    """(tracked files, directories that hold tracked files, top-level directory names)."""
    dirs = {str(p) for f in files for p in Path(f).parents if str(p) != "."}
    tops = sorted({f.split("/", 1)[0] for f in files if "/" in f and not f.startswith(".")})
    return set(files), dirs, tops


def path_pattern(tops: list[str]) -> re.Pattern:
    """A path whose first component is a top-level directory, optionally ending in `/` (a
    directory) or followed by `::name`."""
    alt = "|".join(map(re.escape, tops))
    return re.compile(rf"(?<![\w./~$-])((?:{alt})/(?:[\w.-]+/)*(?:[\w.-]*\w)?)(::\w+)?")


@lru_cache(maxsize=None)
def defined_names(path: str) -> frozenset[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return frozenset(names)


def dead_references(text: str, source: str, files: set[str], dirs: set[str], tops: list[str]) -> list[str]:
    """'line: reference (why)' for each reference in `text` (the content of `source`) that
    does not resolve under the rules in the module docstring."""
    text = URL.sub(lambda m: " " * len(m.group()), text)        # keep offsets, drop URLs
    line_of = lambda i: text.count("\n", 0, i) + 1               # noqa: E731
    here = str(Path(source).parent)
    bad = []
    for m in path_pattern(tops).finditer(text):
        path, member = m.group(1), m.group(2)
        if not member and text[m.end():m.end() + 1] in ("<", "*", "{"):
            continue                                             # tasks/<file>.py, tests/*.py: templates
        if UPSTREAM.search(text[max(0, m.start() - 20):m.start()]):
            continue                                             # the authors' file, not ours
        if path in files:
            if member and path.endswith(".py") and member[2:] not in defined_names(path):
                bad.append(f"{line_of(m.start())}: {path}{member} ({member[2:]!r} is not defined in {path})")
        elif path.rstrip("/") not in dirs:
            bad.append(f"{line_of(m.start())}: {path} (no such file or directory in the repository)")
    for m in BARE_MD.finditer(text):
        name = m.group(1)
        candidates = [name, f"docs/{name}", name if here == "." else f"{here}/{name}"]
        if not any(c in files for c in candidates):
            bad.append(f"{line_of(m.start())}: {name} (not at the root, in docs/ or beside {source})")
    return bad


def _text_files(files: list[str]) -> dict[str, str]:
    out = {}
    for f in files:
        if Path(f).suffix.lower() in DATA_SUFFIXES:
            continue
        try:
            out[f] = (ROOT / f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    return out


def test_every_reference_to_a_repository_file_resolves():
    files = tracked_files()
    tracked, dirs, tops = repo_index(files)
    assert {"avr_core", "tasks", "flows", "docs"} <= set(tops), tops
    problems = [f"{src}:{p}" for src, text in _text_files(files).items()
                for p in dead_references(text, src, tracked, dirs, tops)]
    assert not problems, "dead references to repository files:\n  " + "\n  ".join(problems)


def stage_decorators() -> set[str]:
    """The decorators that make a stage task: the module-level functions of tasks/runtime/skeleton.py
    (`stage` today; read from the code so that a renamed decorator is still found)."""
    tree = ast.parse((ROOT / "tasks" / "runtime" / "skeleton.py").read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def stage_tasks() -> list[str]:
    """`tasks/<file>.py::<function>` for every function in tasks/*.py decorated with one of
    `stage_decorators()`, with or without arguments (Prefect's plain `@task` is not a stage)."""
    decorators, found = stage_decorators(), []
    for f in sorted((ROOT / "tasks").glob("*.py")):
        for node in ast.parse(f.read_text(encoding="utf-8")).body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
                if name in decorators:
                    found.append(f"tasks/{f.name}::{node.name}")
                    break
    return found


def test_design_names_every_stage_task():
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    tasks = stage_tasks()
    assert len(tasks) >= 10, tasks          # the parser still finds the decorator
    missing = [t for t in tasks if t not in design]
    assert not missing, f"docs/DESIGN.md does not name these stage tasks (add them to its Steps): {missing}"


def test_a_planted_dead_reference_is_caught():
    files = tracked_files()
    tracked, dirs, tops = repo_index(files)
    # built by concatenation so that this file itself holds no dead reference
    dead_file = "avr_core/" + "no_such_module.py"
    dead_md = "NO_SUCH_NOTES" + ".md"
    dead_member = "tasks/synthesis.py::" + "no_such_function"
    text = (f"see {dead_file}, {dead_md} and {dead_member}.\n"
            "fine: avr_core/store/__init__.py::cache_key, tests/core/, README.md, RELIABILITY.md, docs/DESIGN.md\n"
            "not ours: src/actions.py of the authors, https://example.org/avr_core/" + "gone.py, "
            "tasks/<file>.py, tests/*.py, artifacts/select/<key>/, scaling.md, "
            "the authors' scripts/" + "stage1_generation.sh\n")
    bad = dead_references(text, str(Path("docs", "planted")), tracked, dirs, tops)
    assert [b.split(" (")[0] for b in bad] == [f"1: {dead_file}", f"1: {dead_member}", f"1: {dead_md}"], bad
