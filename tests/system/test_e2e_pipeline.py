"""The README's main job, shrunk, on the path GPU nodes run (issue 22): the whole pipeline on the
real SmolLM2, sampled by the `vllm` generator and scored by the `vllm_judge` scorer (vLLM's CPU
build, engines in this process, kept from stage to stage) with DeepSpeed training on CPU --
stage 1 (synthesis, RSFT, synthesis with the RSFT policy, reference log-probs, DPO), the learning
signal, stage 2 (greedy search, thoughts, CoT RSFT, sampled thoughts, thought pairs, DPO) and
test-time scaling and the AlpacaEval evaluation of all four models by the local judge -- then a
rerun that is a full cache hit, loads no model and adds no row to the leaderboard (it reuses the first run's). The
engines go through the factory's cache, the generator<->scorer switches of search, thought
sampling and test-time scaling, the release at training and at the run's end (no EngineCore
process outlives the run). The HF generator runs the whole pipeline in tests/system/test_e2e_pipeline_s3.py
(evaluation answers) and every stage in tests/flows on small models."""
import json
import os

import psutil
import pytest

os.environ["AVR_RETRY_DELAY_S"] = "0"

from avr_core.store import Store  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.usefixtures("prefect_harness")]
VLLM = ["generator.kind=vllm", "scorer.kind=vllm_judge"]   # tiny.yaml keeps both engines, eager, 1 GiB KV each

# stage1_po: 6 prompts. With 3, the RSFT policy's synthesis once left no pair at all (3 critiques
# without improvement; CI, 7 December 2026): a 135M judge's ratings are nearly flat, so pairs are
# chance, and the run then stops at train_po by design ("no training rows"). Likewise stage2_po: a
# prompt gives a thought pair only if a better-rated thought's final answer is no longer than the
# worst's (the length rule), about 2 in 3 with 3 samples; with 2 prompts CI once got none (7 December
# 2026), with 6 the chance of none is about 1 in 700.
SMALL = ["data.stage1_sft=[0,3]", "data.stage1_po=[3,9]", "data.heldout=[40,42]", "shard_size=3",
         "critique.max_tries=1", "respond.sampling.max_new_tokens=24", "critique.sampling.max_new_tokens=24",
         "refine.sampling.max_new_tokens=24", "scorer.max_length=512",
         "rsft.step_cap=1", "rsft.micro_batch_size=1", "rsft.checkpoint_every=1",
         "po.step_cap=1", "po.micro_batch_size=1", "po.checkpoint_every=1",
         # stage 2 on a couple of prompts. The seed's drop rules are off so that two prompts surely
         # leave a thought to train on (the rules themselves are tested on fakes in tests/core).
         "data.stage2=[12,14]", "data.stage2_po=[20,26]", "search.max_rounds=2",
         "search.drop_no_first_improvement=false", "search.drop_no_terminating_critique=false",
         "thought.s=3", "thought.sampling.max_new_tokens=48",
         "cot_sft.step_cap=1", "cot_sft.micro_batch_size=1", "cot_sft.checkpoint_every=1",
         "cot_po.step_cap=1", "cot_po.checkpoint_every=1", "cot_sft.max_length=512", "cot_po.max_length=512",
         "tts.rounds=2", "tts.sampling.max_new_tokens=24",
         "eval.slice=[0,2]", "eval.sampling.max_new_tokens=24", "eval.position_bias_n=1"]


def engine_processes() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]


