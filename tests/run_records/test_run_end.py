"""The end of a run fits on a screen (issue #24): where the outputs are, the wall-time table, the
learning signal and test-time scaling as numbers, and THIS run's leaderboard rows only, once."""
from run_records.report import end_of_run


def _row(run: str, model: str, wr: float) -> dict:
    return {"date": "2026-12-03 08:57", "run": run, "iteration": 0, "model": model, "stage": model, "R": 0,
            "n": 8, "win_rate": wr, "se": 1.0, "lc": None, "lc_kind": "none", "avg_len": 300.0, "judge": "local"}


SUMMARY = {
    "id": "20261203-090000-aaaaaa", "store": "/data/avr", "wall_s": 22.8, "compare": "20261203-085709-bbbbbb",
    "outputs": {
        "stage1_model": {"path": "/data/avr/po/00a7", "result": None},
        "learning_signal": {"path": "/data/avr/signal/5e1f", "result": {
            "n": 4, "mean_diff": 0.0123, "se": 0.011, "ci95": [-0.0093, 0.0339], "b_better": 3,
            "scorer": "reward_model"}},
        "test_time_scaling": {"path": "/data/avr/tts_curve/77cc", "result": [
            {"R": r, "n": 4, "mean": 4.7 + r / 100, "std": 0.1, "se": 0.05, "mean_chars": 300 + r, "mean_words": 50,
             "gain_vs_R0": r / 100, "better_than_R0": r, "changed": r} for r in range(3)]},
    },
    "leaderboard": [_row("20261203-090000-aaaaaa", "stage1", 41.5), _row("20261203-090000-aaaaaa", "seed", 38.0)],
}


def test_the_end_shows_this_runs_rows_once_and_results_as_numbers():
    table = "| stage | artifact | status | wall s | model loads (s) |\n|---|---|---|---|---|\n"
    out = end_of_run(SUMMARY, table, smoke=True)
    assert "20261203-085709-bbbbbb |" not in out and out.count("| 20261203-090000-aaaaaa |") == 2   # no history
    assert out.count("SMOKE RUN") == 1 and out.count("| date | run |") == 1                       # printed once
    assert "`avr eval`" in out and "/data/avr/leaderboard/leaderboard.md" in out
    assert "mean difference +0.0123, 95% CI [-0.0093, +0.0339]" in out                            # the signal
    assert "| 2 | 4 | 4.72 |" in out                                                               # the TTS table
    assert "rows={}" not in out and "counts=" not in out
    assert "/data/avr/po/00a7" in out and "/data/avr/runs/20261203-090000-aaaaaa/" in out
    assert "avr compare 20261203-090000-aaaaaa" in out
    assert len(out.splitlines()) < 40
