"""Evaluation tasks (docs/DESIGN.md step 10): the eval set, every model's answers in alpaca-eval's
format, alpaca-eval judging with metrics, and the leaderboard every run appends to.

Cache keys: answers on (model artifact, eval set, sampling/R); judgements on (answers, eval
set, judge config). A nightly run whose models did not change judges nothing again.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from prefect import task

from avr_core.backends import make_generator
from avr_core.backends.base import SamplingParams
from avr_core.config import resolve_max_new_tokens
from avr_core.evaluation import leaderboard as lb
from avr_core.evaluation.evalset import load_evalset, resolve_evalset
from avr_core.evaluation.judge import annotate, judge_answers, model_outputs, reference_outputs, write_judge_config
from avr_core.inference import eval_answers as eval_answers_core
from avr_core.store import ArtifactRef, file_digest
from tasks.runtime import Backend, Output, Spec, logger, model_artifacts, policy_identity, publish, stage, store_of
from tasks.synthesis import resolve_data_path

SMOKE_TITLE = ("SMOKE RUN (tiny preset): 135M models judged by a 135M local judge -- shows the machinery "
               "works end to end; NOT a benchmark result")
SMOKE_LABEL = "SMOKE RUN (tiny preset): NOT a benchmark result"   # where the banner must be short: plot titles


def smoke_title(cfg: dict) -> str | None:
    """The banner over every table of a smoke run's numbers (`eval.smoke`: the tiny preset): the
    leaderboard, test-time scaling, the per-iteration table. None for a real run."""
    return SMOKE_TITLE if cfg["eval"]["smoke"] else None


def _evalset(cfg: dict, fetch: bool = False) -> tuple[str, str]:
    """(path, fallback note): eval.prompts, or with eval.references=hub AlpacaEval 2's GPT-4 Turbo
    references from the hub (the cache unless `fetch`), else eval.prompts, labelled -- only where
    eval.allow_example_references says so (tiny); else the InputError (paper: AlpacaEval 2 or nothing)."""
    e = cfg["eval"]
    return resolve_evalset(resolve_data_path(e["prompts"]), e["references"], fetch,
                           allow_fallback=e.get("allow_example_references", False))


def eval_prompts_spec(cfg) -> Spec:
    path, note = _evalset(cfg)     # keyed on the file actually used: a fallback never stands in for the hub's
    return Spec("eval_prompts", {"file_sha256": file_digest(path)[:16], "slice": list(cfg["eval"]["slice"]),
                                 "references": cfg["eval"]["references"], "fallback": bool(note)})


def validate_evalset(cfg: dict) -> int:
    """Read and check the whole eval file (InputError names file, row/line and field); with
    eval.references=hub, download the references first (unreachable: an InputError, or one
    warning line when eval.allow_example_references)."""
    path, note = _evalset(cfg, fetch=True)
    if note:
        logger().warning("eval.references=hub: %s", note)
    return len(load_evalset(path))


@stage(eval_prompts_spec, retries=0, timeout_s=600)
def eval_prompts(out: Output, cfg: dict) -> None:
    """The [start, stop) slice `eval.slice` of the validated eval set, with its references."""
    path, note = _evalset(cfg)
    if note:
        logger().warning("eval.references=hub: %s", note)
    rows = load_evalset(path)
    start, stop = cfg["eval"]["slice"]
    chosen = rows[start:stop]
    counts = {"file_rows": len(rows), **({"references_fallback": 1} if note else {})}
    out.shards(lambda: chosen, max(1, len(chosen)), lambda shard, i: ({"records": shard}, counts))


# -- answers ----------------------------------------------------------------------------------
def eval_answers_spec(cfg, policy, name, mode, rounds, prompts) -> Spec:
    e = cfg["eval"]
    section = {"model": name, "mode": mode, "rounds": rounds,
               "policy": policy_identity(policy, cfg["generator"]), "sampling": e["sampling"],
               "generator": cfg["generator"], "shard_size": cfg["shard_size"],
               **({"extract": e["extract"], "final_answer_tries": e["final_answer_tries"]}
                  if mode == "thought" else {})}
    return Spec("eval_answers", section, (prompts,), tuple(model_artifacts(cfg, policy)))


@stage(eval_answers_spec)
def eval_answers(out: Output, cfg: dict, policy: dict, name: str, mode: str, rounds: int,
                 prompts: ArtifactRef) -> None:
    """Every prompt answered (never dropped): Stage-1/seed models with `rounds` explicit refinement
    rounds, Stage-2 models with one thought whose final answer is extracted (fallbacks recorded).
    Also writes `model_outputs.json` in alpaca-eval's format (`alpaca_eval --model_outputs` reads it)."""
    gen = Backend(lambda: make_generator(policy, cfg["generator"]))
    tok: dict = {}          # the policy's tokenizer, loaded on the first miss (None: lengths in characters only)
    s = cfg["eval"]["sampling"]
    params = SamplingParams(n=1, temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"],
                            max_new_tokens=resolve_max_new_tokens(s["max_new_tokens"], cfg["generator"]))

    def tokens(text):
        if "t" not in tok:
            tok["t"] = _tokenizer(policy)
        return len(tok["t"].encode(text, add_special_tokens=False)) if tok["t"] is not None else None

    def work(shard, i):
        recs, counts = eval_answers_core(shard, gen, name, mode, rounds, params, tokens,
                                         cfg["eval"]["extract"], cfg["eval"]["final_answer_tries"])
        return {"records": recs}, counts
    out.shards(lambda: out.store.read_records(prompts), cfg["shard_size"], work, stats=gen.stats)
    outputs = [{k: r[k] for k in ("instruction", "output", "generator", "dataset")}   # alpaca-eval's own format
               for r in out.committed_records()]
    out.write_file("model_outputs.json", json.dumps(outputs, indent=2, ensure_ascii=False).encode())


