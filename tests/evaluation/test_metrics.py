"""Evaluation metrics on synthetic preference lists whose answers are known by hand."""
import math

import pytest

from avr_core.evaluation.metrics import lc_win_rate, position_agreement, win_rate


def ann(pref, out1="r" * 100, out2="m" * 100):
    return {"preference": pref, "output_1": out1, "output_2": out2, "generator_1": "ref", "generator_2": "mine",
            "instruction": f"q{len(out1)}-{len(out2)}-{pref}"}


def test_win_rate_and_its_standard_error():
    r = win_rate([ann(2.0), ann(2.0), ann(2.0), ann(1.0)])
    assert r["win_rate"] == pytest.approx(75.0)
    assert r["standard_error"] == pytest.approx(25.0)     # sem of [1, 1, 1, 0] = 0.5 / sqrt(4), x100
    assert (r["n_wins"], r["n_wins_base"], r["n_total"]) == (3, 1, 4)


def test_unparsed_judgements_are_counted_not_scored():
    r = win_rate([ann(2.0), ann(None), ann(1.5)])
    assert r["win_rate"] == pytest.approx(75.0) and r["n_total"] == 2 and r["unparsed"] == 1
    assert win_rate([ann(None)])["win_rate"] is None


def test_lc_removes_a_pure_length_effect():
    """A judge that only rewards length: the model is longer on 3 of 4 prompts, so its raw win
    rate is high, but at equal length it is a coin flip: LC must come out near 50."""
    rows = []
    for i in range(40):
        d = (i % 10 + 1) * 20 * (1 if i % 4 else -1)        # model minus reference length, chars
        p = 1 / (1 + math.exp(-2 * math.tanh(d / 150)))       # P(model wins) from length alone
        rows.append(ann(1 + p, out1="r" * 300, out2="m" * (300 + d)))
    raw = win_rate(rows)["win_rate"]
    lc = lc_win_rate(rows, full_evalset=False, df_gamed=None)
    assert raw > 60
    assert lc["lc_kind"] == "minimal-offline" and "not the leaderboard LC" in lc["lc_note"]
    assert 40 < lc["lc_win_rate"] < 60


def test_lc_is_never_invented_on_too_few_rows():
    lc = lc_win_rate([ann(2.0), ann(1.0)], full_evalset=False, df_gamed=None)
    assert lc["lc_win_rate"] is None and lc["lc_kind"] == "unavailable"


def test_position_agreement():
    fwd = [{"instruction": "a", "preference": 1.9}, {"instruction": "b", "preference": 1.8}]
    unbiased = [{"instruction": "a", "preference": 1.1}, {"instruction": "b", "preference": 1.2}]
    always_second = [{"instruction": "a", "preference": 1.9}, {"instruction": "b", "preference": 1.8}]
    assert position_agreement(fwd, unbiased)["agreement"] == 1.0
    assert position_agreement(fwd, always_second)["agreement"] == 0.0
