"""End to end on the real embedded model, on the path GPU nodes run (issue 22): SmolLM2-135M-Instruct
through the `vllm` generator (vLLM's CPU build, an engine in this process) and the hf judge
scorer, under Prefect. One kept engine serves respond, critique (with its forced-rating
continuations) and refine, stays beside the scorer (host memory: nothing to make room for) and
ends with the run, its EngineCore process too. The hf
generator runs the same stages on the same model in tests/test_e2e_pipeline.py. The only addition
to the product is a counter on the real engine class. (~2 min: an engine start is ~25 s eager.)"""
import os

import psutil
import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

from avr_core import backends  # noqa: E402
from avr_core.backends import vllm_offline  # noqa: E402
from avr_core.backends.vllm_server import vllm_env_python  # noqa: E402
from avr_core.config import load_config  # noqa: E402
from avr_core.store import Store  # noqa: E402
from flows.runs import release_all_engines  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.usefixtures("prefect_harness"),
              pytest.mark.skipif(vllm_env_python() is None, reason="vLLM not installed (bash scripts/install.sh)")]
VLLM = ["generator.kind=vllm", "generator.device=cpu", "generator.keep_engine=true", "generator.enforce_eager=true",
        "generator.kv_cache_gb=1", "generator.max_model_len=2048"]


def engine_processes() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]


def test_real_stage1_synthesis_on_smollm2_with_vllm(tmp_path, monkeypatch):
    import tasks.synthesis as t
    from flows.stage1 import synthesis

    starts = []
    real_init = vllm_offline.VLLMEngine.__init__
    monkeypatch.setattr(vllm_offline.VLLMEngine, "__init__",
                        lambda self, *a, **kw: starts.append(kw.get("enforce_eager")) or real_init(self, *a, **kw))
    backends.clear_cache()
    cfg = OmegaConf.to_container(load_config("tiny", [
        f"store.root={tmp_path}", "data.stage1_sft=[0,2]", "shard_size=2", "critique.max_tries=1",
        "respond.sampling.max_new_tokens=24", "critique.sampling.max_new_tokens=24",
        "refine.sampling.max_new_tokens=24", "scorer.max_length=512", *VLLM]), resolve=True)
    ref = synthesis(cfg, cfg["policy"], "stage1_sft")
    store = Store(str(tmp_path))
    assert starts == [True], "respond, critique and refine share one kept engine"
    for stage in ("respond", "critique", "refine"):
        m = store.manifest(store.list(stage)[0])
        assert m["device"]["generator"] == "cpu (vllm)" and m["counts"]["backend_tokens_generated"] > 0
    # on a CPU the kept engine stays beside the (CPU) scorer, as beside a scorer on disjoint GPUs
    assert len(engine_processes()) == 1 and len(backends._CACHE) == 1
    records = store.read_records(store.list("rm_score")[0])
    assert len(records) == 2
    for r in records:
        assert r["answer"].strip() and isinstance(r["answer_score"], float)
        assert 1.0 <= r["answer_score"] <= 9.0                         # an expected MT-Bench rating
        for c in r["critiques"]:
            # force_rating: every critique slot ends with a rating (a continuation on the engine)
            assert 1 <= c["rating"] <= 10 and ("Rating: [[" in c["text"])
            assert len(c["refinements"]) == 2 and all("score" in f for f in c["refinements"])
    sel = store.manifest(ref)
    assert sel["counts"]["input_records"] == 2
    assert sum(sel["counts"].get(k, 0) for k in ("rsft_examples", "no_improvement", "no_refinements",
                                                  "rsft_dropped_length", "rsft_dropped_redundant")) == 2

    # a second run is a full cache hit: no model is even loaded
    calls = []
    orig = t.make_generator
    monkeypatch.setattr(t, "make_generator", lambda *a: calls.append(a) or orig(*a))
    assert synthesis(cfg, cfg["policy"], "stage1_sft") == ref
    assert calls == [] and starts == [True]
    release_all_engines()                    # the run's end (a Prefect state hook of the run flows)
    assert engine_processes() == [] and not backends._CACHE, "the engine process ends with the run"
