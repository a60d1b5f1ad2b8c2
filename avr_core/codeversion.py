"""Code versions derived from the source: what a stage can execute, never a hand-kept list.

A stage's cache key must change whenever code that shapes its artifact changes. Listing the
modules of each stage by hand goes stale silently (a prompt module missing from a list once let
a nightly rerun reuse critiques sampled with an edited prompt), so the list is derived:

* every Python file of this repository (`avr_core/`, `tasks/`, `flows/`) is parsed (never
  imported) into its top-level definitions: functions, classes and assigned names, each with
  its source and the names it refers to;
* starting from a stage's entry points (its task function and key function), every
  definition reachable through names, attribute chains and imports is collected, transitively;
  a string constant that names a module of this repository (`python -m avr_core.training`)
  counts as a reference to that whole module;
* the code version hashes exactly those definitions, plus the module-level statements of every
  module they live in (they run on import). A definition is hashed as its syntax tree without
  comments, docstrings and import statements (what an import binds is followed, not its text),
  and the version hashes the sorted definition hashes without the files they live in: moving a
  definition to another module, or renaming a module, keeps every key; editing what runs changes
  it. Strings that name a module (`"tasks.runtime.skeleton:run_stage"`) are code and count.

So editing the judge prompt in `avr_core/prompts.py` changes the key of the stages that reach
that constant (critique and later) and not of `respond`, which never refers to it.

Deliberately not followed: strings of the form ``"module:attr"``. Those are the backend
registries (`avr_core.backends.GENERATORS`): a stage adds the entry of the backend kind its
config selects, so editing the openai backend recomputes the runs that used it, and only them.

    >>> v = code_version(["avr_core.codeversion:code_version"])
    >>> v.version == code_version(["avr_core.codeversion:code_version"]).version and len(v.version)
    12
    >>> sorted(v.files)                    # the function's own file, and the package it lives in
    ['avr_core/__init__.py', 'avr_core/codeversion.py']
"""
from __future__ import annotations

import ast
import copy
import hashlib
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("avr_core", "tasks", "flows")


@dataclass
class Definition:
    source: str
    refs: set[str] = field(default_factory=set)   # dotted names and "module:<name>" references


@dataclass
class Module:
    name: str                       # dotted, e.g. "avr_core.synthesis"
    path: str                       # relative to the repository root, e.g. "avr_core/synthesis.py"
    defs: dict[str, Definition]     # top-level name -> definition
    always: list[Definition]        # module-level statements that run on import (not defs, not imports)
    imports: dict[str, str]         # local name -> absolute dotted target ("avr_core.synthesis.respond")


@dataclass(frozen=True)
class CodeVersion:
    """`version`: the hash that goes into a cache key. `files`: per repository file, a hash of
    the definitions used from it (what the run summary names when the version changed)."""

    version: str
    files: dict[str, str]


def code_version(entries: Iterable[str], root: Path | str | None = None) -> CodeVersion:
    """Hash of every definition reachable from `entries` (each "module" or "module:name").
    `root`: another checkout of this repository (tests hash edited copies)."""
    return _code_version(tuple(entries), str(Path(root or ROOT).resolve()))


def reached_definitions(entries: Iterable[str], root: Path | str | None = None) -> set[tuple[str, str | None]]:
    """(module, name) of every definition `entries` reach (see `reachable`)."""
    return reachable(entries, _index(str(Path(root or ROOT).resolve())))


@lru_cache(maxsize=1024)
def _code_version(entries: tuple[str, ...], root: str) -> CodeVersion:
    index = _index(root)
    used = reachable(entries, index)
    per_file: dict[str, hashlib._Hash] = {}
    hashed: list[str] = []                          # one per definition, whatever file it is in
    for mod_name, name in sorted(used, key=lambda u: (u[0], u[1] or "")):
        mod = index[mod_name]
        items = mod.always if name is None else [mod.defs[name]]
        h = per_file.setdefault(mod.path, hashlib.sha256())
        for d in items:
            h.update(f"{name}\0{d.source}\0".encode())
            hashed.append(hashlib.sha256(f"{name or ''}\0{d.source}".encode()).hexdigest())
    files = {f: h.hexdigest()[:12] for f, h in sorted(per_file.items())}
    version = hashlib.sha256(";".join(sorted(hashed)).encode()).hexdigest()[:12]
    return CodeVersion(version, files)


