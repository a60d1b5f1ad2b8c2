"""The real SmolLM2-135M-Instruct: reference pass + 2 DPO steps at 2 pairs x 256 tokens."""
import json
import math

import pytest

from avr_core.training import logps
from avr_core.training.data import tokenize_pairs
from avr_core.training.recipe import train

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


def long_pairs():
    body = "Paris is the capital of France. It lies on the Seine and is known for its museums. " * 20
    return [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"Tell me about Paris ({i})."}],
             "chosen": [{"role": "assistant", "content": body}],
             "rejected": [{"role": "assistant", "content": "Paris is in Germany. " * 60}],
             "reward_margin": 1.0} for i in range(2)]


def test_two_dpo_steps_on_smollm2(smollm2_path, tok, tmp_path):
    rows = long_pairs()
    pairs, counts = tokenize_pairs(rows, tok, max_length=256)
    assert counts == {"kept": 2, "truncated": 2, "dropped_too_long": 0}
    assert all(len(p["chosen_input_ids"]) == len(p["rejected_input_ids"]) == 256 for p in pairs)
    refs = logps.ref_logps_by_id(logps.compute_reference_logps(smollm2_path, pairs, batch_size=2))
    before = logps.REFERENCE_FORWARDS
    cfg = dict(loss="dpo", beta=0.1, lr=5e-6, step_cap=2, epochs=2, micro_batch_size=2, max_length=256,
               zero_stage=2, warmup_ratio=0.0, checkpoint_every=50)
    s = train(smollm2_path, rows, cfg, tmp_path / "m", tmp_path / "c", ref_logps=refs, progress=False)
    assert logps.REFERENCE_FORWARDS == before and s["steps"] == 2
    m = [json.loads(l) for l in open(tmp_path / "m" / "metrics.jsonl")]
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert m[1]["reward_margin"] > 0                       # one step at lr 5e-6 already separates them
    print(f"\nSmolLM2 DPO 2x256 tokens: init {s['init_s']:.1f}s, step times "
          f"{[round(r['step_s'], 2) for r in m]} s, {m[-1]['tokens_per_s']:.0f} tokens/s")
