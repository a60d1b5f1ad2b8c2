"""Code versions are derived from the source, so an edit recomputes exactly what it can affect.

Each test copies the repository's Python sources into a temporary directory, edits the copy as a
developer would, and compares the stages' code versions (and real artifact keys) before and
after. The checkout itself is never touched.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import avr_core.codeversion as cv
from avr_core.catalog import recompute_reason
from avr_core.config import load_config
from avr_core.store import Store
from tasks.runtime.keys import stage_code
from tasks.runtime.skeleton import StageTask

ROOT = Path(__file__).resolve().parents[2]


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for pkg in cv.PACKAGES:
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "data"))
    return root


def _edit(root: Path, rel: str, old: str, new: str) -> None:
    p = root / rel
    text = p.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {rel}: update this test"
    p.write_text(text.replace(old, new, 1))
    _forget()


def _forget() -> None:
    """The parsed sources are cached per checkout path: drop them after an edit."""
    cv._index_unlocked.cache_clear()
    cv._code_version.cache_clear()


def _stages() -> dict[str, str]:
    """Every stage task of the product, as its body's entry ("module:function")."""
    import tasks.evaluate
    import tasks.learning_signal
    import tasks.scaling
    import tasks.stage2
    import tasks.synthesis
    import tasks.training
    out = {}
    for mod in (tasks.synthesis, tasks.training, tasks.learning_signal, tasks.stage2, tasks.scaling, tasks.evaluate):
        for v in vars(mod).values():
            if isinstance(v, StageTask) and getattr(v, "body", None) is not None:
                out[v.name] = f"{v.body.__module__}:{v.body.__name__}"
    return out


def _versions(root, cfg) -> dict[str, str]:
    return {name: stage_code(entry, cfg, root).version for name, entry in _stages().items()}


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny", [])


def test_every_stage_is_on_the_skeleton():
    names = set(_stages())
    for want in ("prompts", "respond", "critique", "refine", "rm_score", "select", "train_sft", "train_po",
                 "reference_logps", "learning_signal"):
        assert want in names


@pytest.mark.slow
def test_editing_the_judge_prompt_recomputes_critique_and_later_not_respond(tmp_path, tiny, monkeypatch):
    import tasks.synthesis as t

    root = _copy(tmp_path)
    store = Store(str(tmp_path / "store"))
    cfg = load_config("tiny", [f"store.root={store.root}"])
    monkeypatch.setattr(cv, "ROOT", root)         # the real stage tasks now hash the copy
    p = t.prompts.ref(cfg, "stage1_sft")
    before = {"respond": t.respond.ref(cfg, cfg["policy"], p)}
    before["critique"] = t.critique.ref(cfg, cfg["policy"], before["respond"])
    before["refine"] = t.refine.ref(cfg, cfg["policy"], before["critique"])
    before["rm_score"] = t.rm_score.ref(cfg, before["refine"])

    _edit(root, "avr_core/prompts.py", "Be as objective as possible.", "Be as fair as you can.")
    after = {"respond": t.respond.ref(cfg, cfg["policy"], p)}
    after["critique"] = t.critique.ref(cfg, cfg["policy"], after["respond"])
    after["refine"] = t.refine.ref(cfg, cfg["policy"], after["critique"])
    after["rm_score"] = t.rm_score.ref(cfg, after["refine"])
    assert t.prompts.ref(cfg, "stage1_sft") == p
    assert after["respond"] == before["respond"]                  # never sees the judge prompt
    for stage in ("critique", "refine", "rm_score"):              # the judge's output flows into these
        assert after[stage] != before[stage], stage
    # the critique stage's own code changed (not only its input)
    assert stage_code("tasks.synthesis:critique", cfg, root).files["avr_core/prompts.py"] != \
        stage_code("tasks.synthesis:critique", cfg, ROOT).files["avr_core/prompts.py"]


