"""Issue #7, the bad-input corpus: every malformed input below is rejected by the `avr` command
before any work -- exit code 2, a one-line message naming the file and line (or row) and the
field, or the config key, no traceback, and nothing written: no store, no ./artifacts, no runs/.

One table: (id, what to write under the case's input folder, argv, what the error must say).
In argv and in the expected strings, `{d}` is that input folder. `avr run` gets
`store.root=<tmp>/store` appended; the working directory is an empty folder that must stay empty.
If a case ever gets past validation, the pipeline is replaced by a stub that fails the test at
once, so a missed check never starts a model or a Prefect server.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

from avr_cli.main import main


class Case(NamedTuple):
    id: str
    make: Callable[[Path], None] | None   # writes the bad input under the input folder
    argv: list[str]                        # `avr` arguments; `{d}` = the input folder
    expect: list[str]                      # substrings of stderr; `{d}` = the input folder
    needs_non_root: bool = False           # root may write anywhere: a read-only folder is no test


def _text(name: str, text: str):
    return lambda d: (d / name).write_text(text, encoding="utf-8")


def _bytes(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _jsonl(name: str, *rows):
    return _text(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _parquet(name: str, columns: dict):
    def make(d: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table(columns), d / name)
    return make


def _mkdir(name: str, *files: str):
    def make(d: Path) -> None:
        (d / name).mkdir()
        for f in files:
            (d / name / f).write_text("x")
    return make


def _read_only_dir(name: str):
    def make(d: Path) -> None:
        (d / name).mkdir()
        (d / name).chmod(0o555)
    return make


def _leaderboard(text: str):
    def make(d: Path) -> None:
        (d / "st" / "leaderboard").mkdir(parents=True)
        (d / "st" / "leaderboard" / "leaderboard.csv").write_text(text)
    return make


OK = {"prompt": "Name three primes."}
U = lambda text: {"role": "user", "content": text}          # noqa: E731
A = lambda text: {"role": "assistant", "content": text}     # noqa: E731


def _run(*overrides: str) -> list[str]:
    return ["run", "--preset", "tiny", *overrides]


P = "data.prompts={d}/p.jsonl"
E = "eval.prompts={d}/e.jsonl"

CASES = [
    # ---- prompt files (data.prompts): avr_core/inputs.py -------------------------------------
    Case("prompts-empty-file", _text("p.jsonl", ""), _run(P), ["{d}/p.jsonl", "empty"]),
    Case("prompts-blank-lines-only", _text("p.jsonl", "\n  \n\n"), _run(P), ["{d}/p.jsonl", "empty"]),
    Case("prompts-invalid-json-line-3", _jsonl("p.jsonl", OK, {"prompt": "b"}, '{"prompt": "c",}'),
         _run(P), ["{d}/p.jsonl:3", "invalid JSON"]),
    Case("prompts-invalid-utf8-line-2", _bytes("p.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'),
         _run(P), ["{d}/p.jsonl:2", "invalid UTF-8"]),
    Case("prompts-wrong-role", _jsonl("p.jsonl", OK, {"messages": [{"role": "bot", "content": "hi"}]}),
         _run(P), ["{d}/p.jsonl:2", "field 'messages[0].role'", "'bot'"]),
    Case("prompts-assistant-first", _jsonl("p.jsonl", {"messages": [A("hello"), U("hi")]}),
         _run(P), ["{d}/p.jsonl:1", "field 'messages[0].role'", "'assistant'"]),
    Case("prompts-turns-do-not-alternate", _jsonl("p.jsonl", OK, OK | {"id": 2},
                                                   {"messages": [U("a"), U("b")]}),
         _run(P), ["{d}/p.jsonl:3", "field 'messages[1].role'", "alternate"]),
    Case("prompts-empty-content", _jsonl("p.jsonl", {"messages": [U("  ")]}),
         _run(P), ["{d}/p.jsonl:1", "field 'messages[0].content'", "empty"]),
    Case("prompts-empty-prompt", _jsonl("p.jsonl", OK, {"prompt": ""}),
         _run(P), ["{d}/p.jsonl:2", "field 'prompt'", "empty"]),
    Case("prompts-missing-prompt-and-messages", _jsonl("p.jsonl", OK, {"question": "why?"}),
         _run(P), ["{d}/p.jsonl:2", "field 'prompt/messages'", "missing", "'question'"]),
    Case("prompts-non-string-content", _jsonl("p.jsonl", {"messages": [{"role": "user", "content": 42}]}),
         _run(P), ["{d}/p.jsonl:1", "field 'messages[0].content'", "expected a string"]),
    Case("prompts-messages-not-a-list", _jsonl("p.jsonl", {"messages": "hi"}),
         _run(P), ["{d}/p.jsonl:1", "field 'messages'", "expected a list"]),
    Case("prompts-huge-line", _jsonl("p.jsonl", OK, {"prompt": "x" * 250_000}),
         _run(P), ["{d}/p.jsonl:2", "field 'prompt'", "max_chars"]),
    Case("prompts-duplicate-ids", _jsonl("p.jsonl", {"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                         {"id": "a", "prompt": "z"}),
         _run(P), ["{d}/p.jsonl:3", "field 'id'", "duplicate id 'a'", "line 1"]),
    Case("prompts-bad-id-type", _jsonl("p.jsonl", {"id": [1], "prompt": "x"}),
         _run(P), ["{d}/p.jsonl:1", "field 'id'"]),
    Case("prompts-parquet-wrong-columns", _parquet("p.parquet", {"question": ["a"], "answer": ["b"]}),
         _run("data.prompts={d}/p.parquet"), ["{d}/p.parquet", "'prompt'", "'messages'", "'question'"]),
    Case("prompts-parquet-bad-row", _parquet("p.parquet", {"prompt": ["a", "b", " "]}),
         _run("data.prompts={d}/p.parquet"), ["{d}/p.parquet: row 3", "field 'prompt'", "empty"]),
    Case("prompts-json-array-bad-row", _text("p.json", '[\n  {"prompt": "a"},\n  {"prompt": "b"},\n'
                                                       '  {"messages": [{"role": "user"}]}\n]\n'),
         _run("data.prompts={d}/p.json"), ["{d}/p.json:4", "field 'messages[0].content'", "missing"]),
    Case("prompts-json-not-an-array", _text("p.json", '{"prompt": "a"}'),
         _run("data.prompts={d}/p.json"), ["{d}/p.json:1", "expected a JSON array"]),
    Case("prompts-missing-file", None, _run("data.prompts={d}/nope.jsonl"),
         ["{d}/nope.jsonl", "no such file"]),
    Case("prompts-dir-not-a-dataset", _mkdir("ds", "readme.txt"), _run("data.prompts={d}/ds"),
         ["{d}/ds", "not a dataset"]),
    Case("prompts-unsupported-extension", _text("p.csv", "prompt\nhi\n"), _run("data.prompts={d}/p.csv"),
         ["{d}/p.csv", "unsupported file type '.csv'"]),
    # issue 34: what json.loads raises besides JSONDecodeError, and text that parses but cannot be written
    Case("prompts-integer-too-long", _text("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "id": ' + "9" * 5000 + "}\n"),
         _run(P), ["{d}/p.jsonl:2", "invalid JSON", "more than 4300 digits"]),
    Case("prompts-lone-surrogate", _jsonl("p.jsonl", OK, {"prompt": "caf\ud800"}),
         _run(P), ["{d}/p.jsonl:2", "field 'prompt'", "not valid Unicode", "lone surrogate"]),
    Case("prompts-nested-too-deep", _text("p.json", '[\n {"prompt": "a"},\n ' + "[" * 100_000 + "]" * 100_000 + "\n]"),
         _run("data.prompts={d}/p.json"), ["{d}/p.json:3", "invalid JSON", "nested too deeply"]),
    # ---- eval files (eval.prompts): avr_core/evaluation/evalset.py ---------------------------
    Case("eval-missing-instruction", _jsonl("e.jsonl", {"instruction": "q", "output": "a"}, {"output": "b"}),
         _run(E), ["{d}/e.jsonl:2", "field 'instruction'", "missing"]),
    Case("eval-bad-json", _text("e.jsonl", '{"instruction": "q", "output": "a"}\n{"instruction": \n'),
         _run(E), ["{d}/e.jsonl:2", "invalid JSON"]),
    Case("eval-json-array-bad-json", _text("e.json", '[\n {"instruction": "q", "output": "a"},\n {oops}\n]'),
         _run("eval.prompts={d}/e.json"), ["{d}/e.json:3", "invalid JSON"]),
    Case("eval-output-not-text", _jsonl("e.jsonl", {"instruction": "q", "output": 3}),
         _run(E), ["{d}/e.jsonl:1", "field 'output'", "must be text"]),
    Case("eval-missing-file", None, _run("eval.prompts={d}/none.json"), ["{d}/none.json", "not found"]),
    Case("eval-lone-surrogate", _jsonl("e.jsonl", {"instruction": "q", "output": "a\udfff"}),
         _run(E), ["{d}/e.jsonl:1", "field 'output'", "lone surrogate"]),
    # ---- configs: avr_core/config.py and the pre-flight checks in run_records/preflight.py --------------
    Case("config-unknown-key", None, _run("policy.pth=x"), ["key 'policy.pth'"]),
    Case("config-wrong-type", None, _run("critique.k=abc"), ["key 'critique.k'", "abc"]),
    Case("config-wrong-type-bool", None, _run("policy.trust_remote_code=maybe"),
         ["key 'policy.trust_remote_code'"]),
    Case("config-negative-k", None, _run("critique.k=-1"), ["key 'critique.k'", ">= 1"]),
    Case("config-temperature-out-of-range", None, _run("refine.sampling.temperature=3.5"),
         ["key 'refine.sampling.temperature'", "[0, 2]"]),
    Case("config-top-p-out-of-range", None, _run("critique.sampling.top_p=0"),
         ["key 'critique.sampling.top_p'", "(0, 1]"]),
    Case("config-max-new-tokens-zero", None, _run("respond.sampling.max_new_tokens=0"),
         ["key 'respond.sampling.max_new_tokens'"]),
    Case("config-shard-size-zero", None, _run("shard_size=0"), ["key 'shard_size'", ">= 1"]),
    Case("config-bad-slice", None, _run("data.stage1_sft=[5,1]"), ["key 'data.stage1_sft'"]),
    Case("config-empty-prompt-path", None, _run("data.prompts="), ["key 'data.prompts'"]),
    Case("config-openai-without-base-url", None, _run("generator.kind=openai"), ["key 'generator.base_url'"]),
    Case("config-bogus-judge-kind", None, _run("eval.judge.kind=bogus"), ["key 'eval.judge.kind'", "bogus"]),
    Case("config-bogus-eval-model", None, _run("eval.models=[seed,bogus]"), ["key 'eval.models'"]),
    Case("config-cron-too-few-fields", None, _run("schedule.cron=0 2 *"), ["key 'schedule.cron'"]),
    Case("config-cron-out-of-range", None, _run("schedule.cron=61 2 * * *"), ["key 'schedule.cron'", "61"]),
    Case("config-bad-timezone", None, _run("schedule.timezone=Europe"), ["key 'schedule.timezone'"]),
    Case("config-missing-policy-dir", None, _run("policy.path={d}/no-such-model"),
         ["key 'policy.path'", "{d}/no-such-model"]),
    Case("config-policy-dir-not-a-model", _mkdir("empty-model"), _run("policy.path={d}/empty-model"),
         ["key 'policy.path'", "config.json"]),
    Case("config-missing-scorer-dir", None, _run("scorer.model.path={d}/rm"), ["key 'scorer.model.path'"]),
    Case("config-unknown-embedded-model", None, _run("policy.path=embedded:gpt-5"),
         ["key 'policy.path'", "embedded:gpt-5"]),
    Case("config-missing-local-judge", None, _run("eval.judge.local_model=./no/judge"),
         ["key 'eval.judge.local_model'"]),
    Case("config-store-root-is-a-file", _text("afile", "x"), ["run", "--preset", "tiny", "store.root={d}/afile"],
         ["key 'store.root'", "{d}/afile", "not a directory"]),
    Case("config-store-root-under-a-file", _text("afile", "x"),
         ["run", "--preset", "tiny", "store.root={d}/afile/store"], ["key 'store.root'", "{d}/afile"]),
    Case("config-store-root-read-only", _read_only_dir("ro"), ["run", "--preset", "tiny", "store.root={d}/ro/store"],
         ["key 'store.root'", "{d}/ro", "not writable"], needs_non_root=True),
    Case("config-bad-preset-name", None, ["run", "--preset", "nosuchpreset"], ["nosuchpreset", "preset not found"]),
    Case("config-bad-yaml-file", _text("my.yaml", "preset: mine\ncritique:\n\tk: 2\n"),
         ["run", "--preset", "{d}/my.yaml"], ["{d}/my.yaml:3", "invalid YAML", "cannot start any token"]),
    Case("config-yaml-unknown-key", _text("my.yaml", "preset: mine\ncritique:\n  k: 2\n  kk: 3\n"),
         ["run", "--preset", "{d}/my.yaml"], ["{d}/my.yaml:4", "key 'critique.kk'"]),
    Case("config-yaml-wrong-type", _text("my.yaml", "preset: mine\nrefine:\n  m: two\n"),
         ["run", "--preset", "{d}/my.yaml"], ["{d}/my.yaml:3", "key 'refine.m'"]),
    Case("config-yaml-not-a-mapping", _text("my.yaml", "- a\n- b\n"),
         ["run", "--preset", "{d}/my.yaml"], ["{d}/my.yaml"]),
    Case("config-yaml-control-byte", _bytes("my.yaml", b"preset: mine\ncritique:\n  k: 2\x01\n"),
         ["run", "--preset", "{d}/my.yaml"], ["{d}/my.yaml:3", "invalid YAML", "#x0001"]),
    Case("config-yaml-missing-interpolation", _text("my.yaml", "preset: mine\ncritique:\n  k: ${nope.k}\n"),
         ["run", "--preset", "{d}/my.yaml"], ["{d}/my.yaml:3", "key 'critique.k'", "'nope.k' not found"]),
    Case("config-command-rejects-too", None, ["config", "--preset", "tiny", "critique.k=0"], ["key 'critique.k'"]),
    # ---- key=value overrides -----------------------------------------------------------------
    Case("override-without-equals", None, _run("critique.k"), ["'critique.k'", "key=value"]),
    Case("override-empty-key", None, _run("=3"), ["'=3'", "key=value"]),
    Case("override-space-in-key", None, _run("critique .k=3"), ["key=value"]),
    Case("override-section-with-scalar", None, _run("critique=3"), ["key 'critique'"]),
    Case("override-scalar-with-section", None, _run("critique.k.x=1"), ["critique.k"]),
    Case("override-not-yaml", None, _run("critique.k=[1"), ["override 'critique.k=[1'", "key 'critique.k'",
                                                          "not valid YAML"]),
    Case("override-control-character", None, _run("data.prompts=a\x01b"), ["key 'data.prompts'",
                                                                           "control character", "'\\x01'"]),
    Case("override-newline", None, _run("policy.path=a\nb"), ["key 'policy.path'", "control character"]),
    Case("override-missing-interpolation", None, _run("policy.path=${nope.key}"),
         ["override 'policy.path=${nope.key}': key 'policy.path'", "'nope.key' not found"]),
    # ---- other commands ----------------------------------------------------------------------
    Case("eval-leaderboard-wrong-columns", _leaderboard("foo,bar\n1,2\n"), ["eval", "--store", "{d}/st"],
         ["{d}/st/leaderboard/leaderboard.csv", "line 1", "'win_rate'"]),
    Case("eval-leaderboard-not-a-number", _leaderboard(
         "date,run,model,stage,R,n,win_rate,se,lc,lc_kind,avg_len,judge,evalset,artifact\n"
         "d,r1,seed,seed,0,4,50.0,5.0,,unavailable,100,j,e,a/1\n"
         "d,r2,seed,seed,0,4,fifty,5.0,,unavailable,100,j,e,a/2\n"), ["eval", "--store", "{d}/st"],
         ["{d}/st/leaderboard/leaderboard.csv", "line 3", "field 'win_rate'", "'fifty'"]),
    Case("chat-missing-model-dir", None, ["chat", "--model", "{d}/no-model", "hi"],
         ["--model {d}/no-model", "no such model directory"]),
    Case("chat-hub-id-not-cached", None, ["chat", "--model", "no-such-org/no-such-model", "hi"],
         ["--model no-such-org/no-such-model", "cannot load"]),
    Case("cli-unknown-option", None, ["run", "--bogus"], ["unrecognized arguments: --bogus"]),
]


@pytest.fixture(autouse=True)
def _no_pipeline(monkeypatch):
    """A case that gets past validation fails here instead of running the pipeline."""
    import flows.pipeline

    def started(*a, **k):
        raise AssertionError("bad input got past validation: the pipeline would have started")
    monkeypatch.setattr(flows.pipeline, "pipeline", started)


def test_corpus_is_large_and_ids_unique():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=pytest.mark.skipif(c.needs_non_root and os.geteuid() == 0,
                                                      reason="running as root: nothing is read-only"))
    for c in CASES])
def test_bad_input_is_rejected_cleanly(case: Case, tmp_path, monkeypatch, capsys):
    d, cwd, store = tmp_path / "in", tmp_path / "cwd", tmp_path / "store"
    d.mkdir()
    cwd.mkdir()
    if case.make:
        case.make(d)
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    monkeypatch.chdir(cwd)                                     # ./artifacts or runs/ would land here
    monkeypatch.delenv("AVR_STORE", raising=False)
    monkeypatch.setenv("AVR_DATA_DIR", str(tmp_path / "data"))  # no embedded-model conversion either
    fill = lambda s: s.replace("{d}", str(d))                   # noqa: E731
    argv = [fill(a) for a in case.argv]
    if argv[0] == "run" and not any(a.startswith("store.root=") for a in argv):
        argv.append(f"store.root={store}")

    try:
        code = main(argv)
    except SystemExit as e:   # argparse's own usage errors
        code = e.code
    finally:
        for p in [d, *d.rglob("*")]:   # a read-only folder back to writable, for tmp_path's cleanup
            if p.is_dir():
                p.chmod(0o755)
    out, err = capsys.readouterr()

    assert code == 2, f"exit {code}; stderr: {err}"
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()   # one line (argparse: its usage line, then one line)
    assert lines and lines[-1].startswith("avr: error: ") and (len(lines) == 1 or lines[0].startswith("usage:")), err
    for want in map(fill, case.expect):
        assert want in err, f"{want!r} not in stderr: {err}"
    assert not store.exists() or not any(store.iterdir()), "something was written to the store"
    assert not any(cwd.iterdir()), f"written to the working directory: {list(cwd.iterdir())}"
    assert not (tmp_path / "data").exists(), "a model was prepared"
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before, "the input folder changed"
