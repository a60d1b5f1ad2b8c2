"""The learning-signal task: paired scorer difference between two models on held-out prompts."""
from __future__ import annotations

import json

from avr_core.learning_signal import (
    clustered_difference,
    cut_at_cap,
    paired_difference,
    per_constraint,
    prompt_topics,
    refinement_outcomes,
    signal_markdown,
    template_rule,
    unasked_formats,
)
from avr_core.store import ArtifactRef
from tasks.runtime import Output, Spec, logger, scorer_identity, stage, store_of


def learning_signal_spec(cfg: dict, base: ArtifactRef, trained: ArtifactRef) -> Spec:
    return Spec("signal", {}, (base, trained))


@stage(learning_signal_spec, retries=0, timeout_s=600)
def learning_signal(out: Output, cfg: dict, base: ArtifactRef, trained: ArtifactRef) -> None:
    """mean(r(trained) - r(base)) over held-out prompts, with its spread; written as signal.json."""
    score = lambda r: {x["id"]: x["answer_score"] for x in out.store.read_records(r)}  # noqa: E731
    result = {"base": str(base), "trained": str(trained), "scorer": cfg["scorer"]["kind"],
              **paired_difference(score(base), score(trained))}
    out.write_file("signal.json", json.dumps(result, indent=2).encode())
    out.extra["result"] = result
    logger().info("learning signal (%s scorer): mean diff %+.4f ± %.4f (se), 95%% CI %s, n=%d, trained better on %d",
                  result["scorer"], result["mean_diff"], result["se"], result["ci95"], result["n"], result["b_better"])


def signal_report_spec(cfg: dict, comparisons: dict, tts_answers: ArtifactRef | None, heldout: dict,
                       synthesis: dict, trained: dict) -> Spec:
    refs = (*comparisons.values(), *([tts_answers] if tts_answers else []), *heldout.values(),
            *(r for pair in synthesis.values() for r in pair), *trained.values())
    names = [list(comparisons), list(heldout), list(synthesis), list(trained)]
    return Spec("signal_report", {"scorer": scorer_identity(cfg["scorer"]), "names": names}, refs)


