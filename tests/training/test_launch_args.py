"""The launcher's GPU arguments (fast: the command only; the real launcher runs in test_launcher.py)."""
import pytest

from avr_core.training.launch import launch_command


@pytest.mark.parametrize("visible, want", [("4,5,6,7", ["--include", "localhost:4,5"]), ("", ["--num_gpus", "2"]),
                                           (None, ["--num_gpus", "2"])])
def test_a_gpu_restricted_caller_trains_on_its_own_gpus(monkeypatch, visible, want):
    # `--num_gpus` makes DeepSpeed's runner drop CUDA_VISIBLE_DEVICES and take GPUs 0..N-1 of the node
    # (review A5): a worker pinned to GPUs 4-7 must name them with --include instead.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    cmd = launch_command("/s.json", num_gpus=2, master_port=29600)
    assert cmd[1:3] == want and ("--num_gpus" in cmd) == (want[0] == "--num_gpus")


def test_launcher_refuses_gpu_names_it_cannot_pass():
    with pytest.raises(ValueError, match="indices"):
        launch_command("/s.json", num_gpus=2, visible="GPU-5f3a,GPU-77b1")
    with pytest.raises(ValueError, match="allows 1"):
        launch_command("/s.json", num_gpus=2, visible="3")
