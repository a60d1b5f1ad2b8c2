"""The `avr` command: bad input is rejected before any work, with file/line/field or key named."""
import subprocess
import sys

from avr_cli.main import main


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_prompt_file_names_file_line_field_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": [{"role": "bot", "content": "hi"}]}\n')
    store = tmp_path / "store"
    code, err = run(["run", "--preset", "tiny", f"data.prompts={bad}", f"store.root={store}"], capsys)
    assert code == 2
    assert "prompts.jsonl:2" in err and "messages[0].role" in err and "Traceback" not in err
    assert not store.exists()


def test_bad_override_names_the_key(tmp_path, capsys):
    code, err = run(["run", "--preset", "tiny", "critique.kk=3", f"store.root={tmp_path}/s"], capsys)
    assert code == 2 and "critique.kk" in err
    code, err = run(["run", "--preset", "tiny", "critique.k"], capsys)
    assert code == 2 and "key=value" in err
    assert not (tmp_path / "s").exists()


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "--preset", "paper", "critique.k=3"]) == 0
    out = capsys.readouterr().out
    assert "k: 3" in out and "Meta-Llama-3-8B-Instruct" in out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "avr_cli", "config", "--preset", "tiny"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "force_rating: true" in out.stdout


def test_chat_rejects_rounds_out_of_range(capsys):
    code, err = run(["chat", "--rounds", "6", "hi"], capsys)
    assert code == 2 and "0..5" in err


def test_bad_eval_file_is_rejected_before_any_work(tmp_path, capsys):
    bad = tmp_path / "eval.json"
    bad.write_text('[{"instruction": "q", "output": "a"}, {"instruction": "q2"}]')
    code, err = run(["run", "--preset", "tiny", f"eval.prompts={bad}", f"store.root={tmp_path}/s"], capsys)
    assert code == 2 and f"{bad}: row 2: field 'output': missing" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_avr_eval_prints_the_leaderboard_from_the_store(tmp_path, capsys):
    from avr_core.evaluation import leaderboard as lb
    rows = [{"date": "d", "run": f"r{i}", "model": m, "stage": m, "R": 0, "n": 4, "win_rate": 50.0 + i, "se": 5.0,
             "lc": None, "lc_kind": "unavailable", "avg_len": 100.0, "judge": "j", "evalset": "e", "artifact": f"a/{i}"}
            for i, m in enumerate(["seed", "stage1", "seed"])]
    (tmp_path / "leaderboard").mkdir()
    (tmp_path / "leaderboard" / "leaderboard.csv").write_text(lb.to_csv(rows))
    assert main(["eval", "--store", str(tmp_path), "--model", "seed"]) == 0
    out = capsys.readouterr().out
    assert out.count("| seed |") == 2 and "52.0 ± 5.0" in out and "stage1" not in out
    assert main(["eval", "--store", str(tmp_path / "empty")]) == 1