def _tokenizer(policy: dict):
    try:
        from transformers import AutoTokenizer

        from avr_core.model_refs import resolve_model_path
        return AutoTokenizer.from_pretrained(resolve_model_path(policy["path"]))
    except Exception:   # e.g. an OpenAI-served model with no local files: lengths in characters only
        return None


# -- judging ----------------------------------------------------------------------------------
def judge_spec(cfg, answers, prompts) -> Spec:
    e = cfg["eval"]
    section = {"judge": e["judge"], "position_bias_n": e["position_bias_n"], "df_gamed": e["df_gamed"],
               "lc_min_annotations": e["lc_min_annotations"]}
    return Spec("eval_judge", section, (answers, prompts))


@stage(judge_spec, retries=2, timeout_s=12 * 3600)
def judge(out: Output, cfg: dict, answers: ArtifactRef, prompts: ArtifactRef) -> None:
    """alpaca-eval pairwise judging against the references -> annotations + WR ± se, LC, length,
    and a position-bias check on the first `position_bias_n` instructions. A local judge that
    loads on CUDA first suspends the run's engines (kept ones sleep and wake at their role's next
    turn) and logs what it did (avr_core/evaluation/judge.py `_load`): it never squeezes in beside them."""
    store, jcfg = out.store, cfg["eval"]["judge"]
    # alpaca-eval reads its config and writes its cache as LOCAL files. A local store: the config in
    # the artifact, the cache in <store>/.work/judge_cache (survives a retry of this task). An object
    # store: both in a local directory keyed by the artifact key (a retry on this machine reuses the
    # cache); the config files are then uploaded into the artifact, so it holds the same files.
    if store.remote:
        from avr_core.store import artifact_cache_dir
        local = os.path.join(artifact_cache_dir(), ".work", f"{out.ref.stage}-{out.ref.key}")
        judge_dir, cache = os.path.join(local, "judge"), os.path.join(local, "judge_cache.json")
        os.makedirs(local, exist_ok=True)
    else:
        judge_dir, cache = out.dir + "/judge", store.path(".work", "judge_cache", f"{out.ref.key}.json")
        store.fs.makedirs(cache.rsplit("/", 1)[0], exist_ok=True)
    config_path = write_judge_config(judge_dir, jcfg)          # never into site-packages
    if store.remote:
        for f in sorted(p for p in Path(judge_dir).rglob("*") if p.is_file()):
            out.write_file(f"judge/{f.relative_to(judge_dir).as_posix()}", f.read_bytes())
        out.after.append(lambda: shutil.rmtree(local, ignore_errors=True))
    answered = store.read_records(answers)
    model = model_outputs(answered)
    reference = reference_outputs(store.read_records(prompts))
    fixed = cache.replace(".json", ".fixed-order.json")   # own cache: the main pass randomises the order

    passes, done = out.progress(1 + bool(cfg["eval"]["position_bias_n"]), "judging passes"), []

    def annotate_fn(outputs_2, outputs_1, randomize):
        annotated = annotate(outputs_2, outputs_1, config_path, cache if randomize else fixed, jcfg,
                             randomize_order=randomize)
        done.append(randomize)
        passes.update(len(done))             # the main pass, then the position-bias pass
        return annotated
    t0 = time.time()
    ann, result = judge_answers(model, reference, annotate_fn, jcfg, cfg["eval"]["position_bias_n"],
                                cfg["eval"]["df_gamed"], lc_min_annotations=cfg["eval"]["lc_min_annotations"])
    # Stage-2 answers: the prompts the authors' eval script would have dropped (we never drop one)
    drop = sum(bool(r.get("authors_would_drop")) for r in answered) if any("tries" in r for r in answered) else None
    result = {**result, "judge_s": round(time.time() - t0, 1), "authors_would_drop": drop}
    bias = result["position_bias"]
    out.commit({"annotations": ann}, {"annotations": len(ann), "unparsed_judgements": result["unparsed"]})
    out.write_file("metrics.json", json.dumps(result, indent=2).encode())
    out.extra["result"] = result
    logger().info("judge %s vs %s: WR %s ± %s, LC %s (%s), avg len %.0f, position agreement %s%s",
                  result["model"], result["reference"], result["win_rate"], result["standard_error"],
                  result["lc_win_rate"], result["lc_kind"], result["avg_len_chars"], bias and bias["agreement"],
                  "" if drop is None else f", {drop} prompt(s) the authors' rule would have dropped (kept)")


