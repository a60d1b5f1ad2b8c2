"""avr_core.inputs: every accepted format round-trips; every malformed file names file, line, field."""

import json
import pickle
from pathlib import Path

import pytest

from avr_core.inputs import InputError, load_prompts

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

TINY = Path(__file__).resolve().parents[1] / "avr_core" / "data" / "tiny_prompts.jsonl"


def write_jsonl(path: Path, rows) -> str:
    """Rows are dicts (dumped) or str (written verbatim, for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def load_error(path, **kw) -> InputError:
    with pytest.raises(InputError) as ei:
        load_prompts(path, **kw)
    return ei.value


def assert_names(err: InputError, path, line, field):
    """The error points at the file, the line/row and the field, in attributes and message."""
    assert err.path == str(path)
    assert err.line == line
    assert err.field == field
    msg = str(err)
    assert msg.startswith(str(path))
    if line is not None:
        assert (f":{line}:" if err.unit == "line" else f": row {line}:") in msg
    if field is not None:
        assert f"field {field!r}" in msg


# --------------------------------------------------------------------------- accepted formats

ROWS = [
    {"id": "a", "prompt": "Name three primes."},
    {"id": 2, "messages": [U("2+2?"), A("4")], "source": "extra fields are ignored"},
    {"messages": [S("Be brief."), U("Hi"), A("Hello!"), U("Bye?")]},
    {"messages": [S("Be brief."), U("Capital of France?"), A("Paris.")]},
]
EXPECTED = [
    {"id": "a", "messages": [U("Name three primes.")], "answer": None},
    {"id": "2", "messages": [U("2+2?")], "answer": "4"},
    {"id": None, "messages": [S("Be brief."), U("Hi"), A("Hello!"), U("Bye?")], "answer": None},
    {"id": None, "messages": [S("Be brief."), U("Capital of France?")], "answer": "Paris."},
]


def check_records(records):
    assert len(records) == len(EXPECTED)
    for got, want in zip(records, EXPECTED):
        assert set(got) == {"id", "messages", "answer"}
        assert got["messages"] == want["messages"] and got["answer"] == want["answer"]
        if want["id"] is None:
            assert got["id"].startswith("p-") and len(got["id"]) == 14
        else:
            assert got["id"] == want["id"]


def test_jsonl_roundtrip_with_blank_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n" + "\n\n".join(json.dumps(r) for r in ROWS) + "\n\n", encoding="utf-8")
    check_records(load_prompts(str(path)))


def test_jsonl_prompt_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, {"prompt": "y", "id": "b"}])
    recs = load_prompts(path)
    assert recs[0]["messages"] == [U("x")] and recs[0]["answer"] is None
    assert recs[1] == {"id": "b", "messages": [U("y")], "answer": None}


def test_final_assistant_turn_is_the_answer(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [U("q1"), A("a1"), U("q2"), A("a2")]}])
    [rec] = load_prompts(path)
    assert rec["messages"] == [U("q1"), A("a1"), U("q2")] and rec["answer"] == "a2"


def test_hash_ids_are_stable_and_ignore_row_form(tmp_path):
    a = load_prompts(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hello"}]))[0]["id"]
    b = load_prompts(write_jsonl(tmp_path / "b.jsonl", [{"messages": [U("Hello")]}]))[0]["id"]
    c = load_prompts(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Hello", "meta": 1}]))[0]["id"]
    assert a == b == c and a.startswith("p-")


def test_turn_extra_keys_dropped(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q", "name": "x"}]}])
    assert load_prompts(path)[0]["messages"] == [U("q")]


def test_json_array_roundtrip(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    check_records(load_prompts(str(path)))


def test_parquet_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prompts.parquet"
    rows = [{"id": str(r.get("id")) if "id" in r else None, "prompt": r.get("prompt"),
             "messages": r.get("messages")} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), path)
    check_records(load_prompts(str(path)))


def test_saved_dataset_dir_roundtrip(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"id": f"r{i}", "messages": r["messages"]}
                                     for i, r in enumerate(ROWS[1:])])
    ds.save_to_disk(str(tmp_path / "ds"))
    recs = load_prompts(str(tmp_path / "ds"))
    assert [r["id"] for r in recs] == ["r0", "r1", "r2"]
    assert [(r["messages"], r["answer"]) for r in recs] == [(w["messages"], w["answer"]) for w in EXPECTED[1:]]


def test_saved_datasetdict_uses_train_or_the_only_split(tmp_path):
    import datasets

    one = datasets.Dataset.from_list([{"prompt": "one"}])
    two = datasets.Dataset.from_list([{"prompt": "two"}])
    datasets.DatasetDict({"test": one, "train": two}).save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(str(tmp_path / "dd"))[0]["messages"] == [U("two")]
    datasets.DatasetDict({"eval": one}).save_to_disk(str(tmp_path / "single"))
    assert load_prompts(str(tmp_path / "single"))[0]["messages"] == [U("one")]
    datasets.DatasetDict({"a": one, "b": two}).save_to_disk(str(tmp_path / "many"))
    err = load_error(str(tmp_path / "many"))
    assert "'a'" in str(err) and "'b'" in str(err)


def test_limit_after_validating_everything(tmp_path):
    rows = [{"prompt": f"q{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert [r["messages"][0]["content"] for r in load_prompts(path, limit=2)] == ["q0", "q1"]
    assert load_prompts(path, limit=0) == []
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + [{"prompt": ""}])
    assert_names(load_error(bad, limit=1), bad, 6, "prompt")  # the bad row is past the limit
    with pytest.raises(ValueError):
        load_prompts(path, limit=-1)


def test_shipped_tiny_prompts():
    recs = load_prompts(str(TINY))
    assert 40 <= len(recs) <= 60
    ids = [r["id"] for r in recs]
    assert len(set(ids)) == len(ids) and all(i.startswith("tiny-") for i in ids)
    assert all(r["answer"] is None and len(r["messages"]) == 1 for r in recs)
    assert all(len(r["messages"][0]["content"]) < 200 for r in recs)
    assert len({r["messages"][0]["content"] for r in recs}) == len(recs)


def test_error_is_a_valueerror_and_picklable(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}])
    err = load_error(path)
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and (back.path, back.line, back.field) == (err.path, 1, "prompt")


def test_message_format_matches_the_contract(tmp_path):
    rows = [{"id": i, "prompt": "ok"} for i in range(6)]
    rows.append({"messages": [U("hi"), {"role": "bot", "content": "yo"}]})
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    assert str(load_error(path)) == (f"{path}:7: field 'messages[1].role': "
                                     "expected 'user' or 'assistant' or 'system', got 'bot'")


# --------------------------------------------------------------------------- malformed input
# Each case: the rows of a JSONL file (dicts dumped, strings verbatim), the line, the field,
# and a phrase the reason must contain.

def ok(n=0):
    return {"prompt": f"fine {n}"}


MALFORMED_JSONL = {
    "invalid_json_line_3": ([ok(1), ok(2), '{"prompt": "oops"'], 3, None, "invalid JSON"),
    "row_not_object": ([ok(), '["a list"]'], 2, None, "got a list"),
    "row_is_string": (['"just text"'], 1, None, "got a string"),
    "missing_prompt_and_messages": ([ok(), {"text": "hi"}], 2, "prompt/messages", "'text'"),
    "null_prompt_counts_as_missing": ([{"prompt": None}], 1, "prompt/messages", "missing"),
    "both_prompt_and_messages": ([{"prompt": "a", "messages": [U("b")]}], 1, "prompt/messages", "both"),
    "empty_prompt": ([ok(1), ok(2), ok(3), {"prompt": ""}], 4, "prompt", "empty"),
    "whitespace_prompt": ([{"prompt": " \n\t "}], 1, "prompt", "empty"),
    "non_string_prompt": ([{"prompt": 42}], 1, "prompt", "expected a string, got a number"),
    "messages_not_list": ([{"messages": "hello"}], 1, "messages", "expected a list"),
    "messages_empty_list": ([{"messages": []}], 1, "messages", "empty list"),
    "turn_not_object": ([{"messages": ["hello"]}], 1, "messages[0]", "got a string"),
    "wrong_role": ([{"messages": [U("hi"), {"role": "bot", "content": "x"}]}], 1, "messages[1].role",
                   "expected 'user' or 'assistant' or 'system', got 'bot'"),
    "missing_role": ([{"messages": [{"content": "x"}]}], 1, "messages[0].role", "missing"),
    "non_string_role": ([{"messages": [{"role": 1, "content": "x"}]}], 1, "messages[0].role", "got a number"),
    "assistant_first": ([{"messages": [A("hi"), U("x")]}], 1, "messages[0].role", "start with 'system' or 'user'"),
    "assistant_after_system": ([{"messages": [S("s"), A("x")]}], 1, "messages[1].role", "expected 'user'"),
    "non_alternating": ([{"messages": [U("a"), U("b")]}], 1, "messages[1].role", "alternate"),
    "non_alternating_later": ([{"messages": [U("a"), A("b"), A("c")]}], 1, "messages[2].role", "expected 'user'"),
    "system_not_first": ([{"messages": [U("a"), S("b")]}], 1, "messages[1].role", "first turn"),
    "no_user_turn": ([{"messages": [S("only a system prompt")]}], 1, "messages", "no user turn"),
    "empty_content": ([{"messages": [U("")]}], 1, "messages[0].content", "empty"),
    "missing_content": ([{"messages": [{"role": "user"}]}], 1, "messages[0].content", "missing"),
    "non_string_content": ([{"messages": [U("a"), {"role": "assistant", "content": ["x"]}]}], 1,
                           "messages[1].content", "expected a string, got a list"),
    "bad_id_type": ([{"id": 1.5, "prompt": "a"}], 1, "id", "string or an integer"),
    "bool_id": ([{"id": True, "prompt": "a"}], 1, "id", "string or an integer"),
    "empty_id": ([{"id": " ", "prompt": "a"}], 1, "id", "empty"),
    "duplicate_ids": ([{"id": "x", "prompt": "a"}, ok(), {"id": "x", "prompt": "b"}], 3, "id", "line 1"),
    "duplicate_int_and_str_id": ([{"id": 5, "prompt": "a"}, {"id": "5", "prompt": "b"}], 2, "id", "line 1"),
    "duplicate_rows_without_id": ([{"prompt": "same"}, {"prompt": "same"}], 2, "id", "line 1"),
    # issue 34: what json.loads raises besides JSONDecodeError, and strings that parse but cannot be written
    "integer_too_long": ([ok(), '{"prompt": "a", "id": ' + "9" * 5000 + "}"], 2, None, "more than 4300 digits"),
    "nested_too_deep": ([ok(), "[" * 100_000 + "]" * 100_000], 2, None, "nested too deeply"),
    "lone_surrogate_prompt": ([ok(), {"prompt": "bad \ud800 text"}], 2, "prompt", "lone surrogate '\\ud800'"),
    "lone_surrogate_answer": ([{"messages": [U("a"), A("b\udfff")]}], 1, "messages[1].content", "not valid Unicode"),
    "lone_surrogate_id": ([{"id": "x\ud83d", "prompt": "a"}], 1, "id", "lone surrogate"),
    "lone_surrogate_constraint": ([{"prompt": "a", "constraints": [{"id": "c", "kwargs": {"w": "\ud800"}}]}], 1,
                                  "constraints[0].kwargs.w", "lone surrogate"),
}


@pytest.mark.parametrize("rows,line,field,phrase", MALFORMED_JSONL.values(), ids=MALFORMED_JSONL.keys())
def test_malformed_jsonl(tmp_path, rows, line, field, phrase):
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    err = load_error(path)
    assert_names(err, path, line, field)
    assert phrase in str(err)


def test_blank_lines_still_count(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": 3}\n', encoding="utf-8")
    assert_names(load_error(str(path)), path, 4, "prompt")


def test_huge_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [ok(), {"messages": [U("q"), A("x" * 300)]}])
    assert len(load_prompts(path)) == 2
    err = load_error(path, max_chars=200)
    assert_names(err, path, 2, "messages[1].content")
    assert "max_chars=200" in str(err)
    huge = write_jsonl(tmp_path / "huge.jsonl", [ok(1), ok(2), {"prompt": "y" * 200_001}])
    assert_names(load_error(huge), huge, 3, "prompt")


def test_empty_file(tmp_path):
    for name, text in [("e.jsonl", ""), ("blank.jsonl", "\n \n\n"), ("e.json", "[]"), ("w.json", "  ")]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        err = load_error(str(path))
        assert_names(err, path, None, None)
        assert "empty" in str(err)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')
    err = load_error(str(path))
    assert_names(err, path, 3, None)
    assert "UTF-8" in str(err)
    jpath = tmp_path / "p.json"
    jpath.write_bytes(b'[\n {"prompt": "a"},\n {"prompt": "\xff"}\n]')
    assert_names(load_error(str(jpath)), jpath, 3, None)


def test_json_errors_name_the_line_of_the_row(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n  {"prompt": "a"},\n\n  {"prompt": "b",\n   "id": 1},\n  {"messages": [{"role": "bot", '
                    '"content": "x"}]}\n]', encoding="utf-8")
    assert_names(load_error(str(path)), path, 6, "messages[0].role")
    path.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]', encoding="utf-8")
    assert_names(load_error(str(path)), path, 3, None)
    path.write_text('{"prompt": "a"}', encoding="utf-8")
    assert "JSON array" in str(load_error(str(path)))
    path.write_text('[{"prompt": "a"}, 7]', encoding="utf-8")
    assert_names(load_error(str(path)), path, 1, None)


def test_json_number_and_nesting_errors_name_the_line_outside_strings(tmp_path):
    """json.loads gives no position for these: the line is found by a scan that skips strings (a
    prompt made of digits or brackets is text, not the problem)."""
    path = tmp_path / "p.json"
    path.write_text('[\n {"prompt": "' + "1" * 5000 + '"},\n {"prompt": "[[[[\\"",\n  "id": ' + "9" * 5000
                    + "}\n]", encoding="utf-8")
    err = load_error(str(path))
    assert_names(err, path, 4, None)
    assert "a number with more than 4300 digits" in str(err)
    path.write_text('[\n {"prompt": "a"},\n ' + "[" * 100_000 + "]" * 100_000 + "\n]", encoding="utf-8")
    err = load_error(str(path))
    assert_names(err, path, 3, None)
    assert "nested too deeply" in str(err)


def test_parquet_wrong_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": "b"}]), path)
    err = load_error(str(path))
    assert_names(err, path, None, None)
    assert "'instruction', 'output'" in str(err) and "'prompt'" in str(err)


def test_parquet_bad_row_says_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "  "}]), path)
    err = load_error(str(path))
    assert_names(err, path, 3, "prompt")
    assert err.unit == "row" and ": row 3: field 'prompt'" in str(err)


def test_dataset_dir_bad_row_and_wrong_columns(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"messages": [U("a")]}, {"messages": [A("b")]}]).save_to_disk(str(tmp_path / "d"))
    err = load_error(str(tmp_path / "d"))
    assert_names(err, tmp_path / "d", 2, "messages[0].role")
    assert ": row 2:" in str(err)
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(tmp_path / "w"))
    assert "'text'" in str(load_error(str(tmp_path / "w")))


def test_missing_unreadable_and_unsupported(tmp_path):
    assert "no such file" in str(load_error(str(tmp_path / "nope.jsonl")))
    (tmp_path / "p.csv").write_text("prompt\nhi\n")
    assert "unsupported" in str(load_error(str(tmp_path / "p.csv")))
    (tmp_path / "junk.parquet").write_text("not parquet")
    assert "Parquet" in str(load_error(str(tmp_path / "junk.parquet")))
    (tmp_path / "plain").mkdir()
    assert "save_to_disk" in str(load_error(str(tmp_path / "plain")))


def test_module_docstring_worked_example(tmp_path):
    """The worked example at the top of avr_core/inputs.py, verbatim (its doctest needs this file)."""
    rows = [{"id": 7, "messages": [U("2+2?"), A("4")], "source": "ignored"}, {"prompt": "Write a haiku about rain."}]
    assert load_prompts(write_jsonl(tmp_path / "prompts.jsonl", rows)) == [
        {"id": "7", "messages": [U("2+2?")], "answer": "4"},
        {"id": "p-a8f42ff009fb", "messages": [U("Write a haiku about rain.")], "answer": None}]
