"""The tiny pipeline's stage 1 and evaluation with the whole store on S3 (issue 15: "With
store.root=s3://..., the tiny pipeline completes, a rerun is a full cache hit"), against moto's S3
server on 127.0.0.1 (tests/s3server.py), with the SMALL overrides of tests/test_e2e_pipeline.py
and a tiny random Llama (tests/tiny_models.py) as policy and local judge: the test is about the
store, not the models, and every file (trained models included) stays a single PUT.

Real: every stage's lease, shards and manifest on s3://; RSFT and DPO training (DeepSpeed
subprocess) with the models uploaded into their artifacts and fetched into the local cache for the
next training (DPO's base, the reference log-probs) and for HF generation (eval answers by the
RSFT and stage-1 models); alpaca-eval's judge by the local model, its config and cache staged
locally and the config uploaded into the artifact; plots and `model_outputs.json` through the
writer; the leaderboard (a lease-locked shared file); `avr artifacts verify`; the rerun computes
nothing and appends to the leaderboard. Scripted (tests/fakes.py): the generator and scorer of
synthesis, the learning signal and test-time scaling (a random model never writes a parsable
rating, so it would select nothing to train on). NOT run here: stage 2 (search, thoughts, CoT RSFT,
sampled thoughts, thought pairs, CoT DPO) and the pipeline flow's run record (flows/runs.py) -- on
a local store both are in tests/test_e2e_pipeline.py; racing processes on s3: scripts/scale_check.sh."""
import os

import pytest

os.environ["AVR_RETRY_DELAY_S"] = "0"

from tests.test_e2e_pipeline import SMALL  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def scripted(monkeypatch):
    import tasks.scaling as sc
    import tasks.synthesis as t
    from tests.fakes import FakeGenerator, FakeScorer

    def gen(policy, backend):
        return FakeGenerator(critiques=["Needs work. Rating: [[4]]", "Fine. Rating: [[7]]"])
    for m in (t, sc):
        monkeypatch.setattr(m, "make_generator", gen)
        monkeypatch.setattr(m, "make_scorer", lambda c: FakeScorer())


def test_stage1_and_evaluation_on_s3_then_a_full_cache_hit(tmp_path, monkeypatch, scripted):
    from prefect import flow

    from avr_core.inspect import verify
    from avr_core.store import Store
    from flows.evaluate import evaluate, test_time_scaling
    from flows.stage1 import learning_signal, stage1
    from tasks.common import STAGE_LOG
    from tasks.evaluate import read_leaderboard
    from tests.s3server import BUCKET, moto_s3
    from tests.tiny_models import tiny_llama

    model = tiny_llama(str(tmp_path / "tiny-llama"))
    monkeypatch.setenv("AVR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)      # a stage writing to a local path where it should write to the store shows here

    @flow(name="s3-stage1-evaluate")
    def run(cfg: dict, run_id: str) -> dict:
        seed = dict(cfg["policy"])
        s1 = stage1(cfg, seed)
        sig = learning_signal(cfg, seed, s1["rsft"])
        tts = test_time_scaling(cfg, s1["model"])
        evaluate(cfg, {"seed": seed, "rsft": s1["rsft"], "stage1": s1["model"]}, run_id=run_id)
        return {"model": str(s1["model_ref"]), "signal": str(sig), "tts": str(tts)}

    with moto_s3():
        root = f"s3://{BUCKET}/pipeline"
        from omegaconf import OmegaConf

        from avr_core.config import load_config
        cfg = OmegaConf.to_container(load_config("tiny", [
            f"store.root={root}", *SMALL, f"policy.path={model}", f"eval.judge.local_model={model}"]), resolve=True)
        n0 = len(STAGE_LOG)
        first = run(cfg, "s3-1")
        computed = STAGE_LOG[n0:]
        store = Store(root)
        assert store.remote and not any(tmp_path.glob(f"{BUCKET}*")) and not (tmp_path / ".work").exists()
        for stage in ("rsft", "po"):
            (ref,) = store.list(stage)
            m = store.manifest(ref)
            assert m["train"]["steps"] == 1 and "model/model.safetensors" in m["files"]
        assert len(store.list("ref_logps")) == 1 and len(store.list("signal")) == 1
        assert "scaling.png" in store.manifest(store.list("tts_curve")[0])["files"]
        judged = store.list("eval_judge")
        assert len(judged) == 3 and all("metrics.json" in store.manifest(r)["files"] and any(
            f.startswith("judge/") for f in store.manifest(r)["files"]) for r in judged)   # the judge config uploaded
        answers = store.list("eval_answers")
        assert all("model_outputs.json" in store.manifest(r)["files"] for r in answers)
        rows = read_leaderboard(root)
        assert [r["model"] for r in rows] == ["seed", "rsft", "stage1"] and all(r["n"] == 2 for r in rows)
        assert verify(store) == []
        work = store.path(".work")
        assert not store.fs.exists(work) or not [p for p in store.fs.find(work) if "/ckpt/" in p]   # synced ckpts gone

        n1 = len(STAGE_LOG)
        again = run(cfg, "s3-2")
        assert again == first
        missed = [c["task"] for c in STAGE_LOG[n1:] if not c["cached"]]
        assert not missed, f"recomputed on the rerun: {missed}"
        assert len(STAGE_LOG[n1:]) == len(computed)
        assert len(read_leaderboard(root)) == 6                  # another run appends its rows
