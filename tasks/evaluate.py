"""Evaluation tasks (docs/DESIGN.md step 10): the eval set, every model's answers in alpaca-eval's
format, alpaca-eval judging with metrics, and the leaderboard every run appends to.

Cache keys: answers on (model artifact, eval set, sampling/R); judgements on (answers, eval
set, judge config). A nightly run whose models did not change judges nothing again.
"""
from __future__ import annotations

import json
import time

from prefect import task

import avr_core.evaluation.evalset
import avr_core.evaluation.judge
import avr_core.evaluation.metrics
import avr_core.inference
from avr_core.backends import make_generator
from avr_core.backends.base import SamplingParams
from avr_core.evaluation import leaderboard as lb
from avr_core.evaluation.evalset import load_evalset
from avr_core.evaluation.judge import (annotate, judge_answers, model_outputs, reference_outputs,
                                       write_judge_config)
from avr_core.inference import eval_answers as eval_answers_core
from avr_core.store import ArtifactRef, code_version, file_digest
from tasks.common import (check_inputs, logger, model_artifacts, policy_identity, publish, run_sharded,
                          stage_task, store_of)
from tasks.synthesis import _Lazy, _ref, resolve_data_path

_EVALSET = code_version(avr_core.evaluation.evalset)
_GEN = code_version(avr_core.inference, avr_core.evaluation.evalset)
_JUDGE = code_version(avr_core.evaluation.judge, avr_core.evaluation.metrics)
SMOKE_TITLE = ("SMOKE RUN (tiny preset): 135M models judged by a 135M local judge -- shows the machinery "
               "works end to end; NOT a benchmark result")


def _evalset_section(cfg: dict) -> dict:
    path = resolve_data_path(cfg["eval"]["prompts"])
    return {"file_sha256": file_digest(path)[:16], "slice": list(cfg["eval"]["slice"])}


def eval_prompts_ref(cfg):
    return _ref(cfg, "eval_prompts", _evalset_section(cfg), [], _EVALSET)


def validate_evalset(cfg: dict) -> int:
    """Read and check the whole eval file (InputError names file, row/line and field)."""
    return len(load_evalset(resolve_data_path(cfg["eval"]["prompts"])))


@stage_task(eval_prompts_ref, retries=0, timeout_s=600)
def eval_prompts(cfg: dict) -> ArtifactRef:
    """The [start, stop) slice `eval.slice` of the validated eval set, with its references."""
    rows = load_evalset(resolve_data_path(cfg["eval"]["prompts"]))
    start, stop = cfg["eval"]["slice"]
    chosen = rows[start:stop]
    return run_sharded(store_of(cfg), eval_prompts_ref(cfg), _evalset_section(cfg), [], _EVALSET,
                       lambda: chosen, max(1, len(chosen)), lambda shard, i: ({"records": shard}, {"file_rows": len(rows)}))


# -- answers ----------------------------------------------------------------------------------
def _gen_section(cfg, policy, name, mode, rounds):
    return {"model": name, "mode": mode, "rounds": rounds, "policy": policy_identity(policy),
            "sampling": cfg["eval"]["sampling"], "generator": cfg["generator"], "shard_size": cfg["shard_size"]}


def eval_answers_ref(cfg, policy, name, mode, rounds, prompts):
    return _ref(cfg, "eval_answers", _gen_section(cfg, policy, name, mode, rounds), [prompts], _GEN)


@stage_task(eval_answers_ref)
def eval_answers(cfg: dict, policy: dict, name: str, mode: str, rounds: int, prompts: ArtifactRef) -> ArtifactRef:
    """Every prompt answered (never dropped): Stage-1/seed models with `rounds` explicit refinement
    rounds, Stage-2 models with one thought whose final answer is extracted (fallbacks recorded).
    Also writes `model_outputs.json` in alpaca-eval's format (`alpaca_eval --model_outputs` reads it)."""
    store, section = store_of(cfg), _gen_section(cfg, policy, name, mode, rounds)
    ref = eval_answers_ref(cfg, policy, name, mode, rounds, prompts)
    gen = _Lazy(lambda: make_generator(policy, cfg["generator"]))
    tok: dict = {}          # the policy's tokenizer, loaded on the first miss (None: lengths in characters only)
    s = cfg["eval"]["sampling"]
    params = SamplingParams(n=1, temperature=s["temperature"], top_p=s["top_p"], max_new_tokens=s["max_new_tokens"],
                            seed=s["seed"])

    def tokens(text):
        if "t" not in tok:
            tok["t"] = _tokenizer(policy)
        return len(tok["t"].encode(text, add_special_tokens=False)) if tok["t"] is not None else None

    def work(shard, i):
        recs, counts = eval_answers_core(shard, gen.get(), name, mode, rounds, params, tokens)
        return {"records": recs}, counts

    def finish(w):   # alpaca-eval's own format, exactly the keys its loader reads
        outputs = [{k: r[k] for k in ("instruction", "output", "generator", "dataset")} for r in w.committed_records()]
        w.write_file("model_outputs.json", json.dumps(outputs, indent=2, ensure_ascii=False).encode())
    return run_sharded(store, ref, section, [prompts], _GEN, lambda: store.read_records(prompts), cfg["shard_size"],
                       work, stats=gen.stats, finish=finish, models=model_artifacts(cfg, policy))


