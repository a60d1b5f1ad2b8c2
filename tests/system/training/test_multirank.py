"""DeepSpeed on several ranks, on CPU (gloo): two processes under the `deepspeed` launcher with
ZeRO-2 and ZeRO-3 train like one process on the same global batch (2 ranks x 1 micro-batch vs
1 rank x 2 accumulated), to |loss difference| <= 1e-4 per step (fp32; only the reduction order
differs); the saved model is ONE Hugging Face directory that loads and matches the one-rank
model's weights to 1e-4; and a two-rank run whose rank 0 is SIGKILLed inside a checkpoint
commit resumes on two ranks to the uninterrupted run's losses (<= 1e-5)."""
from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from avr_core.training.launch import child_env, launch_command, write_spec
from avr_core.training.recipe import train
from tests.training.conftest import sft_rows

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]
LOSS_TOL = 1e-4          # world 2 vs world 1, same global batch (fp32, gloo all-reduce vs local accumulation)
RESUME_TOL = 1e-5        # killed + resumed vs uninterrupted, both on 2 ranks
ENV = {"AVR_DS_CPU_SHM": "0"}    # gloo all-reduce: no 90 s compile of DeepSpeed's shared-memory op

# Like `python -m avr_core.training`, but with KILL_AT=step-00000N rank 0 SIGKILLs itself after
# DeepSpeed wrote that step's files and before the checkpoint is committed.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from avr_core.training import checkpoint, launch
    write = checkpoint._write_atomic
    def patched(path, text):
        if (path.name == "trainer_state.json" and path.parent.name == os.environ.get("KILL_AT")
                and os.environ.get("RANK") == "0"):
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, text)
    checkpoint._write_atomic = patched
    sys.exit(launch.main(["--spec", sys.argv[-1]]))
""")


def _losses(d) -> list[float]:
    return [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]


def _two_ranks(spec, script=None, extra_env=None) -> subprocess.CompletedProcess:
    cmd = launch_command(spec, num_gpus=2)
    if script is not None:       # the launcher runs our child script instead of the module
        cmd = cmd[:cmd.index("--module")] + [str(script), str(spec)]
    return subprocess.run(cmd, env={**child_env(), **ENV, **(extra_env or {})}, capture_output=True, text=True,
                          timeout=600)


def _cfg(stage: int, **kw) -> dict:
    return dict(loss="sft", lr=1e-3, epochs=20, step_cap=3, micro_batch_size=1, zero_stage=stage,
                checkpoint_every=10, warmup_ratio=0.0, max_length=512) | kw


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_equal_one_rank_and_save_one_loadable_model(tiny_llama, tmp_path, stage):
    import torch
    from transformers import AutoModelForCausalLM

    rows = sft_rows(4)
    spec = write_spec(tmp_path / "spec.json", model_path=tiny_llama, rows=rows, cfg=_cfg(stage, grad_accum=1),
                      out_dir=str(tmp_path / "two"), ckpt_dir=str(tmp_path / "c2"), progress=False)
    p = _two_ranks(spec)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = next(json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"loss"'))
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage and summary["steps"] == 3
    train(tiny_llama, rows, _cfg(stage, grad_accum=2), tmp_path / "one", tmp_path / "c1", progress=False)
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    diff = max(abs(a - b) for a, b in zip(one, two))
    print(f"\nZeRO-{stage}: world 2 vs world 1 on global batch 2, 3 steps: max |loss diff| = {diff:.2e}")
    assert len(two) == len(one) == 3 and diff <= LOSS_TOL

    files = sorted(f.name for f in (tmp_path / "two").iterdir())
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any("rank" in f or f.startswith(("global_step", "zero_")) for f in files), files   # one directory
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two", dtype=torch.float32)
    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one", dtype=torch.float32)
    wdiff = max(float((a - b).abs().max()) for a, b in zip(m2.state_dict().values(), m1.state_dict().values()))
    assert wdiff <= 1e-4, wdiff


def test_two_ranks_killed_mid_training_resume_exactly(tiny_llama, tmp_path):
    cfg = _cfg(3, grad_accum=1, checkpoint_every=1) | {"step_cap": 4, "warmup_ratio": 0.25}
    rows = sft_rows(4)
    ref = write_spec(tmp_path / "ref.json", model_path=tiny_llama, rows=rows, cfg=cfg,
                     out_dir=str(tmp_path / "a"), ckpt_dir=str(tmp_path / "ca"), progress=False)
    p = _two_ranks(ref)
    assert p.returncode == 0, p.stderr[-3000:]
    expected = _losses(tmp_path / "a")

    ckpt = tmp_path / "cb"
    spec = write_spec(tmp_path / "spec.json", model_path=tiny_llama, rows=rows, cfg=cfg,
                      out_dir=str(tmp_path / "b"), ckpt_dir=str(ckpt), progress=False)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    p = _two_ranks(spec, script, {"KILL_AT": "step-000003"})
    assert p.returncode != 0                                  # the launcher stops every rank
    assert (ckpt / "LATEST").read_text() == "step-000002" and not (tmp_path / "b").exists()

    p = _two_ranks(spec, script)                              # the same command again: resumes on 2 ranks
    assert p.returncode == 0, p.stderr[-3000:]
    summary = next(json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"loss"'))
    assert summary["resumed_from"] == 2 and summary["steps"] == 4 and summary["world_size"] == 2
    got = _losses(tmp_path / "b")
    diff = max(abs(x - y) for x, y in zip(expected, got))
    print(f"\nZeRO-3, 2 ranks, SIGKILL at step 3 + resume vs uninterrupted: max |loss diff| = {diff:.2e}")
    assert len(got) == 4 and diff <= RESUME_TOL