def test_pipeline_on_smollm2_on_the_vllm_path(tmp_path):
    from transformers import AutoModelForCausalLM

    from flows.pipeline import pipeline

    params = {"preset": "tiny", "overrides": [f"store.root={tmp_path}", *SMALL, *VLLM]}
    summary = pipeline(params)
    store = Store(str(tmp_path))
    assert engine_processes() == [], "the run's end ends every engine it kept"
    for stage in ("respond", "critique", "refine", "search", "thought_samples", "tts_answers", "eval_answers"):
        for r in store.list(stage):
            assert store.manifest(r)["device"]["generator"] == "cpu (vllm)", (stage, store.manifest(r)["device"])
    for stage in ("rm_score", "search", "thought_samples", "tts_answers"):
        for r in store.list(stage):
            assert store.manifest(r)["device"]["scorer"] == "cpu (vllm)", (stage, store.manifest(r)["device"])
    rows = summary["stages"]
    first = {r["task"]: r for r in rows[:6]}                    # the seed's synthesis: one engine for three stages
    assert [first[t]["loads"] for t in ("respond", "critique", "refine", "rm_score")] == [1, 0, 0, 1]
    assert any(r["task"] == "rm_score" and r["loads"] == 0 for r in rows), "a kept scorer engine is reused"
    # issue 31: one policy engine follows the policy through the run (seed, RSFT, Stage-1, CoT RSFT,
    # Stage-2: new weights into it), beside the judge's; trainings keep both
    starts, reloads = sum(r["loads"] for r in rows), sum(r["reloads"] for r in rows)
    assert starts <= 3 and reloads >= 4, (starts, reloads)
    model = [store.ref("po", summary["outputs"]["stage1_model"]["ref"].split("/")[1])]
    assert len(store.list("po")) == 1 and len(store.list("rsft")) == 1 and len(store.list("ref_logps")) == 2
    assert len(store.list("cot_sft")) == 1 and len(store.list("cot_po")) == 1
    m = store.manifest(model[0])
    assert m["train"]["steps"] == 1 and "model/model.safetensors" in m["files"]
    model_dir = tmp_path / "po" / model[0].key / "model"
    rows = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert AutoModelForCausalLM.from_pretrained(model_dir) is not None
    assert not list((tmp_path / ".work").rglob("ckpt*"))          # training checkpoints cleaned up
    sig = store.manifest(store.list("signal")[0])["result"]
    assert sig["n"] == 2
    # the stage-1 synthesis for PO was sampled by the RSFT model, not the seed
    respond = [store.manifest(r)["config"]["policy"] for r in store.list("respond")]
    assert any(p.get("artifact", "").startswith("rsft/") for p in respond)

    # stage 2: a thought per search trace, trained on, then thought pairs and the Stage-2 model
    thoughts = store.read_records(store.ref(*summary["outputs"]["stage2_thoughts"]["ref"].split("/")), "rsft")
    assert len(thoughts) == 2 and thoughts[0]["messages"][-1]["content"].startswith("<|Start of recursive")
    s2 = store.manifest(store.ref(*summary["outputs"]["stage2_model"]["ref"].split("/")))
    assert s2["train"]["steps"] == 1 and "model/model.safetensors" in s2["files"]
    samples = store.list("thought_samples")
    assert len(samples) == 1 and sum(v for k, v in store.manifest(samples[0])["counts"].items()
                                     if k.startswith("final_from_")) == 6 * 3   # every sample's final answer found
    # test-time scaling: R = 0..2 on the held-out prompts, and a timing row per stage
    rows = store.manifest(store.ref(*summary["outputs"]["test_time_scaling"]["ref"].split("/")))["result"]
    assert [r["R"] for r in rows] == [0, 1, 2] and all(r["n"] == 2 for r in rows)
    assert {"search", "thoughts", "sample_thoughts", "thought_pairs", "tts_answers", "tts_curve"} <= {
        r["task"] for r in summary["stages"] if not r["cached"]}

    # evaluation: every model answered both prompts, judged by alpaca-eval's annotator with the local judge
    from tasks.evaluate import read_leaderboard
    rows = read_leaderboard(str(tmp_path))
    assert [r["model"] for r in rows] == ["seed", "rsft", "stage1", "stage2"] and all(r["n"] == 2 for r in rows)
    assert all(0 <= r["win_rate"] <= 100 and r["lc_kind"] == "unavailable" for r in rows)
    assert [r["R"] for r in rows] == [0, 0, 1, 0]

    again = pipeline(params)
    assert again["outputs"]["stage1_model"]["ref"] == summary["outputs"]["stage1_model"]["ref"]
    assert all(r["cached"] for r in again["stages"])          # a full cache hit: nothing recomputed
    assert sum(r["loads"] for r in again["stages"]) == 0      # ... and no model loaded
    assert read_leaderboard(str(tmp_path)) == rows            # a cached rerun reuses the rows: none added
