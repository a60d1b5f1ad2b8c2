"""The operator's day (issue #24): the hub mode is explicit, `avr serve` refuses a temporary server,
`avr chat --show-trace` labels every step, and `avr eval` / `avr artifacts` say what is wrong."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from avr_cli.main import main
from avr_core.config import ConfigError, load_config
from avr_core.inputs import InputError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub_unreachable(monkeypatch):
    import huggingface_hub

    def offline(**kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network\nsecond line")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("AVR_HUB_MODE_FROM", "")           # recorded, so the mode apply_mode sets is undone after
    monkeypatch.delenv("AVR_HUB_MODE_FROM")


def test_hub_error_names_the_mode_and_the_fix(hub_unreachable, monkeypatch):
    from avr_core.evaluation import evalset as es
    from avr_core.hub import apply_mode

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    apply_mode(True)                                       # the preset's hub.offline: true
    with pytest.raises(InputError) as e:
        es.hub_references()
    msg = str(e.value)
    assert "\n" not in msg and "hub mode: offline (hub.offline=true)" in msg and "set hub.offline=false" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")              # exported by the user: the env wins, and says so
    monkeypatch.delenv("AVR_HUB_MODE_FROM")
    apply_mode(False)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(InputError, match="HF_HUB_OFFLINE in the environment.*unset HF_HUB_OFFLINE"):
        es.hub_references()


def test_presets_choose_the_hub_mode():
    assert load_config("tiny").hub.offline is True and load_config("paper").hub.offline is False
    with pytest.raises(ConfigError, match="hub.offline"):
        load_config("tiny", ["hub.offline=maybe"])


def test_paper_without_references_is_one_line_error_tiny_falls_back(hub_unreachable, monkeypatch):
    from omegaconf import OmegaConf

    from tasks.evaluate import validate_evalset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paper = OmegaConf.to_container(load_config("paper"), resolve=True)
    with pytest.raises(InputError) as e:
        validate_evalset(paper)
    assert "\n" not in str(e.value) and "eval.allow_example_references=true" in str(e.value)
    tiny = OmegaConf.to_container(load_config("tiny", ["eval.references=hub"]), resolve=True)
    assert validate_evalset(tiny) == 805                   # the shipped file, labelled (a warning)


def test_serve_without_api_url_refuses_in_one_line_and_starts_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "avr_cli", "serve", "--preset", "tiny"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "export PREFECT_API_URL=http://127.0.0.1:4200/api" in out.stderr
    assert not any((tmp_path / "home").rglob("*.db"))     # no temporary server was started


class _Fake:
    """A generator whose answer tells which step asked: [x] answer, [x, y, JUDGE] critique,
    [x, y, JUDGE, c, REFINE] refinement (avr_core.prompts)."""

    def generate(self, convs, params):
        return [[{1: "FIRST", 3: "CRIT", 5: "BETTER"}[len(c)]] for c in convs]


def test_chat_show_trace_labels_every_step(monkeypatch, capsys):
    import avr_core.backends.hf as hf
    import avr_core.model_refs as models

    monkeypatch.setattr(models, "resolve_model_path", lambda ref: ref)
    monkeypatch.setattr(hf, "HFGenerator", lambda path: _Fake())
    assert main(["chat", "--rounds", "1", "--show-trace", "hi"]) == 0
    out = capsys.readouterr().out
    labels = [line for line in out.splitlines() if line.startswith("--- ")]
    assert labels == ["--- first answer ---", "--- round 1 critique ---", "--- round 1 refinement ---",
                      "--- final answer (refine) ---"]
    assert "--- first answer ---\nFIRST\n--- round 1 critique ---\nCRIT\n" in out
    assert out.endswith("--- final answer (refine) ---\nBETTER\n")


def _store_with_rows(root: Path, smoke: bool) -> None:
    from avr_core.evaluation import leaderboard as lb
    rows = [{"date": "d", "run": "r1", "model": m, "stage": m, "R": 0, "n": 4, "win_rate": 50.0, "se": 5.0,
             "lc": None, "lc_kind": "unavailable", "avg_len": 100.0, "judge": "j", "evalset": "e", "artifact": f"a/{m}"}
            for m in ("seed", "stage1")]
    (root / "leaderboard").mkdir(parents=True)
    (root / "leaderboard" / "leaderboard.csv").write_text(lb.to_csv(rows))
    (root / "runs" / "r1").mkdir(parents=True)
    (root / "runs" / "r1" / "config.yaml").write_text(f"eval:\n  smoke: {str(smoke).lower()}\n")


def test_eval_smoke_banner_unknown_model_and_negative_last(tmp_path, capsys):
    _store_with_rows(tmp_path / "tiny", smoke=True)
    _store_with_rows(tmp_path / "paper", smoke=False)
    assert main(["eval", "--store", str(tmp_path / "tiny")]) == 0
    assert capsys.readouterr().out.startswith("SMOKE RUN (tiny preset)")
    assert main(["eval", "--store", str(tmp_path / "paper")]) == 0
    assert "SMOKE" not in capsys.readouterr().out
    assert main(["eval", "--store", str(tmp_path / "tiny"), "--model", "stage3"]) == 2
    assert "its models: seed, stage1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--last", "-2"])
    assert "must be >= 0" in capsys.readouterr().err


def test_artifacts_list_names_a_missing_store_or_stage(tmp_path, capsys):
    assert main(["artifacts", "list", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no artifact store at" in capsys.readouterr().err
    assert main(["artifacts", "list", "--store", str(tmp_path), "--stage", "stage1"]) == 2
    assert "no stage 'stage1'" in capsys.readouterr().err


def test_a_closed_pipe_is_no_traceback():
    r, w = os.pipe()
    os.close(r)                                             # like `| head` that has stopped reading
    out = subprocess.run([sys.executable, "-m", "avr_cli", "config", "--preset", "tiny"], stdout=w,
                         stderr=subprocess.PIPE, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(w)
    assert out.returncode == 141 and "Traceback" not in out.stderr, out.stderr


def test_chat_streams_each_step_as_it_is_generated(tmp_path, monkeypatch, capsys):
    """A real (tiny, random) HF model: the trace reaches stdout through transformers' streamer
    during `generate`, step by step and labelled, then the final answer; the generator is handed
    the streamer for each of its calls (issue 37: `avr chat` printed nothing for 23 min)."""
    import avr_core.backends.hf as hf
    from tests.tiny_models import tiny_llama

    model = tiny_llama(str(tmp_path / "m"))
    real_generate, seen = hf.HFGenerator.generate, []

    def spy(self, convs, params):
        seen.append((self.streamer is not None, capsys.readouterr().out))   # what was printed before this call
        return real_generate(self, convs, params)
    monkeypatch.setattr(hf.HFGenerator, "generate", spy)
    assert main(["chat", "--model", model, "--rounds", "1", "--show-trace", "--max-new-tokens", "6", "hi"]) == 0
    rest = capsys.readouterr().out
    assert [s for s, _ in seen] == [True, True, True]
    assert seen[1][1].startswith("--- first answer ---\n") and seen[2][1].startswith("--- round 1 critique ---\n")
    assert rest.startswith("--- round 1 refinement ---\n") and "--- final answer (refine) ---\n" in rest


def test_chat_plain_answer_streams_to_stdout_and_steps_to_stderr(tmp_path, capsys):
    from tests.tiny_models import tiny_llama

    model = tiny_llama(str(tmp_path / "m"))
    assert main(["chat", "--model", model, "--max-new-tokens", "6", "hi"]) == 0
    plain = capsys.readouterr()
    assert plain.out.endswith("\n") and "---" not in plain.out
    assert main(["chat", "--model", model, "--rounds", "1", "--max-new-tokens", "6", "hi"]) == 0
    steps = capsys.readouterr()
    assert "--- round 1 refinement ---" in steps.err and "---" not in steps.out
