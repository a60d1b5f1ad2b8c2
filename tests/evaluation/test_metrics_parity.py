"""Our metrics against alpaca-eval 0.6.6's OWN functions on synthetic annotation sets: draws given as
1.5 and as 0, unparsed judgements, varying lengths, model answers in a shuffled order. The
reference for each number is the package's code called the way `main.evaluate` calls it
(main.py:155-179: annotations from `annotate_head2head(outputs_1=reference, outputs_2=model)`,
every row, then `get_length_controlled_winrate(annotations, **metric_kwargs)`)."""
import hashlib
import math
import random

import numpy as np
import pandas as pd
import pytest

import avr_core.evaluation.judge as judge_mod
from avr_core.evaluation.metrics import lc_win_rate, position_agreement, win_rate

N = 805      # the official LC reads a row's position as one of AlpacaEval's 805 instruction ids


def synthetic(n: int, seed: int = 0) -> list[dict]:
    """Annotation rows (judge.annotate's format) in reference order: lengths 20-600 chars, the
    longer side favoured, ~5% unparsed (None), ~4% draws as 1.5, ~4% draws as 0."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        l1, l2, u = rng.randint(20, 600), rng.randint(20, 600), rng.random()
        p = 1 + 1 / (1 + math.exp(-(l2 - l1) / 200 - rng.gauss(0, 1)))
        pref = None if u < .05 else 1.5 if u < .09 else 0.0 if u < .13 else 2.0 if u < .16 else 1.0 if u < .19 else p
        rows.append({"instruction": f"q{i}", "output_1": "r" * l1, "output_2": "m" * l2, "generator_1": "gpt4_turbo",
                     "generator_2": "mine", "annotator": "judge", "preference": pref})
    return rows


def as_alpaca_eval(rows: list[dict]) -> list[dict]:
    """The same rows as `annotate_head2head` returns them to `main.evaluate`: unparsed = NaN."""
    return [{**r, "preference": math.nan if r["preference"] is None else r["preference"]} for r in rows]


def gamed_csv(path, n: int = N, seed: int = 1) -> str:
    """A synthetic df_gamed.csv with what `_get_featurized_data` reads (glm_winrate.py:219-256):
    `model` (dropped), `index`, `instruction_difficulty` (looked up by index) and, for the v1 GLM's
    regularisation to the two gamed baselines, their `preference`, `std_delta_len` and
    `not_gamed_baseline` (False)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 1, n)
    pd.concat([pd.DataFrame({"model": m, "index": range(n), "instruction_difficulty": difficulty,
                             "preference": rng.uniform(0, 1, n), "std_delta_len": rng.normal(0, 1, n),
                             "not_gamed_baseline": False}) for m in ("gamed_verbose", "gamed_concise")]
              ).to_csv(path, index=False)
    return str(path)


def difficulty_csv(path, n: int, seed: int) -> str:
    d = np.random.default_rng(seed).normal(0, 3, n)
    pd.DataFrame({"model": "x", "index": range(n), "instruction_difficulty": d}).to_csv(path, index=False)
    return str(path)


@pytest.fixture
def hub(monkeypatch):
    """Point alpaca-eval's own hub download at a local file (what `main.evaluate` would read)."""
    import alpaca_eval.metrics.glm_winrate as glm

    def use(path):
        monkeypatch.setattr(glm, "hf_hub_download", lambda *a, **k: path)
    return use


# -- win rate --------------------------------------------------------------------------------------
def test_win_rate_equals_get_winrate():
    from alpaca_eval.metrics import get_winrate

    rows = synthetic(300)
    ours, theirs = win_rate(rows), get_winrate(as_alpaca_eval(rows))
    assert {k: ours[k] for k in theirs} == {k: theirs[k] for k in theirs}      # exact
    assert ours["unparsed"] == sum(r["preference"] is None for r in rows) > 0


# -- LC ----------------------------------------------------------------------------------------------
def test_official_lc_equals_alpaca_eval_on_every_row(tmp_path, hub):
    from alpaca_eval.metrics import get_length_controlled_winrate

    rows, csv = synthetic(N), gamed_csv(tmp_path / "df_gamed.csv")
    ours = lc_win_rate(rows, full_evalset=True, df_gamed=csv, min_annotations=0)
    hub(csv)
    theirs = get_length_controlled_winrate(as_alpaca_eval(rows), save_weights_dir=None)
    assert ours["lc_kind"] == "official"
    assert ours["lc_win_rate"] == pytest.approx(theirs["length_controlled_winrate"], abs=1e-9)


def test_minimal_lc_equals_alpaca_eval_minimal_whatever_the_difficulty(tmp_path, hub):
    """The offline fallback is alpaca-eval's length_controlled_minimal on every row (0 = a draw,
    glm_winrate.py:237). Its formula has no instruction_difficulty term: two different difficulty
    columns give the identical LC, so our stand-in file's zeros cannot matter."""
    from alpaca_eval.metrics import get_length_controlled_winrate

    rows = synthetic(300, seed=3)
    ours = lc_win_rate(rows, full_evalset=False, df_gamed=None)
    lcs = []
    for seed in (1, 2):
        hub(difficulty_csv(tmp_path / f"d{seed}.csv", len(rows), seed))
        lcs.append(get_length_controlled_winrate(as_alpaca_eval(rows), glm_name="length_controlled_minimal",
                                                 save_weights_dir=None)["length_controlled_winrate"])
    assert lcs[0] == lcs[1]
    assert ours["lc_kind"] == "minimal-offline" and ours["lc_win_rate"] == pytest.approx(lcs[0], abs=1e-9)


