"""Multi-node training through the DeepSpeed launcher (issue 15 item 4): `scale.hostfile` and
`scale.num_nodes` reach `launch_command`, and the launcher starts the ranks the hostfile gives.
Here the hostfile names one node, `localhost slots=2`, so the launcher starts 2 CPU ranks
locally (gloo); with more than one host it starts the others over pdsh/ssh (docs/SCALING.md:
every node needs the venv at the same path, passwordless ssh, and the store). What is tested
is the hostfile path; the 2-rank numerics are tests/system/training/test_launcher.py's."""
import json
import subprocess

import pytest

from avr_core.training.launch import child_env, launch_command, write_spec
from tests.training.conftest import sft_rows

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_a_hostfile_with_two_slots_starts_two_ranks_through_the_launcher(tiny_llama, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cfg = dict(loss="sft", lr=1e-3, epochs=1, step_cap=2, micro_batch_size=1, grad_accum=1, zero_stage=2,
               checkpoint_every=10, warmup_ratio=0.0, max_length=256)
    spec = write_spec(tmp_path / "spec.json", model_path=tiny_llama, rows=sft_rows(4), cfg=cfg,
                      out_dir=str(tmp_path / "model"), ckpt_dir=str(tmp_path / "ckpt"), progress=False)
    cmd = launch_command(spec, num_gpus=0, hostfile=str(hostfile), num_nodes=1)
    assert cmd[1:5] == ["--hostfile", str(hostfile), "--num_nodes", "1"]
    p = subprocess.run(cmd, env={**child_env(), "AVR_DS_CPU_SHM": "0"}, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    summary = next(json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"loss"'))
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (tmp_path / "model" / "model.safetensors").exists()
