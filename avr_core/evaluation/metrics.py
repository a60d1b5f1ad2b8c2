"""Win rate, length-controlled win rate and a position-bias check, with alpaca-eval's own code.

Annotations are those of `judge.annotate`, in alpaca-eval's `annotate_head2head` order:
`preference` in [1, 2] (2 = the model beats the reference; 1.5 or 0 = a draw), or None where the
judge's answer could not be parsed.

    >>> ann = [{"preference": 2.0}, {"preference": 2.0}, {"preference": 1.0}, {"preference": None}]
    >>> r = win_rate(ann); r["win_rate"], r["n_total"], r["unparsed"]
    (66.66666666666666, 3, 1)

LC (length-controlled) win rate: alpaca-eval's `metrics.get_length_controlled_winrate`, given
EVERY annotation row as `main.evaluate` gives it (main.py:155-179): the length scale uses all
rows, the GLM trains on the parsed ones, the LC is the mean prediction over all rows
(glm_winrate.py:92-117). The official number needs the hub file `df_gamed.csv` and all 805
instructions in their canonical order (the GLM reads a row's position as its instruction id).
When either is missing we run the same function with the package's `length_controlled_minimal`
formula and label the result `lc_kind = "minimal-offline"`: it removes the length effect the
same way but is NOT the leaderboard's LC number, and every table says so.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile

GLM_OFFICIAL, GLM_MINIMAL = "length_controlled_v1", "length_controlled_minimal"


def _parsed(p) -> bool:
    return p is not None and not (isinstance(p, float) and math.isnan(p))


def _prefs(annotations: list[dict]):
    """The parsed rows, indexed by their position in `annotations`, and the unparsed count."""
    import pandas as pd

    keep = [i for i, a in enumerate(annotations) if _parsed(a.get("preference"))]
    df = pd.DataFrame([annotations[i] for i in keep], index=keep)
    return df, len(annotations) - len(keep)


def _frame(annotations: list[dict]):
    """Every row, preference NaN where unparsed, index = position: what `main.evaluate` hands the
    LC (its list of annotation dicts -> `utils.convert_to_dataframe`)."""
    import pandas as pd

    df = pd.DataFrame(annotations)
    df["preference"] = [float(a["preference"]) if _parsed(a.get("preference")) else math.nan for a in annotations]
    return df


def win_rate(annotations: list[dict]) -> dict:
    """alpaca-eval's `get_winrate`: mean(preference - 1) * 100 and its standard error (sem * 100)."""
    from alpaca_eval.metrics import get_winrate

    df, unparsed = _prefs(annotations)
    if df.empty:
        return {"win_rate": None, "standard_error": None, "n_total": 0, "unparsed": unparsed}
    out = {k: (float(v) if k in ("win_rate", "standard_error", "discrete_win_rate") else int(v))
           for k, v in get_winrate(df).items()}
    return {**out, "unparsed": unparsed}


def lc_win_rate(annotations: list[dict], full_evalset: bool, df_gamed: str | None, min_annotations: int = 10) -> dict:
    """{"lc_win_rate", "lc_kind": "official" | "minimal-offline" | "unavailable", "lc_note"}.

    `df_gamed`: a local copy of alpaca-eval's `df_gamed.csv`, or "hub": downloaded as alpaca-eval
    downloads it; when the download fails, the labelled minimal-offline fallback, the note saying
    why. `min_annotations` (`eval.lc_min_annotations`): the fallback needs this many parsed
    judgements (0 = alpaca-eval's rule: fit on whatever there is). A failed fit: "unavailable"."""
    n = sum(_parsed(a.get("preference")) for a in annotations)
    if n == 0:       # alpaca-eval would fit the gamed baselines alone and print a number about nothing
        return _unavailable("no judgement parsed: no LC")
    df = _frame(annotations)
    why = "no df_gamed.csv" if full_evalset else "not the full 805-instruction set"
    if full_evalset and df_gamed:
        path, note = df_gamed, "alpaca-eval length_controlled_v1 with a local df_gamed.csv"
        if df_gamed == "hub":
            note = "alpaca-eval length_controlled_v1, df_gamed.csv from the hub (alpaca-eval's loader)"
            try:
                path = _download_df_gamed()
            except Exception as e:  # offline: huggingface_hub's LocalEntryNotFoundError, ConnectionError, ...
                path, why = None, f"df_gamed.csv not reachable on the hub ({type(e).__name__})"
        if path:
            return _fit(df, path, GLM_OFFICIAL, "official", note)
    if n < min_annotations:
        return _unavailable(f"{why}; {n} parsed judgement(s), fewer than eval.lc_min_annotations = {min_annotations}")
    with _zero_difficulty_csv(len(df)) as path:
        return _fit(df, path, GLM_MINIMAL, "minimal-offline",
                    f"{why}: alpaca-eval's length_controlled_minimal GLM, not the leaderboard LC")


def _unavailable(note: str) -> dict:
    return {"lc_win_rate": None, "lc_kind": "unavailable", "lc_note": note[:300]}