@pytest.mark.slow
def test_editing_the_openai_backend_recomputes_only_runs_that_used_it(tmp_path):
    root = _copy(tmp_path)
    openai = load_config("tiny", ["generator.kind=openai", "generator.base_url=http://127.0.0.1:1/v1"])
    hf = load_config("tiny", [])
    before = {"openai": _versions(root, openai), "hf": _versions(root, hf)}
    _edit(root, "avr_core/backends/openai_api.py", "class OpenAIGenerator(BackendKind):",
          "class OpenAIGenerator(BackendKind):\n    edited = True\n")
    after = {"openai": _versions(root, openai), "hf": _versions(root, hf)}
    assert after["hf"] == before["hf"]
    changed = {s for s in before["openai"] if before["openai"][s] != after["openai"][s]}
    assert {"respond", "critique", "refine"} <= changed
    assert not changed & {"rm_score", "select", "prompts", "train_sft", "train_po"}


@pytest.mark.slow
def test_editing_the_leaderboard_recomputes_no_stage(tmp_path, tiny):
    root = _copy(tmp_path)
    before = _versions(root, tiny)
    p = root / "avr_core/evaluation/leaderboard.py"
    p.write_text(re.sub(r"^(def .*:)$", r"\1\n    edited = True", p.read_text(), flags=re.M))   # every function
    assert p.read_text().count("edited = True") >= 2
    _forget()
    assert _versions(root, tiny) == before
    # ...while the same edit to the code a generation stage runs does change it (the test can fail)
    _edit(root, "avr_core/synthesis.py", "def respond(", "def respond(*_edited, ")
    assert _versions(root, tiny)["respond"] != before["respond"]


@pytest.mark.slow
def test_keys_survive_a_pure_rename_and_comments_but_not_an_edit(tmp_path, tiny):
    """Issue 33: a module renamed (its importers updated) and a comment added keep every stage's code
    version; a change to what runs does not."""
    root = _copy(tmp_path)
    before = _versions(root, tiny)
    renamed = "prompt_texts"                        # avr_core/prompts.py becomes avr_core/<renamed>.py
    (root / "avr_core" / "prompts.py").rename(root / "avr_core" / f"{renamed}.py")      # a pure rename
    for f in root.rglob("*.py"):
        text = f.read_text()
        new = re.sub(r"\bavr_core\.prompts\b", f"avr_core.{renamed}", text)
        new = re.sub(r"from avr_core import (.*)\bprompts\b", rf"from avr_core import \1{renamed} as prompts", new)
        if new != text:
            f.write_text(new)
    _edit(root, "avr_core/synthesis.py", "def respond(", "# a comment a reviewer asked for\ndef respond(")
    _forget()
    assert _versions(root, tiny) == before
    _edit(root, f"avr_core/{renamed}.py", "Be as objective as possible.", "Be as fair as you can.")
    after = _versions(root, tiny)
    assert after["critique"] != before["critique"] and after["respond"] == before["respond"]


def test_a_training_stage_covers_the_subprocess_it_launches(tiny):
    files = stage_code("tasks.training:train_po", tiny).files
    # `python -m avr_core.training` is a string in launch_command: followed as a module reference
    for f in ("avr_core/training/recipe.py", "avr_core/training/__main__.py", "avr_core/losses/dpo.py"):
        assert f in files, f


def test_a_parameter_is_not_the_global_of_the_same_name():
    # respond's body has a parameter named `prompts`; the `prompts` stage (and inputs.py) is not its code
    assert "avr_core/inputs.py" not in stage_code("tasks.synthesis:respond", load_config("tiny", [])).files


def test_a_typo_in_an_entry_fails_loudly():
    with pytest.raises(KeyError, match="not a definition"):
        cv.code_version(["tasks.synthesis:no_such_stage"])


def test_why_recomputed_names_the_file(tmp_path):
    store = Store(str(tmp_path))
    for i, files in enumerate(({"avr_core/prompts.py": "a", "tasks/synthesis.py": "b"},
                               {"avr_core/prompts.py": "c", "tasks/synthesis.py": "b"})):
        w = store.writer("critique", f"k{i}", {"k": 2}, [], f"v{i}")
        w.commit_shard(0, {"records": []}, {})
        w.finalize(extra={"code_files": files, "created": f"2026-01-0{i + 1}T00:00:00Z"})
    assert recompute_reason(store, store.ref("critique", "k1")) == "new code in avr_core/prompts.py"
