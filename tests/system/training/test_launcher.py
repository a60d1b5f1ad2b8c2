"""Two CPU processes under the `deepspeed` launcher (`launch_command`) train like one process
that accumulates the same micro-batches: data sharding and the all-reduce are right."""
import json
import subprocess

import pytest

from avr_core.training.launch import child_env, launch_command, write_spec
from avr_core.training.recipe import train
from tests.training.conftest import sft_rows

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]   # subprocess training


def test_two_ranks_equal_one_rank_with_twice_the_accumulation(tiny_llama, tmp_path):
    base = dict(loss="sft", lr=1e-3, epochs=20, step_cap=3, micro_batch_size=1, zero_stage=2,
                checkpoint_every=10, warmup_ratio=0.0, max_length=512)
    rows = sft_rows(4)
    spec = write_spec(tmp_path / "spec.json", model_path=tiny_llama, rows=rows, cfg={**base, "grad_accum": 2},
                      out_dir=str(tmp_path / "two"), ckpt_dir=str(tmp_path / "c2"), progress=False)
    cmd = launch_command(spec, num_gpus=2)
    assert cmd[1:3] == ["--num_gpus", "2"]
    # AVR_DS_CPU_SHM=0: gloo all-reduce, no 90 s compile of DeepSpeed's shared-memory op
    p = subprocess.run(cmd, env={**child_env(), "AVR_DS_CPU_SHM": "0"}, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 0 prints the summary; the launcher's own log lines follow it
    summary = next(json.loads(l) for l in p.stdout.splitlines() if l.startswith('{"loss"'))
    assert summary["world_size"] == 2 and summary["steps"] == 3
    train(tiny_llama, rows, {**base, "grad_accum": 4}, tmp_path / "one", tmp_path / "c1", progress=False)
    two = [json.loads(l)["loss"] for l in open(tmp_path / "two" / "metrics.jsonl")]
    one = [json.loads(l)["loss"] for l in open(tmp_path / "one" / "metrics.jsonl")]
    assert len(two) == len(one) == 3 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-4

