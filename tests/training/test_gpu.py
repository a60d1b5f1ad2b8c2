"""ZeRO-2 and ZeRO-3 with bf16, gradient checkpointing and accumulation on a GPU (skipped without CUDA)."""
import json

import pytest

from avr_core.training.recipe import train

from .conftest import sft_rows

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::FutureWarning")]


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs CUDA")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_zero_on_gpu(tiny_llama, tmp_path, zero_stage):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = dict(loss="sft", lr=3e-3, epochs=20, step_cap=4, micro_batch_size=2, grad_accum=2,
               zero_stage=zero_stage, bf16=True, gradient_checkpointing=True, checkpoint_every=2,
               warmup_ratio=0.0, max_length=512)
    rows = [dict(sft_rows(1)[0], id=f"s{i}") for i in range(4)]
    s = train(tiny_llama, rows, cfg, tmp_path / "m", tmp_path / "c", progress=False)
    seq = [json.loads(l)["loss"] for l in open(tmp_path / "m" / "metrics.jsonl")]
    assert s["steps"] == 4 and seq[-1] < seq[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert next(model.parameters()).dtype == torch.bfloat16          # 16-bit weights saved
    # resume continues (ZeRO-3 partitions restored)
    s2 = train(tiny_llama, rows, {**cfg, "step_cap": 6}, tmp_path / "m", tmp_path / "c", progress=False)
    assert s2["resumed_from"] == 4 and s2["steps"] == 6
