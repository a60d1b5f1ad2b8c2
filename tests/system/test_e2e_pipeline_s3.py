"""The tiny pipeline, top to bottom, with the whole store on S3 (issue 15: "With
store.root=s3://..., the tiny pipeline completes, a rerun is a full cache hit"), against moto's S3
server on 127.0.0.1 (tests/s3server.py), with the SMALL overrides of tests/system/test_e2e_pipeline.py
and a tiny random Llama (tests/tiny_models.py) as policy and local judge: the test is about the
store, not the models, and every file (trained models included) stays a single PUT.

Real: the pipeline flow (flows/pipeline.py) and its run record; every stage's lease, shards and
manifest on s3://; the four trainings (RSFT, DPO, CoT RSFT, CoT DPO; DeepSpeed subprocess) with
the models uploaded into their artifacts and fetched into the local cache for the next training
(each base, the reference log-probs) and for HF generation (eval answers by all four models);
alpaca-eval's judge by the local model, its config and cache staged locally and the config
uploaded into the artifact; plots and `model_outputs.json` through the writer; the leaderboard (a
lease-locked shared file); `avr artifacts verify`; the rerun computes nothing and appends to the
leaderboard. Scripted (tests/fakes.py, tests/core/test_search.py): the generator and scorer of
synthesis, search, thought sampling, the learning signal and test-time scaling (a random model
never writes a parsable rating or thought, so it would select nothing to train on). Racing
processes on s3: scripts/scale_check.sh."""
import os

import pytest

os.environ["AVR_RETRY_DELAY_S"] = "0"

from tests.system.test_e2e_pipeline import SMALL  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def scripted(monkeypatch):
    import tasks.scaling as sc
    import tasks.stage2 as s2
    import tasks.synthesis as t
    from tests.core.test_search import GrowingGenerator
    from tests.fakes import FakeGenerator, FakeScorer, ThoughtWriter

    def gen(policy, backend):
        return FakeGenerator(critiques=["Needs work. Rating: [[4]]", "Fine. Rating: [[7]]"])

    def stage2_gen(policy, backend):     # search by the stage-1 model; thoughts by the CoT-RSFT model
        return ThoughtWriter() if str(policy.get("artifact", "")).startswith("cot_sft/") else GrowingGenerator(cap=4)
    for m in (t, sc):
        monkeypatch.setattr(m, "make_generator", gen)
    monkeypatch.setattr(s2, "make_generator", stage2_gen)
    for m in (t, sc):
        monkeypatch.setattr(m, "make_scorer", lambda c: FakeScorer())
    thought_finals = {"a much longer final answer here": 9.0, "fine answer": 1.0, "ok": 4.0}   # a pair per prompt
    monkeypatch.setattr(s2, "make_scorer", lambda c: FakeScorer(fn=lambda a: thought_finals.get(a, len(a.split()))))


def test_the_pipeline_on_s3_then_a_full_cache_hit(tmp_path, monkeypatch, scripted):
    from avr_core.catalog import verify
    from avr_core.store import Store
    from flows.pipeline import pipeline
    from tasks.evaluate import read_leaderboard
    from tests.s3server import BUCKET, moto_s3
    from tests.tiny_models import tiny_llama

    model = tiny_llama(str(tmp_path / "tiny-llama"))
    monkeypatch.setenv("AVR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)      # a stage writing to a local path where it should write to the store shows here

    with moto_s3():
        root = f"s3://{BUCKET}/pipeline"
        params = {"preset": "tiny", "overrides": [
            f"store.root={root}", *SMALL, f"policy.path={model}", f"eval.judge.local_model={model}"]}
        first = pipeline(params)
        store = Store(root)
        assert store.remote and not any(tmp_path.glob(f"{BUCKET}*")) and not (tmp_path / ".work").exists()
        for stage in ("rsft", "po", "cot_sft", "cot_po"):
            (ref,) = store.list(stage)
            m = store.manifest(ref)
            assert m["train"]["steps"] == 1 and "model/model.safetensors" in m["files"], stage
        assert len(store.list("ref_logps")) == 2 and len(store.list("signal")) == 1
        thoughts = store.read_records(store.ref(*first["outputs"]["stage2_thoughts"]["ref"].split("/")), "rsft")
        assert len(thoughts) == 2 and thoughts[0]["messages"][-1]["content"].startswith("<|Start of recursive")
        assert len(store.read_records(store.list("thought_pairs")[0], "pairs")) == 6  # one per stage2_po prompt
        assert "scaling.png" in store.manifest(store.list("tts_curve")[0])["files"]
        judged = store.list("eval_judge")
        assert len(judged) == 4 and all("metrics.json" in store.manifest(r)["files"] and any(
            f.startswith("judge/") for f in store.manifest(r)["files"]) for r in judged)   # the judge config uploaded
        answers = store.list("eval_answers")
        assert all("model_outputs.json" in store.manifest(r)["files"] for r in answers)
        rows = read_leaderboard(root)
        assert [r["model"] for r in rows] == ["seed", "rsft", "stage1", "stage2"] and all(r["n"] == 2 for r in rows)
        assert verify(store) == []
        work = store.path(".work")
        assert not store.fs.exists(work) or not [p for p in store.fs.find(work) if "/ckpt/" in p]   # synced ckpts gone

        again = pipeline(params)
        assert again["outputs"] == first["outputs"]
        missed = [r["task"] for r in again["stages"] if not r["cached"]]
        assert not missed, f"recomputed on the rerun: {missed}"
        assert len(again["stages"]) == len(first["stages"])
        assert read_leaderboard(root) == rows                    # a cached rerun reuses the rows: none added