@stage(signal_report_spec, retries=0, timeout_s=1800)
def signal_report(out: Output, cfg: dict, comparisons: dict, tts_answers: ArtifactRef | None, heldout: dict,
                  synthesis: dict, trained: dict) -> None:
    """The `signal` preset's report (report.md, report.json): the held-out paired differences, the
    test-time-scaling curve with paired CIs against R = 0, per-constraint satisfaction of each
    model (`rules` scorer), and per synthesis how often refinements beat y0 and what `select` kept.

    comparisons: name -> `learning_signal` ref; tts_answers: None = no test-time scaling in this
    run; heldout: model -> its scored held-out answers; synthesis: name -> (rm_score ref, select
    ref); trained: name -> trained model ref (its optimizer steps are reported)."""
    st = out.store
    tts = st.read_records(tts_answers) if tts_answers else []
    rounds = min((len(r["scores"]) for r in tts), default=0)
    r0 = {r["id"]: r["scores"][0] for r in tts}
    rows = []
    for R in range(rounds):
        rR = {r["id"]: r["scores"][R] for r in tts}
        words = [len(r["answers"][R].split()) for r in tts]
        rows.append({"R": R, "n": len(tts), "mean": sum(rR.values()) / len(rR), "mean_words": sum(words) / len(words),
                     "vs_r0": paired_difference(r0, rR)})
    answered = {name: st.read_records(ref) for name, ref in heldout.items()}
    checks, formats = {}, {}
    if cfg["scorer"]["kind"] == "rules":
        from avr_core.scorers import make_scorer
        scorer = make_scorer(cfg["scorer"])
        judge = lambda records, answer: [  # noqa: E731  (answer, [(constraint id, met)]) per prompt
            (answer(r), [(cid, ok) for (cid, _), ok in zip(scorer.constraints[r["messages"][-1]["content"].strip()],
                                                           scorer.check(r["messages"][-1]["content"], answer(r)))])
            for r in records]
        for name, records in answered.items():
            judged = judge(records, lambda r: r["answer"])
            checks[name] = per_constraint([v for _, vs in judged for v in vs])
            if not name.endswith("(heldout_extra)"):     # the unasked formats: on the headline set only
                formats[name] = unasked_formats(judged)
        if rounds > 1:
            checks[f"stage1 R={rounds - 1}"] = per_constraint(
                [v for _, vs in judge(tts, lambda r: r["answers"][rounds - 1]) for v in vs])
    report = {"scorer": cfg["scorer"]["kind"], "heldout": len(next(iter(answered.values()))),
              "comparisons": _with_clustered_ci(st, cfg, comparisons, heldout, answered),
              "tts": rows, "per_constraint": checks, "formats": formats,
              "template": template_rule(formats["seed"], formats["stage1"]) if {"seed", "stage1"} <= set(formats)
              else {},
              "synthesis": {name: {"outcomes": refinement_outcomes(st.read_records(scored)),
                                   "select_counts": st.manifest(sel)["counts"]}
                            for name, (scored, sel) in synthesis.items()},
              "training": {name: _steps(st.manifest(ref).get("train", {})) for name, ref in trained.items()}}
    report["cut_at_cap"] = cut_at_cap(ancestors(st, [*heldout.values(), *([tts_answers] if tts_answers else []),
                                                     *(r for pair in synthesis.values() for r in pair)]))
    md = signal_markdown(report)
    out.write_file("report.json", json.dumps(report, indent=2).encode())
    out.write_file("report.md", md.encode())
    out.extra["result"] = {k: report[k] for k in ("comparisons", "tts")}
    logger().info("signal report:\n%s", md)


def _with_clustered_ci(st, cfg: dict, comparisons: dict, heldout: dict, answered: dict) -> dict:
    """Each comparison's stored result plus its bootstrap clustered by topic (None where the prompt
    file's rows carry no `topic`), from the scored held-out answers it was computed on."""
    scores = {str(ref): {x["id"]: x["answer_score"] for x in answered[name]} for name, ref in heldout.items()}
    topics = prompt_topics(_raw_rows(cfg["data"]["prompts"]))
    out = {}
    for name, ref in comparisons.items():
        d = st.manifest(ref)["result"]
        out[name] = {**d, **clustered_difference(scores.get(d.get("base")), scores.get(d.get("trained")), topics)}
    return out


def _raw_rows(path: str) -> list[dict]:
    """The prompt file's rows as written (their `topic` included, which `load_prompts` does not keep);
    [] for anything but a local .jsonl file (no topics: no clustered CI)."""
    from pathlib import Path

    from tasks.synthesis import resolve_data_path

    p = Path(resolve_data_path(path))
    if p.suffix != ".jsonl" or not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _steps(summary: dict) -> dict:
    """What a training really did, from its model's `train` summary (avr_core/training/recipe.py)."""
    return {k: summary.get(k) for k in ("examples", "steps", "planned_steps", "final_loss")}


def ancestors(store, refs: list[ArtifactRef]) -> dict[str, dict]:
    """artifact -> manifest for `refs` and every artifact they were made from (their lineage)."""
    seen: dict[str, dict] = {}
    todo = [str(r) for r in refs]
    while todo:
        a = todo.pop()
        if a in seen or not store.exists(store.ref(*a.split("/", 1))):
            continue
        seen[a] = store.manifest(store.ref(*a.split("/", 1)))
        todo += seen[a].get("inputs", [])
    return dict(sorted(seen.items()))


def read_report(cfg: dict, report: ArtifactRef) -> str:
    """report.md of a `signal_report` artifact."""
    st = store_of(cfg)
    return st.fs.cat_file(st.path(report, "report.md")).decode()