# -- leaderboard ------------------------------------------------------------------------------
def read_leaderboard(store_root: str) -> list[dict]:
    from avr_core.store import Store

    return lb.read(Store(store_root))      # the row files (append-only), never the CSV view


@task(name="leaderboard", retries=0)
def leaderboard(cfg: dict, run_id: str, judged: dict[str, ArtifactRef], stages: dict[str, tuple],
                iteration: int = 0) -> str:
    """Append this run's rows (one per evaluated model) to `<store>/leaderboard/` (one new row file;
    the CSV and markdown views are rewritten), publish the table on the Prefect run, and return
    the markdown. A model whose judged artifact is already a row (a cached rerun) adds none: the
    run's table shows that row, of the run that computed it."""
    store = store_of(cfg)
    new = []
    for name, ref in judged.items():
        r = store.manifest(ref)["result"]
        new.append({"date": time.strftime("%Y-%m-%d %H:%M"), "run": run_id, "iteration": iteration,
                    "model": name, "stage": stages[name][0],
                    "R": stages[name][1], "n": r["n_total"], "win_rate": r["win_rate"], "se": r["standard_error"],
                    "lc": r["lc_win_rate"], "lc_kind": r["lc_kind"], "avg_len": r["avg_len_chars"],
                    "judge": r["annotator"], "evalset": cfg["eval"]["prompts"].rsplit("/", 1)[-1],
                    "artifact": str(ref)})
    again = lb.reused(lb.read(store), new)          # a cached rerun: its results are already rows
    fresh = [r for r in new if r["artifact"] not in {a["artifact"] for a in again}]
    for r in again:
        logger().info(f"leaderboard: {r['model']} reuses the row of run {r['run']} (the same judged artifact "
                      f"{r['artifact']}); no row added")
    md = lb.append(store, fresh, smoke_title(cfg))  # append-only: no row lost
    publish(store.ref("leaderboard", "leaderboard.csv"), "avr-leaderboard", table=[*again, *fresh], markdown=md)
    return md
