"""The eval set: the shipped 805 AlpacaEval instructions (checksum verified) and clear errors
for a bad user file, naming the file, row or line, and field."""
import json

import pytest

from avr_core.evaluation.evalset import DEFAULT_EVALSET, load_evalset
from avr_core.inputs import InputError


def test_shipped_alpaca_eval_set():
    rows = load_evalset(DEFAULT_EVALSET)
    assert len(rows) == 805 and len({r["instruction"] for r in rows}) == 805
    assert {r["dataset"] for r in rows} == {"helpful_base", "koala", "oasst", "selfinstruct", "vicuna"}
    assert all(r["reference"] and r["messages"] == [{"role": "user", "content": r["instruction"]}] for r in rows)


def test_a_damaged_shipped_file_is_refused(tmp_path):
    bad = tmp_path / "alpaca_eval_805.json"
    bad.write_bytes(open(DEFAULT_EVALSET, "rb").read().replace(b"Broadway", b"Broadwey", 1))
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_evalset(str(bad))


@pytest.mark.parametrize("content, match", [
    ([{"instruction": "a", "output": "x"}, {"instruction": "b"}], r"row 2: field 'output': missing"),
    ([{"instruction": "a", "output": 3}], r"row 1: field 'output': must be text"),
    ([{"instruction": "  ", "output": "x"}], r"row 1: field 'instruction': empty"),
    ([{"instruction": "a", "output": "x"}, {"instruction": "a", "output": "y"}],
     r"row 2: field 'instruction': duplicate"),
    ([], "no rows"),
])
def test_bad_json_rows(tmp_path, content, match):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(content))
    with pytest.raises(InputError, match=match) as e:
        load_evalset(str(f))
    assert str(f) in str(e.value)


def test_jsonl_lines_and_invalid_json(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"instruction": "a", "output": "x", "generator": "gpt4_turbo"}\n{"instruction": "b", "output": \n')
    with pytest.raises(InputError, match=r"mine.jsonl:2: invalid JSON"):
        load_evalset(str(f))
    f.write_text('{"instruction": "a", "output": "x", "generator": "gpt4_turbo"}\n')
    assert load_evalset(str(f))[0]["reference_generator"] == "gpt4_turbo"


@pytest.mark.parametrize("line, phrase", [
    ('{"instruction": "a", "output": "x\\ud800"}', "field 'output': not valid Unicode"),
    ('{"instruction": "a", "output": ' + "1" * 5000 + "}", "more than 4300 digits"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_what_json_reads_but_cannot_use_is_one_line_naming_the_line(tmp_path, line, phrase):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"instruction": "q", "output": "x"}\n' + line + "\n")
    with pytest.raises(InputError) as e:
        load_evalset(str(f))
    assert str(e.value).startswith(f"{f}:2: ") and phrase in str(e.value) and "\n" not in str(e.value)
