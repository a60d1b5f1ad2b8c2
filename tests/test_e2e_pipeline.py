"""The README's main job, shrunk: the whole stage-1 pipeline on the real SmolLM2 with DeepSpeed
on CPU -- synthesis, RSFT, synthesis with the RSFT policy, reference log-probs, DPO, learning
signal -- then a rerun that is a full cache hit."""
import json
import os

import pytest

os.environ["AVR_RETRY_DELAY_S"] = "0"

from avr_core.store import Store  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

SMALL = ["data.stage1_sft=[0,3]", "data.stage1_po=[3,6]", "data.heldout=[40,42]", "shard_size=3",
         "critique.max_tries=1", "respond.sampling.max_new_tokens=24", "critique.sampling.max_new_tokens=24",
         "refine.sampling.max_new_tokens=24", "scorer.max_length=512",
         "rsft.max_steps=1", "rsft.micro_batch_size=1", "rsft.checkpoint_every=1",
         "po.max_steps=1", "po.micro_batch_size=1", "po.checkpoint_every=1"]


def test_pipeline_on_smollm2(tmp_path):
    from flows.pipeline import pipeline
    from transformers import AutoModelForCausalLM

    summary = pipeline(preset="tiny", overrides=[f"store.root={tmp_path}", *SMALL])
    store = Store(str(tmp_path))
    model = store.list("po")
    assert len(model) == 1 and len(store.list("rsft")) == 1 and len(store.list("ref_logps")) == 1
    m = store.manifest(model[0])
    assert m["train"]["steps"] == 1 and "model/model.safetensors" in m["files"]
    model_dir = tmp_path / "po" / model[0].key / "model"
    rows = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert AutoModelForCausalLM.from_pretrained(model_dir) is not None
    assert not (tmp_path / ".work").exists() or not any((tmp_path / ".work").iterdir())  # checkpoints cleaned
    sig = store.manifest(store.list("signal")[0])["result"]
    assert sig["n"] == 2
    # the stage-1 synthesis for PO was sampled by the RSFT model, not the seed
    respond = [store.manifest(r)["config"]["policy"] for r in store.list("respond")]
    assert any(p.get("artifact", "").startswith("rsft/") for p in respond)

    again = pipeline(preset="tiny", overrides=[f"store.root={tmp_path}", *SMALL])
    assert again["outputs"]["stage1_model"]["ref"] == summary["outputs"]["stage1_model"]["ref"]
    assert again["wall_s"] < 60
