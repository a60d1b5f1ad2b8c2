"""Test-time-scaling tasks (docs/DESIGN.md step 11): a Stage-1 model refines held-out prompts for
R = 0..tts.rounds rounds, every intermediate answer is scored, and the curve (table + PNG)
goes into the store and onto the Prefect run as artifacts."""
from __future__ import annotations

import json

import avr_core.inference
import avr_core.scaling
import avr_core.scorers
from avr_core.backends import make_generator
from avr_core.backends.base import SamplingParams
from avr_core.scaling import plot_scaling, scaling_table, scored_rounds, to_csv, to_markdown
from avr_core.scorers import make_scorer
from avr_core.store import ArtifactRef, code_version
from tasks.common import (check_inputs, logger, model_artifacts, policy_identity, publish_plot, run_sharded,
                          stage_task, store_of)
from tasks.synthesis import _SYNTH, _Lazy, _ref

_CODE = code_version(avr_core.inference, avr_core.scaling, avr_core.scorers) + _SYNTH


def _section(cfg: dict, policy: dict) -> dict:
    return {"tts": cfg["tts"], "policy": policy_identity(policy), "generator": cfg["generator"],
            "scorer": cfg["scorer"], "shard_size": cfg["shard_size"]}


def tts_answers_ref(cfg, policy, prompts):
    return _ref(cfg, "tts_answers", _section(cfg, policy), [prompts], _CODE)


@stage_task(tts_answers_ref)
def tts_answers(cfg: dict, policy: dict, prompts: ArtifactRef) -> ArtifactRef:
    """Per shard: answer, then R rounds (one generator call per step for the whole shard), then
    ONE scorer call over the answer after every round of every prompt."""
    store, ref = store_of(cfg), tts_answers_ref(cfg, policy, prompts)
    gen = _Lazy(lambda: make_generator(policy, cfg["generator"]))
    scorer = _Lazy(lambda: make_scorer(cfg["scorer"]))
    s = cfg["tts"]["sampling"]
    params = SamplingParams(n=1, temperature=s["temperature"], top_p=s["top_p"],
                            max_new_tokens=s["max_new_tokens"], seed=s["seed"])

    def work(shard, i):
        recs, counts = scored_rounds(shard, gen.get(), scorer.get(), cfg["tts"]["rounds"], params)
        return {"records": recs}, counts
    return run_sharded(store, ref, _section(cfg, policy), [prompts], _CODE, lambda: store.read_records(prompts),
                       cfg["shard_size"], work, stats=gen.stats, models=model_artifacts(cfg, policy))


def tts_curve_ref(cfg, answers, label="stage-1 model"):
    return _ref(cfg, "tts_curve", {"label": label}, [answers], _CODE)


@stage_task(tts_curve_ref, retries=0, timeout_s=600)
def tts_curve(cfg: dict, answers: ArtifactRef, label: str = "stage-1 model") -> ArtifactRef:
    """Mean score ± spread and answer length per R: scaling.csv/.md/.json and scaling.png."""
    store, ref = store_of(cfg), tts_curve_ref(cfg, answers, label)
    if store.exists(ref):
        rows = store.manifest(ref)["result"]
        png = store.fs.cat_file(store.path(ref, "scaling.png"))
    else:
        check_inputs(store, ref, [answers])
        rows = scaling_table(store.read_records(answers))
        png = plot_scaling(rows, f"test-time scaling, {label}, scorer={cfg['scorer']['kind']}")
        w = store.writer(ref.stage, ref.key, {"label": label}, [answers], _CODE)
        w.write_file("scaling.json", json.dumps(rows, indent=2).encode())
        w.write_file("scaling.csv", to_csv(rows).encode())
        w.write_file("scaling.md", to_markdown(rows).encode())
        w.write_file("scaling.png", png)
        w.finalize(extra={"result": rows})
    logger().info("test-time scaling (%s):\n%s", cfg["scorer"]["kind"], to_markdown(rows))
    publish_plot(ref, "tts-curve", png, rows, "test-time scaling", to_markdown(rows))
    return ref
