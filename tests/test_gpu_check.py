"""scripts/gpu_check.py: preflight, skips and exit codes, the DPO sizing for 1..8 GPUs, the table
and --json, rows for exceptions; its refusal without CUDA here. The whole check runs on a GPU
machine (the gpu test below) and, with --cpu, in .ci/run after the tests."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check           # its dataclass looks its module up there
spec.loader.exec_module(gpu_check)
import gpu_check_steps as steps  # noqa: E402  (importable once gpu_check put scripts/ on sys.path)


def _cuda() -> bool:
    from avr_core.backends.device import cuda_count
    return cuda_count() > 0


# -- sizing (review A4) -------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_dpo_plan_fits_every_gpu_count(n, mode):
    plan = steps.dpo_plan(n, mode)
    assert plan["rows"] == 8 * n and plan["planned"] == 8     # 8 micro-batches of 1 per rank, any n
    # the recipe's own count (avr_core/training/recipe.py): epochs * examples // (mbs * gas * world)
    assert plan["planned"] == max(1, 1 * plan["rows"] // (1 * 1 * n))
    assert plan["steps"] == plan["step_cap"] == (3 if mode == "gpu" else 2)   # never capped below the ask
    ids = [r["id"] for r in steps.pair_rows(plan["rows"])]
    assert len(set(ids)) == plan["rows"]       # ref_logps and train_dpo read the same rows
    assert plan["dtype"] == ("bfloat16" if mode == "gpu" else "float32")   # reference in the training dtype


# -- preflight, skips, exit codes ---------------------------------------------------------------
def test_probe_finds_what_this_interpreter_has_and_not_what_it_lacks():
    found = gpu_check.probe(sys.executable, ["json", "torch", "no_such_package_avr"], {"PATH": ""})
    assert found == {"json": True, "torch": True, "no_such_package_avr": False}
    assert gpu_check.probe("/nonexistent/python", ["json"], {}) == {"json": False}


def test_preflight_names_each_missing_package_per_step():
    a = gpu_check.Step("a", ("a",), ("no_such_package_avr",))
    b = gpu_check.Step("b", ("b",), ("json", "yaml_missing_avr"))
    missing = gpu_check.preflight([a, b], lambda s: sys.executable, lambda s: {"PATH": ""})
    assert missing == {"a": ["no_such_package_avr"], "b": ["yaml_missing_avr"]}
    assert gpu_check.describe_missing({"x": ["vllm"], "y": ["vllm", "yaml"]}) == "vllm (x, y), pyyaml (y)"


def test_no_vllm_env_on_cpu_means_only_vllm_is_missing():
    s = gpu_check.BY_NAME["vllm_sample"]
    assert gpu_check.preflight([s], lambda s: None, lambda s: {}) == {"vllm_sample": ["vllm"]}


def test_skip_reasons_name_the_package_or_the_input_row():
    eval_step = gpu_check.BY_NAME["eval_answer"]
    assert gpu_check.skip_reason(eval_step, ["yaml"], {}) == "skipped (needs pyyaml)"
    assert gpu_check.skip_reason(eval_step, [], {"train_dpo": {"status": "FAILED"}}) == "skipped (needs train_dpo)"
    assert gpu_check.skip_reason(eval_step, [], {"train_dpo": {"status": "ok"}}) is None
    assert gpu_check.skip_reason(eval_step, [], {}) is None          # not run here: its own input check decides


@pytest.mark.parametrize("statuses, code", [
    (["ok", "ok"], 0), (["ok", "FAILED"], 1), (["ok", "skipped (needs vllm)"], 3),
    (["FAILED", "skipped (needs vllm)"], 1)])
def test_exit_codes(statuses, code):
    assert gpu_check.exit_code([{"step": str(i), "status": s} for i, s in enumerate(statuses)]) == code
    assert {gpu_check.EXIT_OK, gpu_check.EXIT_FAILED, gpu_check.EXIT_NO_GPU, gpu_check.EXIT_INCOMPLETE} == {0, 1, 2, 3}


class FakeContext:
    """Control flow only: 'runs' a step by returning the statuses given, records what ran."""

    def __init__(self, outcome: dict[str, str]):
        self.outcome, self.ran = outcome, []

    def python_for(self, step):
        return sys.executable

    def env_for(self, step):
        return {"PATH": ""}

    def run(self, step):
        self.ran.append(step.name)
        return [{"step": r, "status": self.outcome.get(r, "ok")} for r in step.rows]


def test_run_all_skips_missing_packages_and_dependents_of_failures(capsys):
    S = gpu_check.Step
    plan = [S("models", ("models",)), S("v", ("v1", "v2"), ("no_such_package_avr",), ("models",)),
            S("t", ("t",), (), ("models",)), S("e", ("e",), (), ("models", "t"))]
    ctx = FakeContext({"t": "FAILED"})
    rows = gpu_check.run_all(plan, ctx)
    assert ctx.ran == ["models", "t"]
    assert [(r["step"], r["status"]) for r in rows] == [
        ("models", "ok"), ("v1", "skipped (needs no_such_package_avr)"), ("v2", "skipped (needs no_such_package_avr)"),
        ("t", "FAILED"), ("e", "skipped (needs t)")]
    assert "preflight: missing no_such_package_avr (v)" in capsys.readouterr().out
    assert gpu_check.exit_code(rows) == 1
    assert gpu_check.exit_code(gpu_check.run_all(plan, FakeContext({}))[:3]) == 3


# -- rows, table, json --------------------------------------------------------------------------
def test_an_exception_before_any_row_fails_every_row_of_the_step(tmp_path):
    # no paths.json: vllm_sample raises while building its engine, before either of its rows
    assert gpu_check.run_step("vllm_sample", "cpu", tmp_path, 2) == 1
    for name in ("vllm_sample", "vllm_long_prompt"):
        row = json.loads((tmp_path / f"{name}.json").read_text())
        assert row["status"] == "FAILED" and row["error"].startswith("FileNotFoundError")


def test_an_exception_inside_a_row_is_that_rows_failure(tmp_path):
    assert gpu_check.run_step("hf_rm", "cpu", tmp_path, 2) == 0       # the process itself ends normally
    row = json.loads((tmp_path / "hf_rm.json").read_text())
    assert row["status"] == "FAILED" and "paths.json" in row["error"]


def test_sample_check_allows_an_empty_sample_but_not_all():
    assert steps.check_samples([["", "a"], ["b", "c"]], 2) == 1       # a sample may start with end-of-turn (D7)
    with pytest.raises(AssertionError, match="every sample is empty"):
        steps.check_samples([["", ""]], 2)
    with pytest.raises(AssertionError, match="structure"):
        steps.check_samples([["a"]], 2)


ROWS = [{"step": "vllm_sample", "status": "ok", "device": "8 engine process(es)", "seconds": 2.0, "tokens": 1000,
         "peak_gpu_gib": 40.5, "detail": "256 prompts x 2 samples; 0 empty"},
        {"step": "vllm_rm", "status": "FAILED", "error": "boom"},
        {"step": "train_dpo", "status": "skipped (needs deepspeed)"}]


def test_table_has_one_row_per_step_with_its_status():
    t = gpu_check.table(ROWS, "gpu").splitlines()
    assert t[0].startswith("| step | proves | status | device | seconds | tokens/s | peak GPU mem")
    assert t[2] == ("| vllm_sample | smoke | ok | 8 engine process(es) | 2.0 | 500 | 40.5 | "
                    "256 prompts x 2 samples; 0 empty |")
    assert t[3] == "| vllm_rm | proof | FAILED | - | - | - | - | boom |"
    assert t[4] == "| train_dpo | proof | skipped (needs deepspeed) | - | - | - | - | - |"


def test_the_main_proof_runs_before_the_long_engine_steps():
    # review F9: a tight budget drops the end of the list; multi-rank DPO must not be there
    order = [s.name for s in gpu_check.STEPS]
    assert order.index("train_dpo") < min(order.index(s) for s in ("vllm_sample", "switch", "keep"))
    assert order[-1] == "switch"


def test_json_holds_every_row_with_its_fields(tmp_path):
    gpu_check.write_json(str(tmp_path / "out" / "check.json"), ROWS, "gpu", {"mode": "gpu", "exit": 1})
    data = json.loads((tmp_path / "out" / "check.json").read_text())
    assert data["exit"] == 1 and [r["step"] for r in data["rows"]] == ["vllm_sample", "vllm_rm", "train_dpo"]
    assert data["rows"][0] == {"step": "vllm_sample", "kind": "smoke", "status": "ok", "device": "8 engine process(es)",
                               "seconds": 2.0, "tokens_per_s": 500.0, "peak_mem_gib": 40.5,
                               "detail": "256 prompts x 2 samples; 0 empty", "log": None}
    assert data["rows"][1]["detail"] == "boom"


@pytest.mark.skipif(_cuda(), reason="CUDA is present")
def test_gpu_mode_without_cuda_says_use_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env={"AVR_FORCE_NO_CUDA": "1", "PATH": ""})
    assert p.returncode == 2 and "no CUDA device visible" in p.stderr and "--cpu" in p.stderr


# -- real runs ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cpu_toy_models_score_reference_logps_and_json(tmp_path):
    """The CPU steps that need only torch + transformers, for real, through the CLI."""
    out = tmp_path / "out" / "check.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--steps", "hf_rm,ref_logps",
                        "--work", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["step"]: r for r in json.loads(out.read_text())["rows"]}
    assert [rows[s]["status"] for s in ("models", "hf_rm", "ref_logps")] == ["ok"] * 3
    ref = [json.loads(x) for x in (tmp_path / "work" / "ref_logps.jsonl").read_text().splitlines()]
    assert len(ref) == 16 and all(math.isfinite(r["ref_chosen"]) for r in ref)      # 2 ranks x 8 pairs
    assert "| hf_rm | smoke | ok | cpu |" in p.stdout and (tmp_path / "work" / "hf_rm.log").exists()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _cuda(), reason="needs CUDA")
def test_gpu_check_passes_on_this_gpu_machine(tmp_path):
    out = tmp_path / "out" / "check.json"
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--work", str(tmp_path / "work"),
                        "--json", str(out)], capture_output=True, text=True, timeout=620)
    print(p.stdout)
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(r["status"] == "ok" for r in json.loads(out.read_text())["rows"])