def _tokenizer(policy: dict):
    try:
        from transformers import AutoTokenizer

        from avr_core.models import resolve_model_path
        return AutoTokenizer.from_pretrained(resolve_model_path(policy["path"]))
    except Exception:   # e.g. an OpenAI-served model with no local files: lengths in characters only
        return None


# -- judging ----------------------------------------------------------------------------------
def _judge_section(cfg):
    e = cfg["eval"]
    return {"judge": e["judge"], "position_bias_n": e["position_bias_n"], "df_gamed": e["df_gamed"]}


def judge_ref(cfg, answers, prompts):
    return _ref(cfg, "eval_judge", _judge_section(cfg), [answers, prompts], _JUDGE)


@stage_task(judge_ref, retries=2, timeout_s=12 * 3600)
def judge(cfg: dict, answers: ArtifactRef, prompts: ArtifactRef) -> ArtifactRef:
    """alpaca-eval pairwise judging against the references -> annotations + WR ± se, LC, length,
    and a position-bias check on the first `position_bias_n` instructions."""
    store, ref = store_of(cfg), judge_ref(cfg, answers, prompts)
    if store.exists(ref):
        return ref
    check_inputs(store, ref, [answers, prompts])
    jcfg = cfg["eval"]["judge"]
    w = store.writer(ref.stage, ref.key, _judge_section(cfg), [answers, prompts], _JUDGE)
    config_path = write_judge_config(w.dir + "/judge", jcfg)          # in the store, never site-packages
    cache = store.path(".work", "judge_cache", f"{ref.key}.json")       # survives a retry of this task
    store.fs.makedirs(cache.rsplit("/", 1)[0], exist_ok=True)
    model = model_outputs(store.read_records(answers))
    reference = reference_outputs(store.read_records(prompts))
    fixed = cache.replace(".json", ".fixed-order.json")   # own cache: the main pass randomises the order

    def annotate_fn(outputs_2, outputs_1, randomize):
        return annotate(outputs_2, outputs_1, config_path, cache if randomize else fixed, jcfg,
                        randomize_order=randomize)
    t0 = time.time()
    ann, result = judge_answers(model, reference, annotate_fn, jcfg, cfg["eval"]["position_bias_n"],
                                cfg["eval"]["df_gamed"])
    result = {**result, "judge_s": round(time.time() - t0, 1)}
    bias = result["position_bias"]
    w.commit_shard(0, {"annotations": ann}, {"annotations": len(ann), "unparsed_judgements": result["unparsed"]})
    w.write_file("metrics.json", json.dumps(result, indent=2).encode())
    logger().info("judge %s vs %s: WR %s ± %s, LC %s (%s), avg len %.0f, position agreement %s",
                  result["model"], result["reference"], result["win_rate"], result["standard_error"],
                  result["lc_win_rate"], result["lc_kind"], result["avg_len_chars"], bias and bias["agreement"])
    return w.finalize(extra={"result": result})


# -- leaderboard ------------------------------------------------------------------------------
def read_leaderboard(store_root: str) -> list[dict]:
    from avr_core.store import Store

    s = Store(store_root)
    path = s.path("leaderboard", "leaderboard.csv")
    return lb.from_csv(s.fs.cat_file(path).decode()) if s.fs.exists(path) else []


@task(name="leaderboard", retries=0)
def leaderboard(cfg: dict, run_id: str, judged: dict[str, ArtifactRef], stages: dict[str, tuple]) -> str:
    """Append this run's rows (one per evaluated model) to `<store>/leaderboard/` (CSV + markdown),
    publish the table on the Prefect run, and return the markdown."""
    store = store_of(cfg)
    new = []
    for name, ref in judged.items():
        r = store.manifest(ref)["result"]
        new.append({"date": time.strftime("%Y-%m-%d %H:%M"), "run": run_id, "model": name, "stage": stages[name][0],
                    "R": stages[name][1], "n": r["n_total"], "win_rate": r["win_rate"], "se": r["standard_error"],
                    "lc": r["lc_win_rate"], "lc_kind": r["lc_kind"], "avg_len": r["avg_len_chars"],
                    "judge": r["annotator"], "evalset": cfg["eval"]["prompts"].rsplit("/", 1)[-1], "artifact": str(ref)})
    md = lb.append(store, new, SMOKE_TITLE if cfg["eval"]["smoke"] else None)   # locked: no row lost
    publish(store.ref("leaderboard", "leaderboard.csv"), "avr-leaderboard", table=new, markdown=md)
    return md