def reachable(entries: Iterable[str], index: dict[str, Module],
              parents: dict | None = None) -> set[tuple[str, str | None]]:
    """(module, name) of every definition reachable from `entries`; name None = its module-level
    statements. Raises KeyError for an entry that is not in the repository (a typo must not
    silently hash nothing)."""
    seen: set[tuple[str, str | None]] = set()
    todo: list[tuple[str, str | None]] = []

    current: list = [None]                          # the definition being expanded (for `parents`)

    def push(item: tuple[str, str | None]) -> None:
        if parents is not None and item not in parents:
            parents[item] = current[0]
        todo.append(item)

    def add_module_body(mod_name: str) -> None:
        parts = mod_name.split(".")
        for i in range(1, len(parts) + 1):         # importing a.b.c runs a/__init__, a/b/__init__ too
            pkg = ".".join(parts[:i])
            if pkg in index:
                push((pkg, None))

    def add(mod_name: str, name: str | None) -> None:
        add_module_body(mod_name)
        if name is not None:
            push((mod_name, name))

    def add_whole(mod_name: str) -> None:
        add_module_body(mod_name)
        for n in index[mod_name].defs:
            push((mod_name, n))
        if f"{mod_name}.__main__" in index:          # `python -m package` runs its __main__
            add_whole(f"{mod_name}.__main__")

    for e in entries:
        mod_name, _, name = e.partition(":")
        if mod_name not in index or (name and name not in index[mod_name].defs):
            raise KeyError(f"code entry {e!r} is not a definition of this repository")
        add(mod_name, name) if name else add_whole(mod_name)

    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        current[0] = item
        mod_name, name = item
        mod = index[mod_name]
        for d in (mod.always if name is None else [mod.defs[name]]):
            for ref in d.refs:
                if ref.startswith("module:"):
                    add_whole(ref[len("module:"):])
                else:
                    _resolve_local(mod, ref, index, add, add_whole)
    return seen


def _resolve_local(mod: Module, dotted: str, index, add, add_whole) -> None:
    head, _, rest = dotted.partition(".")
    if head in mod.defs:
        add(mod.name, head)
    elif head in mod.imports:
        _resolve_abs(mod.imports[head] + (f".{rest}" if rest else ""), index, add, add_whole)


def _resolve_abs(dotted: str, index, add, add_whole, depth: int = 0) -> None:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):              # the longest prefix that is a repository module
        mod_name = ".".join(parts[:i])
        if mod_name in index:
            break
    else:
        return                                      # a library (torch, json, ...): not ours to hash
    mod, attr = index[mod_name], (parts[i] if i < len(parts) else None)
    if attr is None:
        add_whole(mod_name)                         # the module object itself is used
    elif attr in mod.defs:
        add(mod_name, attr)
    elif attr in mod.imports and depth < 20:        # a re-export: follow it
        _resolve_abs(".".join([mod.imports[attr], *parts[i + 1:]]), index, add, add_whole, depth + 1)
    elif "__getattr__" in mod.defs:                 # a lazy module attribute
        add(mod_name, "__getattr__")


def why(entries: Iterable[str], target: str, root: Path | str | None = None) -> list[str]:
    """How `entries` reach `target` ("module" or "module:name"): the chain of definitions,
    entry first; [] if they do not (debugging a key that changed, or did not).

    >>> why(["avr_core.codeversion:code_version"], "avr_core.codeversion:_index")
    ['avr_core.codeversion:code_version', 'avr_core.codeversion:_code_version', 'avr_core.codeversion:_index']
    """
    parents: dict = {}
    used = reachable(entries, _index(str(Path(root or ROOT).resolve())), parents)
    module, _, name = target.partition(":")
    hits = sorted((u for u in used if u[0] == module and (not name or u[1] == name)),
                  key=lambda u: (u[1] is None, u[1] or ""))        # a definition before the module body
    hit = hits[0] if hits else None
    chain = []
    while hit is not None:
        chain.append(f"{hit[0]}:{hit[1] or '<module body>'}")
        hit = parents.get(hit)
    return chain[::-1]


# -- parsing ------------------------------------------------------------------------------------
# CPython 3.11 keeps the AST constructor's recursion depth in interpreter-wide state, so two
# threads parsing at once (Prefect runs tasks in threads) fail with "AST constructor recursion
# depth mismatch" (python/cpython#106905). Our own parses take one lock; a parse by another
# library's thread can still collide, and a fresh parse is then correct, so `_ast` tries again.
_PARSE_LOCK = threading.Lock()


def _index(root: str) -> dict[str, Module]:
    with _PARSE_LOCK:
        return _index_unlocked(root)


@lru_cache(maxsize=8)
def _index_unlocked(root: str) -> dict[str, Module]:
    out: dict[str, Module] = {}
    base = Path(root)
    for pkg in PACKAGES:
        for path in sorted((base / pkg).rglob("*.py")):
            rel = path.relative_to(base)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = None  # type: ignore[assignment]  # names first: strings refer to modules
    for name in list(out):
        rel = Path(*name.split("."))
        path = base / rel / "__init__.py" if (base / rel).is_dir() else base / rel.with_suffix(".py")
        out[name] = _parse(name, path.relative_to(base).as_posix(), path.read_text(encoding="utf-8"), set(out))
    return out