# -- the whole judge pass against main.evaluate ------------------------------------------------------
def fake_completions(prompts, model_name, device="auto", **kwargs):
    """A stand-in for the local judge, deterministic in the rendered prompt: some answers without
    "m"/"M" (unparsed), some with equal log-probs (a 1.5 draw), the rest a probability."""
    choices = []
    for p in prompts:
        h = int(hashlib.md5(p.encode()).hexdigest(), 16)
        q = 0.5 if h % 13 == 0 else (h % 1000 + 1) / 1002
        top = [{"token": "x", "logprob": -0.1}] if h % 17 == 0 else \
            [{"token": "m", "logprob": math.log(q)}, {"token": "M", "logprob": math.log(1 - q)}]
        choices.append({"text": "m", "logprobs": {"content": [{"token": "m", "logprob": -1.0, "top_logprobs": top}]}})
    return {"completions": [c["text"] for c in choices], "completions_all": choices,
            "price_per_example": [0.0] * len(prompts), "time_per_example": [0.0] * len(prompts)}


LOCAL = {"kind": "local", "local_model": "fake", "annotator": "unused"}


def outputs(n: int, seed: int = 0):
    rng = random.Random(seed)
    ref = [{"instruction": f"q{i}", "output": "r" * rng.randint(20, 600), "generator": "gpt4_turbo", "dataset": "d"}
           for i in range(n)]
    model = [{"instruction": f"q{i}", "output": "m" * rng.randint(20, 600), "generator": "mine", "dataset": "d"}
             for i in range(n)]
    rng.shuffle(model)                  # answers in the model's order, not the reference's
    return model, ref


@pytest.fixture
def judged(tmp_path, monkeypatch):
    monkeypatch.setattr(judge_mod, "local_completions", fake_completions)
    config = judge_mod.write_judge_config(str(tmp_path / "judge"), LOCAL)

    def annotate_fn(outputs_2, outputs_1, randomize):
        return judge_mod.annotate(outputs_2, outputs_1, config, None, LOCAL, randomize_order=randomize)
    return config, annotate_fn


def test_judge_answers_equals_main_evaluate_leaderboard_row(tmp_path, hub, judged):
    from alpaca_eval.main import evaluate

    config, annotate_fn = judged
    model, ref = outputs(N)
    csv = gamed_csv(tmp_path / "df_gamed.csv")
    ann, ours = judge_mod.judge_answers(model, ref, annotate_fn, LOCAL, 0, csv, lc_min_annotations=0)
    hub(csv)
    board, _ = evaluate(model_outputs=model, reference_outputs=ref, annotators_config=config, output_path=None,
                        precomputed_leaderboard=None, is_return_instead_of_print=True,
                        metric_kwargs={"save_weights_dir": None}, fn_completions=fake_completions, caching_path=None)
    row = board.loc["mine"]
    assert ours["unparsed"] > 0 and ours["n_draws"] > 0 and ours["lc_kind"] == "official"
    for k in ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "discrete_win_rate"):
        assert ours[k] == row[k], k
    assert ours["lc_win_rate"] == pytest.approx(row["length_controlled_winrate"], abs=1e-9)


def test_annotations_follow_alpaca_evals_merge_order(judged):
    """Reference order, each instruction's model rows in their order, instructions missing on
    either side left out: what `annotate_head2head` returns, whatever the model's order."""
    from alpaca_eval.annotators import PairwiseAnnotator

    config, annotate_fn = judged
    model, ref = outputs(40, seed=5)
    model = [m for m in model if m["instruction"] != "q7"]                    # a reference the model lacks
    model += [{**model[3], "output": "a second answer"}, {**model[3]},          # a second and a repeated answer
              {"instruction": "extra", "output": "x", "generator": "mine", "dataset": "d"}]   # not in the reference
    ann = annotate_fn(model, ref, True)
    theirs = PairwiseAnnotator(annotators_config=config, caching_path=None, fn_completions=fake_completions
                               ).annotate_head2head(outputs_1=ref, outputs_2=model)
    key = ("instruction", "output_1", "output_2")
    assert [tuple(a[k] for k in key) for a in ann] == [tuple(t[k] for k in key) for t in theirs]
    assert [a["preference"] for a in ann] == [None if pd.isna(t["preference"]) else t["preference"] for t in theirs]
    in_ref_order = sorted(model, key=lambda m: int(m["instruction"][1:]) if m["instruction"] != "extra" else -1)
    assert annotate_fn(in_ref_order, ref, True) == ann


