"""The worked examples in docstrings are executable: every module of avr_core, run_records and tasks (found by
walking the packages, so a new module is covered without editing this file) runs its examples here."""
import doctest
import importlib
import pkgutil

import pytest

import avr_core
import run_records
import tasks

# Heavy optional dependencies: a module that needs one of these at import time is skipped, with the
# reason, where it is not installed (e.g. a module whose package a slim install leaves out).
OPTIONAL = {"vllm", "deepspeed"}
MODULES = sorted(m.name for pkg in (avr_core, run_records, tasks)
                 for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."))
# Modules known to carry runnable examples: guards the discovery itself (a walk that found nothing would pass).
KNOWN = {"avr_core.evaluation.evalset", "avr_core.evaluation.judge", "avr_core.evaluation.leaderboard",
         "avr_core.evaluation.metrics", "avr_core.parsing", "avr_core.prompts", "avr_core.scaling",
         "avr_core.learning_signal", "avr_core.store", "run_records.record", "run_records.report",
         "tasks.runtime.skeleton"}


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {e.name}, which is not installed here")
        raise


def test_discovery_finds_the_known_modules():
    assert KNOWN <= set(MODULES) and len(MODULES) > len(KNOWN)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = _import(name)
    runnable = sum(1 for t in doctest.DocTestFinder().find(module) for ex in t.examples
                   if not ex.options.get(doctest.SKIP))
    result = doctest.testmod(module)
    assert result.failed == 0
    assert result.attempted == runnable          # every example that is not marked +SKIP ran
    if name in KNOWN:
        assert result.attempted > 0
