"""scripts/gpu_check.py: its table and its refusal without CUDA here; the whole check runs on a
GPU machine (the gpu test below) and, with --cpu, in .ci/run after the tests."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _cuda() -> bool:
    from avr_core.backends.device import cuda_count
    return cuda_count() > 0


def test_table_has_one_row_per_step_and_marks_failures():
    rows = [{"step": "vllm_sample", "ok": True, "device": "8 engine process(es)", "seconds": 2.0, "tokens": 1000,
             "peak_gpu_gib": 40.5},
            {"step": "vllm_rm", "ok": False, "error": "boom"}]
    t = gpu_check.table(rows, "gpu").splitlines()
    assert t[0].startswith("| step | device | seconds | tokens/s | peak GPU mem")
    assert t[2] == "| vllm_sample | 8 engine process(es) | 2.0 | 500 | 40.5 | yes |"
    assert t[3] == "| vllm_rm | - | - | - | - | NO |"


@pytest.mark.skipif(_cuda(), reason="CUDA is present")
def test_gpu_mode_without_cuda_says_use_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env={"AVR_FORCE_NO_CUDA": "1", "PATH": ""})
    assert p.returncode == 2 and "no CUDA device visible" in p.stderr and "--cpu" in p.stderr


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _cuda(), reason="needs CUDA")
def test_gpu_check_passes_on_this_gpu_machine(tmp_path):
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    print(p.stdout)
    assert p.returncode == 0, p.stderr[-3000:]