def test_head2head_order_is_an_inner_merge():
    from avr_core.evaluation.judge import head2head_order

    model, ref = outputs(60, seed=2)
    model = model[5:] + [dict(model[9]), {**model[9], "output": "other"}, {**ref[0], "instruction": "none"}]
    ref = [r for r in ref if r["instruction"] != "q11"]
    merged = pd.merge(pd.DataFrame(ref), pd.DataFrame(model), on=["instruction"], suffixes=("_1", "_2"))
    merged = merged.drop_duplicates()                    # pairwise_evaluator.py:212-228
    ours = [(r["instruction"], r["output"], m["output"]) for r, m in head2head_order(model, ref)]
    assert ours == list(zip(merged["instruction"], merged["output_1"], merged["output_2"]))


# -- position bias ---------------------------------------------------------------------------------
def test_position_agreement_reads_draws_as_alpaca_eval_does():
    from alpaca_eval.metrics.helpers import AbsoluteScoringRule

    fwd_p = [1.5, 0.0, 2.0, 1.0, 1.7, 1.3]   # model second: draw, draw, model, reference, model, reference
    swp_p = [0.0, 1.5, 1.0, 2.0, 1.5, 1.6]   # model first:  draw, draw, model, reference, draw, reference
    fwd = [{"instruction": f"q{i}", "preference": p} for i, p in enumerate(fwd_p)]
    swp = [{"instruction": f"q{i}", "preference": p} for i, p in enumerate(swp_p)] + [
        {"instruction": "q9", "preference": None}]
    r = position_agreement(fwd, swp)
    assert (r["n"], r["agreement"]) == (6, 5 / 6)
    d_fwd, d_swp = AbsoluteScoringRule().describe_head2head(fwd_p), AbsoluteScoringRule().describe_head2head(swp_p)
    assert (r["model_wins_forward"], r["draws_forward"]) == (d_fwd["n_wins"], d_fwd["n_draws"]) == (2, 2)
    assert (r["model_wins_swapped"], r["draws_swapped"]) == (d_swp["n_wins_base"], d_swp["n_draws"]) == (1, 3)


# -- failures: never an exception, never a number about nothing ----------------------------------------
def test_all_unparsed_gives_no_lc_and_no_exception(tmp_path, hub):
    rows = [{**r, "preference": None} for r in synthetic(N)]
    csv = gamed_csv(tmp_path / "df_gamed.csv")
    hub(csv)
    for df_gamed in (csv, "hub"):
        r = lc_win_rate(rows, full_evalset=True, df_gamed=df_gamed, min_annotations=0)
        assert r["lc_win_rate"] is None and r["lc_kind"] == "unavailable" and "no judgement parsed" in r["lc_note"]
    assert win_rate(rows)["win_rate"] is None and win_rate(rows)["unparsed"] == N


def test_hub_download_failure_and_fit_failure_say_different_things(tmp_path, monkeypatch):
    import alpaca_eval.metrics.glm_winrate as glm
    from alpaca_eval import constants

    rows, seen = synthetic(N), []

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(glm, "hf_hub_download", offline)
    r = lc_win_rate(rows, full_evalset=True, df_gamed="hub")
    assert r["lc_kind"] == "minimal-offline" and "df_gamed.csv not reachable on the hub (OSError)" in r["lc_note"]

    broken = tmp_path / "df_gamed.csv"
    pd.DataFrame({"model": ["g"], "index": [0]}).to_csv(broken, index=False)   # no instruction_difficulty

    def download(*a, **k):
        seen.append((a, k))
        return str(broken)
    monkeypatch.setattr(glm, "hf_hub_download", download)
    r = lc_win_rate(rows, full_evalset=True, df_gamed="hub")
    assert r["lc_kind"] == "unavailable" and r["lc_win_rate"] is None
    assert "fit failed: KeyError" in r["lc_note"] and "not reachable" not in r["lc_note"]
    assert seen[0] == ((), {"repo_id": "tatsu-lab/alpaca_eval", "filename": "df_gamed.csv", "repo_type": "dataset",
                            "token": constants.DATASETS_TOKEN, "force_download": constants.DATASETS_FORCE_DOWNLOAD,
                            "cache_dir": constants.DEFAULT_CACHE_DIR})


def test_lc_min_annotations_counts_parsed_judgements():
    rows = synthetic(14, seed=4)
    rows = [{**r, "preference": 1.25 if r["preference"] is None else r["preference"]} for r in rows]
    rows += [{**rows[0], "preference": None}] * 3                     # 14 parsed, 17 rows
    low = lc_win_rate(rows, full_evalset=False, df_gamed=None, min_annotations=15)
    assert low["lc_kind"] == "unavailable" and "eval.lc_min_annotations = 15" in low["lc_note"]
    assert "14 parsed" in low["lc_note"]
    assert lc_win_rate(rows, full_evalset=False, df_gamed=None, min_annotations=14)["lc_kind"] == "minimal-offline"
    few = rows[:8]                                                    # alpaca-eval's rule (0): fit on what there is
    assert lc_win_rate(few, full_evalset=False, df_gamed=None, min_annotations=0)["lc_kind"] == "minimal-offline"
    assert lc_win_rate(few, full_evalset=False, df_gamed=None)["lc_kind"] == "unavailable"      # ours: 10
