"""Loading prompt sets: the pipeline's one door for outside data.

`load_prompts` reads a prompt file, checks every row, and returns normalised records. Bad input
stops here, before any work, with an `InputError` naming the file, the line (or row) and the
field (docs/DESIGN.md, "Error contract").

Accepted sources (picked by suffix, or a directory):

- ``.jsonl``    one JSON object per line; blank lines are skipped but still counted.
- ``.json``     one JSON array of row objects; errors name the line where the row starts.
- ``.parquet``  a table with a ``prompt`` or ``messages`` column; errors name the row (1-based).
- a directory   written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: split
                ``train``, or the only split there is); errors name the row (1-based).
- ``hf://<dataset>:<split>``  a Hugging Face hub dataset, loaded with ``datasets.load_dataset``
                (the hub, or its local cache offline), e.g.
                ``hf://princeton-nlp/llama3-ultrafeedback-armorm:train`` (the paper's prompts);
                errors name the row. Offline without a cached copy it fails in one line naming
                the dataset; a JSONL exported from it (``ds.to_json("p.jsonl")``) works the same.

A row is one of::

    {"prompt": "Name three primes."}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}, ...]}

or a preference-data row carrying a ``"chosen"`` conversation (the hub format of the paper's
prompt set, e.g. ``{"prompt": "...", "chosen": [user, assistant], "rejected": [...]}``): the
conversation is then ``chosen`` -- it must end in the ``assistant`` turn that is the row's
answer -- and a ``prompt`` next to it is ignored (``chosen`` with ``messages`` is an error);
optionally with ``"id"`` (a string or an integer). Roles are OpenAI's ``system`` / ``user`` /
``assistant``: an optional first ``system`` turn, then turns alternating ``user``,
``assistant``, ... A final ``assistant`` turn is the row's reference answer y0; what is left
must end in a ``user`` turn. An optional ``"constraints"`` list (verifiable instructions as data,
for the ``rules`` scorer) is checked and kept. Unknown extra fields (and extra keys inside a turn) are ignored; a
field holding ``null`` counts as absent (Parquet fills a missing column with nulls).

Worked example (TRL-style: one input row -> one output record)::

    # prompts.jsonl, line 1
    {"id": 7, "messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}], "source": "ignored"}
    # prompts.jsonl, line 2
    {"prompt": "Write a haiku about rain."}

    >>> load_prompts("prompts.jsonl")      # doctest: +SKIP
    [{'id': '7', 'messages': [{'role': 'user', 'content': '2+2?'}], 'answer': '4'},
     {'id': 'p-a8f42ff009fb', 'messages': [{'role': 'user', 'content': 'Write a haiku about rain.'}],
      'answer': None}]

(tests/test_inputs.py runs this example.) The second row has no id, so it gets ``"p-"`` + the first
12 hex digits of the SHA-1 of its conversation as canonical JSON -- answer included, so a repeated row
is a duplicate id.
And a malformed row::

    {"messages": [{"role": "bot", "content": "hi"}]}          # line 7
    InputError: prompts.jsonl:7: field 'messages[0].role': expected 'user' or 'assistant' or 'system', got 'bot'
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from avr_core.hub import mode_line

__all__ = ["InputError", "load_prompts", "loads_json", "check_unicode", "DEFAULT_MAX_CHARS", "ROLES"]

DEFAULT_MAX_CHARS = 200_000
ROLES = ("user", "assistant", "system")
_EXPECTED_ROLES = " or ".join(repr(r) for r in ROLES)
_EITHER = "prompt/messages"
HUB_PREFIX = "hf://"


class InputError(ValueError):
    """A bad prompt file, reported as ``path:line: field 'f': reason``.

    ``unit`` is ``"line"`` (JSONL, JSON) or ``"row"`` (Parquet, saved datasets, 1-based);
    for rows the message reads ``path: row 7: field 'f': reason``. ``line`` and ``field`` are
    None when the problem is not tied to one (a missing file, an empty file, a bad column set).
    """

    def __init__(self, path: str, line: int | None, field: str | None, reason: str,
                 unit: str = "line"):
        self.path, self.line, self.field, self.reason, self.unit = str(path), line, field, reason, unit
        where = self.path
        if line is not None:
            where += f":{line}" if unit == "line" else f": row {line}"
        what = f"field {field!r}: {reason}" if field else reason
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # keep it picklable (task runners ship exceptions between processes)
        return (type(self), (self.path, self.line, self.field, self.reason, self.unit))


def load_prompts(path: str | os.PathLike, limit: int | None = None, *,
                 max_chars: int = DEFAULT_MAX_CHARS) -> list[dict]:
    """Read, validate and normalise a prompt set; see the module docstring for formats.

    Returns ``[{"id": str, "messages": [... ending in a user turn], "answer": str | None}]`` in
    file order. Every row is checked first (the whole file; the first problem raises
    `InputError`), then the first ``limit`` records are returned. ``max_chars`` bounds the text
    of one row (all turns together, answer included). Ids come from the row's ``id`` or, when
    absent, ``"p-" + sha1(conversation)[:12]``; a repeated id is an error naming both places.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    name = os.fspath(path)
    p = Path(name)
    if name.startswith(HUB_PREFIX):
        rows, unit = _hub_rows(name), "row"
    elif not p.exists():
        raise InputError(name, None, None, "no such file or directory")
    elif p.is_dir():
        rows, unit = _dataset_rows(name), "row"
    else:
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            rows, unit = _jsonl_rows(name, _read_bytes(name)), "line"
        elif suffix == ".json":
            rows, unit = _json_rows(name, _read_bytes(name)), "line"
        elif suffix == ".parquet":
            rows, unit = _parquet_rows(name), "row"
        else:
            raise InputError(name, None, None, f"unsupported file type {p.suffix!r}: expected .jsonl, "
                             ".json, .parquet or a directory written by datasets' save_to_disk")

    records: list[dict] = []
    seen: dict[str, int] = {}
    for where, row in rows:
        rec = _normalise(row, name, where, unit, max_chars)
        if rec["id"] in seen:
            first = seen[rec["id"]]
            hint = "" if "id" in row and row["id"] is not None else \
                " (the row has no 'id', so its id is a hash of its conversation: the row is repeated)"
            raise InputError(name, where, "id", f"duplicate id {rec['id']!r}: already used on "
                             f"{unit} {first}{hint}", unit)
        seen[rec["id"]] = where
        records.append(rec)
    if not records:
        raise InputError(name, None, None, "empty: no rows")
    return records if limit is None else records[:limit]


