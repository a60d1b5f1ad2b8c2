"""Preflight checks every prompt slice the run's flow reads, iteration 0 included, against the
prompt file, naming the key; and every preset the UI form offers runs the flow it says (the
`signal` preset: flows/learning_signal.py, from the pipeline deployment too)."""
import json

import pytest
from omegaconf import OmegaConf

import flows.pipeline as fp
from avr_cli.main import main
from avr_core.config import ConfigError, load_config
from flows.params import PRESETS, RunParams
from run_records.preflight import preflight


def _cfg(preset, *overrides):
    return OmegaConf.to_container(load_config(preset, list(overrides)), resolve=True)


def _prompts(path, n):
    path.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(n)))
    return path


def test_a_short_prompt_file_is_refused_before_any_work_naming_the_key(tmp_path, capsys):
    mine = _prompts(tmp_path / "my_prompts.jsonl", 10)      # tiny reads up to row 44
    store = tmp_path / "store"
    code = main(["run", "--preset", "tiny", f"data.prompts={mine}", f"store.root={store}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"key 'data.stage2': [12, 16] runs past the end of {mine} (10 prompts)" in err
    assert not store.exists()                                # nothing was written
    # once the training slices fit, the held-out slice is the one named
    with pytest.raises(ConfigError, match=r"key 'data.heldout': \[40, 44\] runs past the end of .*\(10 prompts\)"):
        preflight(_cfg("tiny", f"data.prompts={mine}", f"store.root={store}", "data.stage2=[4,6]",
                       "data.stage2_po=[6,8]", "data.stage1_po=[2,4]"))


def test_an_empty_slice_the_flow_reads_is_refused():
    with pytest.raises(ConfigError, match=r"key 'data.stage2_po': \[20, 20\] is empty"):
        preflight(_cfg("tiny", "data.stage2_po=[20,20]"))


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "paper"])   # paper: hf:// and GPUs
def test_the_shipped_presets_pass_with_their_own_prompt_files(preset, tmp_path):
    assert preflight(_cfg(preset, f"store.root={tmp_path}")) > 0


def test_signal_is_not_refused_for_the_stage2_slices_it_never_reads(tmp_path):
    cfg = _cfg("signal", f"store.root={tmp_path}")
    assert cfg["data"]["stage2"] == [320, 320]              # empty on purpose: no stage 2
    assert preflight(cfg) == 480
    with pytest.raises(ConfigError, match=r"key 'data.stage2': \[320, 320\] is empty"):
        preflight(cfg, ("stage1_sft", "stage1_po", "stage2", "stage2_po"))   # what avr-stage2-run reads


def test_the_form_offers_signal_and_the_pipeline_deployment_runs_its_flow(tmp_path, monkeypatch):
    assert "signal" in RunParams.model_json_schema()["properties"]["preset"]["enum"]
    ran = []
    monkeypatch.setattr(fp, "signal_run", lambda params: ran.append(params.preset) or {"flow": "avr-signal"})
    monkeypatch.setattr(fp, "start_run", lambda *a, **k: pytest.fail("the pipeline ran for a signal preset"))
    assert fp.pipeline.fn(RunParams(preset="signal", store_root=str(tmp_path))) == {"flow": "avr-signal"}
    assert ran == ["signal"]


def test_a_signal_preset_gets_no_stage2_or_evaluation_deployment():
    from flows.deploy import deployments
    assert [d.name for d in deployments("signal")] == ["avr-signal", "avr-synthesis-run-signal",
                                                       "avr-stage1-run-signal"]
    assert len(deployments("tiny")) == 5
