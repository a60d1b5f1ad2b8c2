"""The `signal` preset's flow (flows/learning_signal.py) wired end to end on a fake generator and the REAL
`rules` scorer, training left out (control flow only): three held-out comparisons, the
test-time-scaling curve, and the report with the synthesis counts."""
import json
import os

import pytest

os.environ["AVR_RETRY_DELAY_S"] = "0"

import flows.learning_signal as fs  # noqa: E402
import tasks.scaling as sc  # noqa: E402
import tasks.synthesis as t  # noqa: E402
from avr_core.store import Store  # noqa: E402
from flows.params import RunParams  # noqa: E402
from flows.stage1 import synthesis  # noqa: E402
from tests.fakes import FakeGenerator  # noqa: E402

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]   # ~30 s: 2 syntheses + 6 stages


def fake_generators(monkeypatch):
    # y0 "an answer." is lowercase and has no comma; the refinements are capitals with a comma
    gen = lambda *a: FakeGenerator(critiques=["Fix it. Rating: [[3]]"], refinements=lambda conv, j: f"YES, {j}")  # noqa: E731
    monkeypatch.setattr(t, "make_generator", gen)
    monkeypatch.setattr(sc, "make_generator", gen)

    def stage1(cfg, seed):                      # the real syntheses; no training (the seed stands in)
        rsft_data = synthesis(cfg, seed, "stage1_sft")
        pairs = synthesis(cfg, seed, "stage1_po")
        return {"rsft_data": rsft_data, "rsft": seed, "rsft_ref": rsft_data, "pairs": pairs, "model_ref": pairs,
                "model": seed}
    monkeypatch.setattr(fs, "stage1", stage1)


def test_signal_flow_reports_comparisons_scaling_and_counts(tmp_path, monkeypatch):

    fake_generators(monkeypatch)

    params = RunParams(preset="signal", store_root=str(tmp_path), overrides=[
        "data.stage1_sft=[0,6]", "data.stage1_po=[160,166]", "data.heldout=[360,368]", "shard_size=4"])
    summary = fs.signal_run.fn(params)
    store = Store(str(tmp_path))
    report_ref = store.ref(*summary["outputs"]["signal_report"]["ref"].split("/", 1))
    report = json.loads(store.fs.cat_file(store.path(report_ref, "report.json")))
    assert list(report["comparisons"]) == ["seed -> rsft", "rsft -> stage1", "seed -> stage1"]
    assert all(c["n"] == 8 for c in report["comparisons"].values())
    assert [r["R"] for r in report["tts"]] == [0, 1, 2, 3] and report["heldout"] == 8
    assert set(report["per_constraint"]) == {"seed", "rsft", "stage1", "stage1 R=3"}
    first = report["synthesis"]["RSFT data (seed)"]
    assert first["outcomes"]["prompts"] == 6 and first["outcomes"]["refinements"] == 6 * 2 * 2
    assert "rsft_examples" in first["select_counts"]
    md = store.fs.cat_file(store.path(report_ref, "report.md")).decode()
    assert "| seed -> stage1 | 8 |" in md and "Test-time scaling" in md
    cut = report["cut_at_cap"]          # every sampling stage's share of answers cut at the token cap
    assert {"respond", "critique", "refine", "tts_answers"} <= {a.split("/")[0] for a in cut}
    assert all(0 <= c <= n for c, n in cut.values()) and "Answers cut at their token cap" in md
    assert all(c["base"].startswith("rm_score/") for c in report["comparisons"].values())


def test_signal_v2_reports_the_extra_heldout_set_and_runs_no_scaling(tmp_path, monkeypatch):
    fake_generators(monkeypatch)
    params = RunParams(preset="signal_v2", store_root=str(tmp_path), overrides=[
        "data.stage1_sft=[0,4]", "data.stage1_po=[120,124]", "data.heldout=[360,366]", "data.heldout_extra=[560,563]",
        "shard_size=4"])
    summary = fs.signal_run.fn(params)
    assert "test_time_scaling" not in summary["outputs"]           # tts.rounds: 0 -> no stage, no duplicate R = 0
    store = Store(str(tmp_path))
    report_ref = store.ref(*summary["outputs"]["signal_report"]["ref"].split("/", 1))
    report = json.loads(store.fs.cat_file(store.path(report_ref, "report.json")))
    extra = report["comparisons"]["seed -> stage1 (heldout_extra)"]
    assert extra["n"] == 3 and report["heldout"] == 6 and report["tts"] == []
    assert set(report["per_constraint"]) == {"seed", "rsft", "stage1", "seed (heldout_extra)", "stage1 (heldout_extra)"}
    assert set(report["training"]) == {"RSFT", "DPO (Stage-1)"}
    md = store.fs.cat_file(store.path(report_ref, "report.md")).decode()
    assert "not part of this run (tts.rounds = 0)" in md and "paired bootstrap 95% CI" in md
    assert "tts_answers" not in {a.split("/")[0] for a in report["cut_at_cap"]}


def test_signal_v3_reports_the_clustered_ci_unasked_formats_and_the_template_rule(tmp_path, monkeypatch):
    fake_generators(monkeypatch)
    params = RunParams(preset="signal_v3", store_root=str(tmp_path), overrides=[
        "data.stage1_sft=[0,4]", "data.stage1_po=[96,100]", "data.heldout=[384,392]", "data.heldout_extra=[684,688]",
        "shard_size=4"])
    summary = fs.signal_run.fn(params)
    store = Store(str(tmp_path))
    report_ref = store.ref(*summary["outputs"]["signal_report"]["ref"].split("/", 1))
    report = json.loads(store.fs.cat_file(store.path(report_ref, "report.json")))
    assert all(c["cluster_bootstrap_ci95"] and c["topics"] >= 1 for c in report["comparisons"].values())
    assert set(report["formats"]) == {"seed", "rsft", "stage1"}          # the headline set's models
    assert set(report["template"]) == {"title", "P.S.", "no comma", "bullets"}
    md = store.fs.cat_file(store.path(report_ref, "report.md")).decode()
    assert "Unasked formats" in md and "Template artefact" in md
