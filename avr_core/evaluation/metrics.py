"""Win rate, length-controlled win rate and a position-bias check, with alpaca-eval's own code.

Annotations are those of `judge.annotate`: `preference` in [1, 2] (2 = the model beats the
reference), or None where the judge's answer could not be parsed (counted, then left out).

    >>> ann = [{"preference": 2.0}, {"preference": 2.0}, {"preference": 1.0}, {"preference": None}]
    >>> r = win_rate(ann); r["win_rate"], r["n_total"], r["unparsed"]
    (66.66666666666666, 3, 1)

LC (length-controlled) win rate: alpaca-eval's GLM (`metrics.get_length_controlled_winrate`).
The official number needs the package's hub file `df_gamed.csv` and all 805 instructions in
their canonical order (the GLM indexes instructions by row). When either is missing we fit
the package's own `length_controlled_minimal` GLM formula with its own fitting helpers and
label the result `lc_kind = "minimal-offline"`: it removes the length effect the same way but
is NOT the leaderboard's LC number, and every table says so.
"""
from __future__ import annotations

import contextlib


def _prefs(annotations: list[dict]):
    import pandas as pd

    keep = [i for i, a in enumerate(annotations) if a.get("preference") is not None]
    # the index is the instruction's position: alpaca-eval's LC GLM reads it as the instruction id
    # (`_get_featurized_data`: reset_index -> "index" -> instruction_difficulty), so an unparsed row
    # must not shift the ones after it
    df = pd.DataFrame([annotations[i] for i in keep], index=keep)
    return df, len(annotations) - len(keep)


def win_rate(annotations: list[dict]) -> dict:
    """alpaca-eval's `get_winrate`: mean(preference - 1) * 100 and its standard error (sem * 100)."""
    from alpaca_eval.metrics import get_winrate

    df, unparsed = _prefs(annotations)
    if df.empty:
        return {"win_rate": None, "standard_error": None, "n_total": 0, "unparsed": unparsed}
    out = {k: (float(v) if k in ("win_rate", "standard_error", "discrete_win_rate") else int(v))
           for k, v in get_winrate(df).items()}
    return {**out, "unparsed": unparsed}


def lc_win_rate(annotations: list[dict], full_evalset: bool, df_gamed: str | None) -> dict:
    """{"lc_win_rate", "lc_kind": "official" | "minimal-offline" | "unavailable", "lc_note"}.

    `df_gamed`: a local copy of alpaca-eval's `df_gamed.csv`, or "hub": alpaca-eval's own loader
    (`hf_hub_download` inside `get_length_controlled_winrate`); when that cannot reach the hub,
    the labelled minimal-offline fallback, the note saying why."""
    df, _ = _prefs(annotations)
    why = "no df_gamed.csv" if full_evalset else "not the full 805-instruction set"
    if full_evalset and df_gamed:
        from alpaca_eval.metrics import get_length_controlled_winrate

        def official():
            return get_length_controlled_winrate(df, save_weights_dir=None, is_add_glm_preference_inplace=False)
        if df_gamed == "hub":
            try:
                r = official()
            except Exception as e:  # offline: huggingface_hub's LocalEntryNotFoundError, ConnectionError, ...
                r, why = None, f"df_gamed.csv not reachable on the hub ({type(e).__name__})"
            note = "alpaca-eval length_controlled_v1, df_gamed.csv from the hub (alpaca-eval's loader)"
        else:
            with _local_hub_file(df_gamed):
                r = official()
            note = "alpaca-eval length_controlled_v1 with a local df_gamed.csv"
        if r is not None:
            return {"lc_win_rate": float(r["length_controlled_winrate"]), "lc_kind": "official", "lc_note": note}
    try:
        return {"lc_win_rate": _minimal_glm(df), "lc_kind": "minimal-offline",
                "lc_note": f"{why}: alpaca-eval's length_controlled_minimal GLM, not the leaderboard LC"}
    except Exception as e:  # too few rows or no variance: say so, never print a number
        return {"lc_win_rate": None, "lc_kind": "unavailable", "lc_note": f"{why}; minimal GLM failed: {e}"[:300]}


def _minimal_glm(df) -> float:
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    d = df.reset_index(drop=True)
    delta = d["output_1"].str.len() - d["output_2"].str.len()
    if len(d) < 10 or delta.std() == 0:
        raise ValueError(f"{len(d)} annotations; needs >= 10 with varying lengths")
    X = pd.DataFrame({"preference": d["preference"].astype(float) - 1,
                      "std_delta_len": delta / delta.std(), "not_gamed_baseline": True})
    test = pd.DataFrame({"not_gamed_baseline": [True] * len(X), "std_delta_len": 0.0})
    info = GLM_INFO["length_controlled_minimal"]
    train, Xtest = make_dmatrix_for_model(X, test, formula=info["formula"])
    model = fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, **info["kwargs"])
    return float(model.predict_proba(Xtest)[:, 1].mean() * 100)


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


def position_agreement(forward: list[dict], swapped: list[dict]) -> dict:
    """Same pairs judged reference-first and model-first (no random order). Agreement = share of
    instructions whose winner is the same both ways; a judge with no position bias gets 1.0.

    forward[i]["preference"]: 2 = model wins (model shown second); swapped[i]["preference"]:
    1 = model wins (model shown first).

    >>> position_agreement([{"instruction": "a", "preference": 2.0}, {"instruction": "b", "preference": 1.2}],
    ...                    [{"instruction": "a", "preference": 1.0}, {"instruction": "b", "preference": 1.1}])
    {'n': 2, 'agreement': 0.5, 'model_wins_forward': 1, 'model_wins_swapped': 2}
    """
    sw = {a["instruction"]: a["preference"] for a in swapped if a.get("preference") is not None}
    pairs = [(a["preference"], sw[a["instruction"]]) for a in forward
             if a.get("preference") is not None and a["instruction"] in sw]
    if not pairs:
        return {"n": 0, "agreement": None, "model_wins_forward": 0, "model_wins_swapped": 0}
    fwd = [p > 1.5 for p, _ in pairs]
    swp = [q < 1.5 for _, q in pairs]
    return {"n": len(pairs), "agreement": sum(a == b for a, b in zip(fwd, swp)) / len(pairs),
            "model_wins_forward": sum(fwd), "model_wins_swapped": sum(swp)}
