"""Preflight refuses GPU counts this node does not have (issue 32 item 2, review F6/F7), before
anything runs, in one line naming the key: every training `num_gpus`, every `gpus` list, the vLLM
engines' sizes, and with Ray the GPUs one actor gets.

The visible device count is faked (1 and 8, as on one H200 and on an 8-GPU node) by replacing
`avr_core.backends.device.cuda_count`, which every check reads (as tests/backends/test_devices.py
does); with 0 the run is a CPU run and only settings that insist on CUDA are refused."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from avr_cli import supervisor
from avr_cli.main import main
from avr_core.backends import device as dev
from avr_core.config import ConfigError, load_config
from flows.params import as_params
from run_records.lifecycle import start_run
from run_records.preflight import TRAINED, check_gpus, preflight

ONE_GPU = "1 is visible on this machine (CUDA_VISIBLE_DEVICES is not set)"


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: this machine shows n CUDA devices (CUDA_VISIBLE_DEVICES unset)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("AVR_FORCE_NO_CUDA", raising=False)
    return lambda n: monkeypatch.setattr(dev, "cuda_count", lambda: n)


@pytest.fixture
def nothing_runs(monkeypatch):
    """Records a flow that starts (`avr run` hands the run to its supervised worker after preflight)."""
    started: list = []
    monkeypatch.setattr(supervisor, "supervise", lambda argv: started.append(argv) or 0)
    return started


def _cfg(preset: str, *overrides: str) -> dict:
    return OmegaConf.to_container(load_config(preset, list(overrides)), resolve=True)


def _refusal(cfg: dict, flow: str = "pipeline") -> str | None:
    try:
        check_gpus(cfg, TRAINED[flow])
    except dev.DeviceError as e:
        return str(e)
    return None


# -- avr run and deployments: refused before anything runs ------------------------------------
def test_avr_run_refuses_num_gpus_the_node_lacks_in_one_line(gpus, nothing_runs, tmp_path, capsys):
    gpus(1)
    store = tmp_path / "store"
    code = main(["run", "--preset", "tiny", "po.num_gpus=8", f"store.root={store}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err == (f"avr: error: key 'po.num_gpus': 8 GPUs asked for, but {ONE_GPU}; set po.num_gpus=1 "
                   f"(and po.grad_accum=8 to keep its global batch of 16)\n")
    assert not nothing_runs and not store.exists()          # no flow started, nothing written


def test_avr_run_refuses_a_gpus_list_naming_a_missing_device(gpus, nothing_runs, tmp_path, capsys):
    gpus(1)
    code = main(["run", "--preset", "tiny", "generator.gpus=[0,1]", f"store.root={tmp_path / 's'}"])
    err = capsys.readouterr().err
    assert code == 2 and not nothing_runs and not (tmp_path / "s").exists()
    assert err == (f"avr: error: key 'generator.gpus': [0, 1] names device(s) [1], but {ONE_GPU}; "
                   f"set generator.gpus to indices below 1, or [] for every visible GPU\n")


def test_a_deployment_run_is_refused_before_its_run_record(gpus, tmp_path):
    gpus(1)
    with pytest.raises(ConfigError, match=r"^key 'scorer.gpus': \[3\] names device\(s\) \[3\], but 1 is visible"):
        start_run(as_params(preset="tiny", overrides=[f"store.root={tmp_path}", "scorer.gpus=[3]"]))
    assert not tmp_path.joinpath("runs").exists()


# -- training num_gpus -------------------------------------------------------------------------
def test_num_gpus_within_the_visible_count_passes_preflight(gpus, tmp_path):
    gpus(8)
    cfg = _cfg("tiny", f"store.root={tmp_path}", "po.num_gpus=8", "rsft.num_gpus=2", "generator.gpus=[6,7]")
    assert preflight(cfg) > 0


def test_cpu_runs_keep_their_cpu_ranks(monkeypatch):
    # without CUDA, num_gpus > 1 starts that many CPU ranks (tests/system/training/test_launcher.py)
    monkeypatch.setenv("AVR_FORCE_NO_CUDA", "1")
    assert _refusal(_cfg("tiny", "po.num_gpus=8", "cot_sft.num_gpus=4", "generator.gpus=[5]")) is None


def test_a_hostfile_takes_the_gpus_from_its_slots(gpus, tmp_path):
    gpus(1)
    assert _refusal(_cfg("tiny", "po.num_gpus=8", f"scale.hostfile={tmp_path / 'hosts'}")) is None


def test_signal_is_not_refused_for_stage2_training_it_never_runs(gpus):
    gpus(1)
    cfg = _cfg("signal", "cot_po.num_gpus=8")
    assert _refusal(cfg, "signal") is None
    assert _refusal(cfg, "pipeline").startswith("key 'cot_po.num_gpus': 8 GPUs asked for")


def test_a_uuid_cuda_visible_devices_is_refused_for_the_launcher(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f3a,GPU-77b1")     # the launcher takes indices
    msg = _refusal(_cfg("tiny", "po.num_gpus=2"))
    assert msg.startswith("key 'po.num_gpus': CUDA_VISIBLE_DEVICES='GPU-5f3a,GPU-77b1': the DeepSpeed launcher")


# -- the paper preset: engines on every visible GPU, training on num_gpus ----------------------
def test_paper_passes_on_an_8_gpu_node(gpus):
    gpus(8)
    assert _refusal(_cfg("paper")) is None


def test_paper_on_one_gpu_says_what_to_set(gpus):
    # Its engines take every visible GPU (data_parallel_size 0); training does not: num_gpus sets the
    # global batch (micro_batch_size x grad_accum x GPUs), so it is the user's to change, and the line says how.
    gpus(1)
    assert _refusal(_cfg("paper")) == (
        f"key 'rsft.num_gpus': 8 GPUs asked for, but {ONE_GPU}; set rsft.num_gpus=1 (and rsft.grad_accum=128 to "
        f"keep its global batch of 256); the same for po.num_gpus=8, cot_sft.num_gpus=8, cot_po.num_gpus=8")
    one = [f"{t}.num_gpus=1" for t in TRAINED["pipeline"]]
    assert _refusal(_cfg("paper", *one)) is None


def test_engine_sizes_beyond_the_allowed_gpus(gpus):
    gpus(1)
    one = [f"{t}.num_gpus=1" for t in TRAINED["pipeline"]]
    assert _refusal(_cfg("paper", *one, "generator.data_parallel_size=8")) == (
        f"key 'generator.data_parallel_size': 8 engines x tensor_parallel_size 1 = 8 GPUs asked for, but "
        f"{ONE_GPU}; set generator.data_parallel_size=0 (as many engines as the GPUs hold)")
    gpus(8)
    assert _refusal(_cfg("paper", "scorer.tensor_parallel_size=4", "scorer.gpus=[0,1]")) == (
        "key 'scorer.tensor_parallel_size': 4 x data_parallel_size 0 = 4 GPUs asked for, but scorer.gpus [0, 1] "
        "allows 2; set scorer.tensor_parallel_size to at most 2")
    assert _refusal(_cfg("paper", "generator.data_parallel_size=8")) is None


# -- Ray: the GPUs one actor gets ----------------------------------------------------------------
def test_ray_actors_too_small_for_the_gpus_lists_are_refused():
    # review F7 (engines-repro/ray_check.py): gpus_per_worker=1 with a 6-GPU list failed inside the actor
    ray = ["scale.engine=ray", "scale.workers=8", "scale.gpus_per_worker=1"]
    with pytest.raises(ConfigError) as e:
        load_config("paper", [*ray, "generator.gpus=[0,1,2,3,4,5]"])
    assert str(e.value) == ("key 'scale.gpus_per_worker': generator.gpus [0, 1, 2, 3, 4, 5] needs 6 GPUs inside one "
                            "Ray actor, but each actor gets 1; set scale.gpus_per_worker=6 (got 1.0)")
    with pytest.raises(ConfigError, match=r"^key 'scale.gpus_per_worker': scorer.tensor_parallel_size 2 x "):
        load_config("paper", [*ray, "scorer.tensor_parallel_size=2"])
    load_config("paper", ray)                                    # one engine per actor's GPU: fine
    load_config("paper", [*ray[:2], "scale.gpus_per_worker=6", "generator.gpus=[0,1,2,3,4,5]"])
    load_config("tiny", ["scale.engine=ray", "scale.gpus_per_worker=0.5", "generator.gpus=[0]"])