# ---------------------------------------------------------------------------------------------
# Readers: each yields (line or row number, parsed row) and raises InputError on a bad file.

def _read_bytes(name: str) -> bytes:
    try:
        with open(name, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(name, None, None, f"cannot read: {e.strerror or e}") from None


def _jsonl_rows(name: str, data: bytes) -> Iterator[tuple[int, Any]]:
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark; harmless, drop it
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(name, lineno, None, f"invalid UTF-8 at byte {e.start} of the line "
                             f"({raw[e.start:e.start + 4]!r})") from None
        if not text.strip():
            continue
        yield lineno, loads_json(text, name, lineno)


def _json_rows(name: str, data: bytes) -> Iterator[tuple[int, Any]]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise InputError(name, line, None, f"invalid UTF-8 at byte {col} of the line "
                         f"({data[e.start:e.start + 4]!r})") from None
    if not text.strip():
        raise InputError(name, None, None, "empty: no rows")
    doc = loads_json(text, name)
    if not isinstance(doc, list):
        raise InputError(name, 1, None, f"expected a JSON array of rows, got {_kind(doc)} "
                         "(for one object per line, use .jsonl)")
    # The text is valid JSON: walk the array once more to learn the line each row starts on.
    dec, ws = json.JSONDecoder(), " \t\r\n"
    i, line, last = text.index("[") + 1, 1, 0
    while True:
        while text[i] in ws:
            i += 1
        if text[i] == "]":
            return
        if text[i] == ",":
            i += 1
            continue
        line += text.count("\n", last, i)
        last = i
        try:
            row, i = dec.raw_decode(text, i)
        except RecursionError:          # parsed whole above, from a shallower stack: still possible
            raise InputError(name, line, None, _TOO_DEEP) from None
        yield line, row


_TOO_DEEP = "invalid JSON: arrays and objects nested too deeply to read"
_DEEP = 500    # the nesting the line of a too-deep document is reported at (json's own limit is ~1000)


def loads_json(text: str, name: str, line: int | None = None) -> Any:
    """`json.loads(text)`, every way it can fail an `InputError` naming `name` and the line (`line`,
    for one line of a JSONL file; else where the problem is): invalid JSON, an integer longer than
    Python converts (`sys.get_int_max_str_digits`), nesting deeper than the parser's recursion."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(name, line or e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except ValueError:                # "Exceeds the limit (4300 digits) for integer string conversion"
        limit = sys.get_int_max_str_digits()
        raise InputError(name, line or _line_of(text, digits=limit), None,
                         f"invalid JSON: a number with more than {limit} digits (too long to read)") from None
    except RecursionError:
        raise InputError(name, line or _line_of(text, depth=_DEEP), None, _TOO_DEEP) from None


def _line_of(text: str, digits: int = 0, depth: int = 0) -> int | None:
    """The line where, outside strings, a run of more than `digits` digits or a nesting deeper than
    `depth` first occurs (what `loads_json` reports for a whole JSON document)."""
    level, run, in_str, esc = 0, 0, False, False
    for i, c in enumerate(text):
        if in_str:
            in_str, esc = (esc or c != '"'), (not esc and c == "\\")
            continue
        in_str = c == '"'
        level += (c in "[{") - (c in "]}")
        run = run + 1 if c.isdigit() else 0
        if (digits and run > digits) or (depth and level > depth):
            return text.count("\n", 0, i) + 1
    return None


def _parquet_rows(name: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(name)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        raise InputError(name, None, None, f"cannot read as Parquet: {e}") from None
    return _table_rows(name, table.column_names, table.num_rows,
                       lambda start, count: table.slice(start, count).to_pylist())


def _dataset_rows(name: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(name)
    except Exception as e:  # FileNotFoundError for a plain directory, others for a broken one
        raise InputError(name, None, None, "not a dataset written by datasets' save_to_disk "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise InputError(name, None, None, f"a DatasetDict without a 'train' split and with "
                             f"several splits ({', '.join(map(repr, splits))}): save one split")
    ds = ds.with_format(None)
    return _table_rows(name, ds.column_names, ds.num_rows,
                       lambda start, count: ds.select(range(start, min(start + count, len(ds)))).to_list())


def _hub_rows(name: str) -> Iterator[tuple[int, Any]]:
    """``hf://<dataset>:<split>`` through ``datasets.load_dataset`` (the hub, or its cache)."""
    dataset, _, split = name[len(HUB_PREFIX):].partition(":")
    split = split or "train"
    if not dataset or dataset.count("/") > 1 or any(c.isspace() for c in dataset):
        raise InputError(name, None, None, "expected hf://<owner>/<dataset>:<split>, e.g. "
                         "hf://princeton-nlp/llama3-ultrafeedback-armorm:train")
    try:
        import datasets

        ds = datasets.load_dataset(dataset, split=split)
    except Exception as e:  # offline (ConnectionError, OfflineModeIsEnabled, ...), unknown dataset or split
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(name, None, None, f"cannot load dataset {dataset!r} split {split!r} with `datasets` "
                         f"({type(e).__name__}: {why}); download it while online (datasets.load_dataset"
                         f"({dataset!r}) fills the local cache) or export it to a local JSONL "
                         f"(ds.to_json('prompts.jsonl')) and set data.prompts to that file; {mode_line()}") from None
    ds = ds.with_format(None)
    return _table_rows(name, ds.column_names, ds.num_rows,
                       lambda start, count: ds.select(range(start, min(start + count, len(ds)))).to_list())


def _table_rows(name: str, columns: list[str], n: int,
                batch: Callable[[int, int], list[dict]]) -> Iterator[tuple[int, Any]]:
    """Rows of a table as dicts, numbered from 1, converted ``batch(start, count)`` at a time."""
    if "prompt" not in columns and "messages" not in columns and "chosen" not in columns:
        shown = ", ".join(map(repr, columns)) or "none"
        raise InputError(name, None, None, f"no 'prompt', 'messages' or 'chosen' column; columns are: {shown}",
                         "row")

    def rows() -> Iterator[tuple[int, Any]]:
        step = 1024
        for start in range(0, n, step):
            try:
                rows_ = batch(start, step)
            except Exception as e:  # e.g. undecodable bytes in a string column
                raise InputError(name, start + 1, None, f"cannot convert rows {start + 1}.."
                                 f"{min(n, start + step)}: {e}", "row") from None
            for k, row in enumerate(rows_):
                yield start + k + 1, row

    return rows()


# ---------------------------------------------------------------------------------------------
# Validation and normalisation of one row.

def _normalise(row: Any, name: str, where: int, unit: str, max_chars: int) -> dict:
    def fail(field: str | None, reason: str) -> InputError:
        return InputError(name, where, field, reason, unit)

    if not isinstance(row, dict):
        raise fail(None, f"expected a row object like {{\"prompt\": ...}} or {{\"messages\": ...}}, "
                         f"got {_kind(row)}")
    prompt, messages, chosen = row.get("prompt"), row.get("messages"), row.get("chosen")
    if chosen is not None:
        if messages is not None:
            raise fail("messages/chosen", "both present; give one of 'messages' or 'chosen'")
        prompt, messages, key = None, chosen, "chosen"
    else:
        key = "messages"
    if prompt is not None and messages is not None:
        raise fail(_EITHER, "both present; give exactly one of 'prompt' or 'messages'")
    if prompt is None and messages is None:
        keys = ", ".join(repr(k) for k in row) or "none"
        raise fail(_EITHER, f"missing: a row needs a 'prompt' string or a 'messages' list "
                            f"(its keys are: {keys})")

    if prompt is not None:
        _check_text(prompt, "prompt", fail)
        turns = [{"role": "user", "content": prompt}]
        fields = ["prompt"]
    else:
        turns, fields = _check_messages(messages, fail, key), \
            [f"{key}[{i}].content" for i in range(len(messages))]
        if key == "chosen" and turns[-1]["role"] != "assistant":
            raise fail(f"chosen[{len(turns) - 1}].role", "a chosen conversation must end in an 'assistant' "
                                                        f"turn (its answer), got {turns[-1]['role']!r}")

    total = 0
    for turn, field in zip(turns, fields):
        total += len(turn["content"])
        if total > max_chars:
            raise fail(field, f"row too long: its text passes max_chars={max_chars} here "
                              f"(row total {sum(len(t['content']) for t in turns)} chars)")

    rid = row.get("id")
    if rid is None:
        canon = json.dumps(turns, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        rid = "p-" + hashlib.sha1(canon.encode("utf-8")).hexdigest()[:12]
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise fail("id", f"expected a string or an integer, got {_kind(rid)}")
    else:
        check_unicode(rid, "id", fail)
        rid = str(rid)
        if not rid.strip():
            raise fail("id", "empty or whitespace-only")

    answer = None
    if turns[-1]["role"] == "assistant":
        answer = turns.pop()["content"]
    out = {"id": rid, "messages": turns, "answer": answer}
    if row.get("constraints") is not None:
        out["constraints"] = _check_constraints(row["constraints"], fail)
    return out


def _check_constraints(value: Any, fail) -> list[dict]:
    """The optional ``constraints`` of a row: the verifiable instructions its answer must follow
    (the `rules` scorer, avr_core/backends/rules.py), as data, e.g.
    ``[{"id": "length_constraints:number_words", "kwargs": {"num_words": 60, "relation": "less than"}}]``.
    Here only the shape is checked; the scorer checks the ids and arguments against its registry."""
    if not isinstance(value, list) or not value:
        raise fail("constraints", f"expected a non-empty list of {{\"id\": ..., \"kwargs\": {{...}}}} objects, "
                                  f"got {_kind(value)}")
    out = []
    for i, c in enumerate(value):
        if not isinstance(c, dict):
            raise fail(f"constraints[{i}]", f"expected an object like {{\"id\": ..., \"kwargs\": {{...}}}}, "
                                            f"got {_kind(c)}")
        _check_text(c.get("id"), f"constraints[{i}].id", fail)
        kwargs = c.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise fail(f"constraints[{i}].kwargs", f"expected an object, got {_kind(kwargs)}")
        check_unicode(kwargs, f"constraints[{i}].kwargs", fail)
        out.append({"id": c["id"], "kwargs": kwargs})
    return out


def _check_messages(messages: Any, fail, key: str = "messages") -> list[dict]:
    if not isinstance(messages, list):
        raise fail(key, f"expected a list of {{\"role\", \"content\"}} objects, got {_kind(messages)}")
    if not messages:
        raise fail(key, "empty list: need at least one user turn")
    out = []
    for i, m in enumerate(messages):
        f = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise fail(f, f"expected an object with 'role' and 'content', got {_kind(m)}")
        role = m.get("role")
        if role is None:
            raise fail(f"{f}.role", f"missing: expected {_EXPECTED_ROLES}")
        if role not in ROLES:
            raise fail(f"{f}.role", f"expected {_EXPECTED_ROLES}, got {_show(role)}")
        if "content" not in m or m["content"] is None:
            raise fail(f"{f}.content", "missing: expected a non-empty string")
        _check_text(m["content"], f"{f}.content", fail)
        out.append({"role": role, "content": m["content"]})

    start = 1 if out[0]["role"] == "system" else 0
    if start == 0 and out[0]["role"] != "user":
        raise fail(f"{key}[0].role", f"a conversation must start with 'system' or 'user', "
                                       f"got {out[0]['role']!r}")
    if start == 1 and len(out) == 1:
        raise fail(key, "no user turn: only a system turn")
    for i in range(start, len(out)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        got = out[i]["role"]
        if got == want:
            continue
        if got == "system":
            raise fail(f"{key}[{i}].role", "'system' is only allowed as the first turn")
        after = "the system turn" if i == start else f"a {out[i - 1]['role']!r} turn"
        raise fail(f"{key}[{i}].role", f"expected {want!r} after {after} (turns alternate "
                                          f"user/assistant), got {got!r}")
    return out


def _check_text(value: Any, field: str, fail) -> None:
    if not isinstance(value, str):
        raise fail(field, f"expected a string, got {_kind(value)}")
    if not value.strip():
        raise fail(field, "empty or whitespace-only text")
    check_unicode(value, field, fail)


def check_unicode(value: Any, field: str, fail) -> None:
    """Every string in `value` (keys too) must be writable as UTF-8: JSON's `\\ud800`-style escapes
    can spell a lone surrogate, which parses but fails the first write to the store, mid-run.
    `fail(field, reason)` makes the error."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, field, fail)
            check_unicode(v, f"{field}.{k}" if isinstance(k, str) and k.isidentifier() else field, fail)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_unicode(v, f"{field}[{i}]", fail)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise fail(field, f"not valid Unicode: a lone surrogate {value[e.start]!r} at character {e.start + 1} "
                              "(an unpaired \\ud800-\\udfff escape)") from None


def _kind(v: Any) -> str:
    """A value's JSON type, as a user who wrote the file would call it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _show(v: Any) -> str:
    if isinstance(v, str):
        return repr(v if len(v) <= 40 else v[:37] + "...")
    return _kind(v)

