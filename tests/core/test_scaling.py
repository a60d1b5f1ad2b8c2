"""The test-time-scaling table and plot on hand-made records."""
import math

import pytest

from avr_core.scaling import plot_scaling, scaling_table, to_csv, to_markdown

RECS = [{"id": "a", "answers": ["x", "xx", "xx"], "scores": [1.0, 2.0, 4.0]},
        {"id": "b", "answers": ["yyyy", "yyyy", "y y"], "scores": [3.0, 3.0, 2.0]}]


def test_mean_spread_and_length_per_round():
    rows = scaling_table(RECS)
    assert [r["R"] for r in rows] == [0, 1, 2]
    assert [r["mean"] for r in rows] == [2.0, 2.5, 3.0]
    assert rows[2]["std"] == pytest.approx(math.sqrt(2)) and rows[2]["se"] == pytest.approx(1.0)
    assert [r["mean_chars"] for r in rows] == [2.5, 3.0, 2.5]
    assert rows[2]["mean_words"] == 1.5
    assert [r["gain_vs_R0"] for r in rows] == [0.0, 0.5, 1.0]
    assert [r["better_than_R0"] for r in rows] == [0, 1, 1]       # b got worse at R=2
    assert [r["changed"] for r in rows] == [0, 1, 1]


def test_single_prompt_has_zero_spread_and_empty_input_is_an_error():
    assert scaling_table(RECS[:1])[0]["std"] == 0.0
    with pytest.raises(ValueError, match="at least one prompt"):
        scaling_table([])


def test_table_renderings_and_png():
    rows = scaling_table(RECS)
    assert to_markdown(rows).count("\n") == 2 + len(rows)
    assert to_markdown(rows, "SMOKE RUN").startswith("SMOKE RUN\n\n| R |")     # the smoke-run banner on top
    assert to_csv(rows).splitlines()[1].startswith("0,2,2.0,")
    assert plot_scaling(rows).startswith(b"\x89PNG")
