"""A training process killed with SIGKILL -- once inside a checkpoint commit, once from outside --
resumes from its last committed checkpoint and ends with the losses of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from avr_core.training.launch import child_env, write_spec
from avr_core.training.recipe import train
from tests.training.conftest import sft_rows

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]   # subprocess training

# Runs a spec like `python -m avr_core.training`, but each commit is followed by a pause (so an
# outside kill lands mid-run), and with KILL_AT=step-00000N the process SIGKILLs itself after
# DeepSpeed wrote that step's files and before the checkpoint is committed.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from avr_core.training import checkpoint, launch
    write = checkpoint._write_atomic
    def patched(path, text):
        if path.name == "trainer_state.json" and path.parent.name == os.environ.get("KILL_AT"):
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, text)
        if path.name == "LATEST":
            time.sleep(float(os.environ.get("PAUSE", "0")))
    checkpoint._write_atomic = patched
    sys.exit(launch.main(["--spec", sys.argv[1]]))
""")


def test_sigkill_then_resume_gives_the_uninterrupted_losses(tiny_llama, tmp_path):
    cfg = dict(loss="sft", lr=1e-3, epochs=20, step_cap=6, micro_batch_size=2, zero_stage=2,
               checkpoint_every=1, warmup_ratio=0.2, max_length=512)
    rows = sft_rows(4)
    train(tiny_llama, rows, cfg, tmp_path / "a", tmp_path / "ca", progress=False)
    expected = [json.loads(l)["loss"] for l in open(tmp_path / "a" / "metrics.jsonl")]

    ckpt = tmp_path / "cb"
    spec = write_spec(tmp_path / "spec.json", model_path=tiny_llama, rows=rows, cfg=cfg,
                      out_dir=str(tmp_path / "b"), ckpt_dir=str(ckpt), progress=False)
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    # 1. killed inside the commit of step 4: step 3 stays the committed checkpoint
    p = subprocess.run([sys.executable, str(script), str(spec)], env={**child_env(), "KILL_AT": "step-000004"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (ckpt / "LATEST").read_text() == "step-000003"
    assert (ckpt / "step-000004").exists() and not (ckpt / "step-000004" / "trainer_state.json").exists()

    # 2. resumed, then killed from outside once step 4 is committed
    child = subprocess.Popen([sys.executable, str(script), str(spec)], env={**child_env(), "PAUSE": "2"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while (not (ckpt / "LATEST").exists() or (ckpt / "LATEST").read_text() != "step-000004"):
        assert child.poll() is None, child.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "b").exists()                  # no half-written model directory

    # 3. resumed to the end
    s = train(tiny_llama, rows, cfg, tmp_path / "b", ckpt, progress=False)
    assert s["resumed_from"] == 4 and s["steps"] == 6
    got = [json.loads(l)["loss"] for l in open(tmp_path / "b" / "metrics.jsonl")]
    diff = max(abs(x - y) for x, y in zip(expected, got))
    print(f"\nSIGKILL + resume vs uninterrupted, 6 losses: max |diff| = {diff:.3g}")
    assert len(got) == 6 and diff <= 1e-5