def _ast(text: str, rel: str, tries: int = 5) -> ast.Module:
    for attempt in range(tries):
        try:
            return ast.parse(text, filename=rel)
        except SystemError as e:                    # the race above, never a property of the file
            if "recursion depth mismatch" not in str(e) or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _parse(name: str, rel: str, text: str, modules: set[str]) -> Module:
    tree = _ast(text, rel)
    package = name if rel.endswith("__init__.py") else name.rpartition(".")[0]
    mod = Module(name, rel, {}, [], {})
    for node in ast.walk(tree):                     # imports anywhere bind names (function-local ones too)
        if isinstance(node, ast.Import):
            for a in node.names:
                mod.imports[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(node, package)
            for a in node.names:
                mod.imports[a.asname or a.name] = f"{src}.{a.name}"
    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue                                # the module docstring
        d = Definition(_source(node), _refs(node, modules))
        names = _bound_names(node)
        for n in names:
            mod.defs[n] = d
        if not names:
            mod.always.append(d)
    return mod


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def _source(node: ast.stmt) -> str:
    r"""What a definition runs: its syntax tree, without comments (the parser drops them),
    docstrings or import statements (their targets are followed as references instead).

    >>> a = ast.parse("def f(x):\n    'doc'\n    from m import g  # a comment\n    return g(x)").body[0]
    >>> b = ast.parse("def f(x):\n    from other.m import g\n    return g(x)").body[0]
    >>> _source(a) == _source(b), _source(a) == _source(ast.parse("def f(x):\n    return g(x + 1)").body[0])
    (True, False)
    """
    node = _Strip().visit(copy.deepcopy(node))
    return ast.dump(node, annotate_fields=False, include_attributes=False)


class _Strip(ast.NodeTransformer):
    def generic_visit(self, node):
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if isinstance(body, list):
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]                      # the docstring
            body = [b for b in body if not isinstance(b, (ast.Import, ast.ImportFrom))]
            node.body = body or [ast.Pass()]
        return node


def _refs(node: ast.AST, modules: set[str]) -> set[str]:
    """Names `node` uses from outside itself. A chain `core.respond` counts once, as the whole
    chain (its base `core` alone would mean the whole module); a function's own parameters and
    local variables are not references (a parameter named `prompts` is not the `prompts` stage)."""
    refs: set[str] = set()
    _collect(node, frozenset(), refs, modules)
    return refs


_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _collect(node: ast.AST, local: frozenset, refs: set[str], modules: set[str]) -> None:
    if isinstance(node, _FUNCS):
        for d in [*getattr(node, "decorator_list", []), *node.args.defaults, *node.args.kw_defaults]:
            if d is not None:
                _collect(d, local, refs, modules)   # evaluated in the enclosing scope
        local = local | _locals(node)
        for child in (node.body if isinstance(node.body, list) else [node.body]):
            _collect(child, local, refs, modules)
        return
    if isinstance(node, ast.Name):
        if not isinstance(node.ctx, ast.Store) and node.id not in local:
            refs.add(node.id)
        return
    if isinstance(node, ast.Attribute):
        chain = _chain(node)
        if chain is not None:
            if chain.split(".")[0] not in local:
                refs.add(chain)
            return
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value and node.value in modules:
        refs.add(f"module:{node.value}")
    for child in ast.iter_child_nodes(node):
        _collect(child, local, refs, modules)


def _locals(fn: ast.AST) -> frozenset:
    """Names a function binds itself: parameters and assignment targets (not imports: those
    resolve through the module's import table), minus `global`/`nonlocal` names."""
    a = fn.args
    names = {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []),
                             *([a.kwarg] if a.kwarg else [])]}
    declared: set[str] = set()
    todo = list(fn.body) if isinstance(fn.body, list) else [fn.body]
    while todo:
        n = todo.pop()
        if isinstance(n, _FUNCS + (ast.ClassDef,)):
            if not isinstance(n, ast.Lambda):
                names.add(n.name)
            continue                                # its own scope
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            declared.update(n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        todo.extend(ast.iter_child_nodes(n))
    return frozenset(names - declared)


def _chain(n: ast.Attribute) -> str | None:
    parts = []
    cur: ast.AST = n
    while isinstance(cur, ast.Attribute):
        parts.append(cur.attr)
        cur = cur.value
    if not isinstance(cur, ast.Name):
        return None
    return ".".join([cur.id, *reversed(parts)])