def _fit(df, df_gamed_path: str, glm_name: str, kind: str, note: str) -> dict:
    """alpaca-eval's LC as `main.evaluate` computes it, minus writing GLM weights into site-packages
    (`save_weights_dir` only saves them: glm_winrate.py:120-131)."""
    from alpaca_eval.metrics import get_length_controlled_winrate

    try:
        with _local_hub_file(df_gamed_path):
            r = get_length_controlled_winrate(df, glm_name=glm_name, save_weights_dir=None,
                                              is_add_glm_preference_inplace=False)
        lc = float(r["length_controlled_winrate"])
        if not math.isfinite(lc):
            raise ValueError(f"the GLM predicted {lc}")
    except Exception as e:  # too few rows for its 5 folds, no length variance, a bad df_gamed.csv: never a number
        return _unavailable(f"{note}: the GLM fit failed: {type(e).__name__}: {e}")
    return {"lc_win_rate": lc, "lc_kind": kind, "lc_note": note}


def _download_df_gamed() -> str:
    """The hub download, with exactly alpaca-eval's arguments (glm_winrate.py:219-226)."""
    import alpaca_eval.metrics.glm_winrate as glm
    from alpaca_eval import constants

    return glm.hf_hub_download(repo_id="tatsu-lab/alpaca_eval", filename="df_gamed.csv", repo_type="dataset",
                               token=constants.DATASETS_TOKEN, force_download=constants.DATASETS_FORCE_DOWNLOAD,
                               cache_dir=constants.DEFAULT_CACHE_DIR)


@contextlib.contextmanager
def _zero_difficulty_csv(n: int):
    """A stand-in df_gamed.csv for the minimal GLM: `_get_featurized_data` always reads one to look
    up each row's `instruction_difficulty` (glm_winrate.py:219-238), but the minimal formula
    `np.tanh(std_delta_len) + not_gamed_baseline.astype(float) - 1` has no such term, and patsy
    builds the design matrices from the formula's terms only: the values cannot reach the fit or
    the prediction (tests/evaluation/test_metrics_parity.py checks it). Its other columns are only
    read by the regularised branch, which the minimal GLM does not take (lambda None)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "df_gamed.csv")
        with open(path, "w") as f:
            f.write("model,index,instruction_difficulty\n" + "".join(f"none,{i},0.0\n" for i in range(n)))
        yield path


@contextlib.contextmanager
def _local_hub_file(path: str):
    """alpaca-eval downloads df_gamed.csv from the hub unconditionally; hand it the local copy."""
    import alpaca_eval.metrics.glm_winrate as glm

    orig = glm.hf_hub_download
    glm.hf_hub_download = lambda *a, **k: path
    try:
        yield
    finally:
        glm.hf_hub_download = orig


# -- position bias ------------------------------------------------------------------------------
FORWARD = {2: "model", 1: "reference", 0: "draw"}     # model shown second
SWAPPED = {1: "model", 2: "reference", 0: "draw"}     # model shown first


def _outcomes(prefs: list[float], side: dict) -> list[str]:
    """alpaca-eval's discrete reading of a preference (helpers.py:122-123, ZeroOneScoringRule):
    1.5 and 0 are draws (helpers.py:25-26), the rest rounds to 1 or 2 -- the same split as
    `describe_head2head`'s win > 0.5 / loss < 0.5 after -1 (helpers.py:51-61)."""
    from alpaca_eval.metrics.helpers import ZeroOneScoringRule

    return [side[int(z)] for z in ZeroOneScoringRule().preprocess_predictions(prefs)]


def position_agreement(forward: list[dict], swapped: list[dict]) -> dict:
    """Same pairs judged reference-first and model-first (no random order). Each judgement's
    outcome is model / reference / draw; agreement = share of instructions with the same outcome
    both ways; a judge with no position bias gets 1.0.

    forward[i]["preference"]: 2 = model wins (model shown second); swapped[i]["preference"]:
    1 = model wins (model shown first); 1.5 or 0: a draw either way.

    >>> r = position_agreement(
    ...     [{"instruction": "a", "preference": 2.0}, {"instruction": "b", "preference": 1.5},
    ...      {"instruction": "c", "preference": 1.2}],
    ...     [{"instruction": "a", "preference": 1.0}, {"instruction": "b", "preference": 0},
    ...      {"instruction": "c", "preference": 1.1}])      # a: model both ways, b: draw both ways, c: differs
    >>> r["n"], r["agreement"], r["model_wins_forward"], r["model_wins_swapped"]
    (3, 0.6666666666666666, 1, 2)
    >>> r["draws_forward"], r["draws_swapped"]
    (1, 1)
    """
    sw = {a["instruction"]: a["preference"] for a in swapped if _parsed(a.get("preference"))}
    pairs = [(a["preference"], sw[a["instruction"]]) for a in forward
             if _parsed(a.get("preference")) and a["instruction"] in sw]
    if not pairs:
        return {"n": 0, "agreement": None, "model_wins_forward": 0, "model_wins_swapped": 0,
                "draws_forward": 0, "draws_swapped": 0}
    fwd = _outcomes([float(p) for p, _ in pairs], FORWARD)
    swp = _outcomes([float(q) for _, q in pairs], SWAPPED)
    return {"n": len(pairs), "agreement": sum(a == b for a, b in zip(fwd, swp)) / len(pairs),
            "model_wins_forward": fwd.count("model"), "model_wins_swapped": swp.count("model"),
            "draws_forward": fwd.count("draw"), "draws_swapped": swp.count("draw")}
