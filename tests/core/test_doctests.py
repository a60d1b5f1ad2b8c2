"""The worked examples in docstrings are executable: they run here."""
import doctest

import pytest

import avr_core.evaluation.evalset
import avr_core.evaluation.judge
import avr_core.evaluation.leaderboard
import avr_core.evaluation.metrics
import avr_core.parsing
import avr_core.prompts
import avr_core.scaling
import avr_core.signal
import avr_core.store
import flows.runs


@pytest.mark.parametrize("module", [avr_core.evaluation.evalset, avr_core.evaluation.judge,
                                    avr_core.evaluation.leaderboard, avr_core.evaluation.metrics,
                                    avr_core.parsing, avr_core.prompts, avr_core.scaling,
                                    avr_core.signal, avr_core.store, flows.runs])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0
