"""The evaluation set, in alpaca-eval's own format, checked before any work (docs/DESIGN.md step 10).

A file is a JSON array (or JSONL) of rows::

    {"instruction": "Name three primes.", "output": "2, 3 and 5.", "generator": "gpt4_turbo", "dataset": "mine"}

`output` is the REFERENCE answer the judge compares against; `generator` names who wrote it.
The shipped default is the 805 AlpacaEval instructions (avr_core/data/README.md); its sha256 is
verified on every load, so a damaged copy never produces numbers. `eval.references=hub` (the
`paper` preset) judges against AlpacaEval 2's GPT-4 Turbo references instead, from the hub
(`hub_references`). When the hub cannot be reached that is an error, unless the caller allows
the labelled fallback to the file's own references (`eval.allow_example_references`: tiny).

    >>> rows = load_evalset(DEFAULT_EVALSET)
    >>> len(rows), rows[0]["id"], rows[0]["reference_generator"], rows[0]["messages"][0]["role"]
    (805, 'ae-0000', 'example', 'user')
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from avr_core.hub import mode_line
from avr_core.inputs import InputError, check_unicode, loads_json

DEFAULT_EVALSET = str(Path(__file__).resolve().parent.parent / "data" / "alpaca_eval" / "alpaca_eval_805.json")
# Shipped files and the checksum each must have.
KNOWN_SHA256 = {"alpaca_eval_805.json": "4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5"}


# AlpacaEval 2's reference outputs: GPT-4 Turbo (generator "gpt4_turbo"), the 805 instructions in the
# leaderboard's order -- what alpaca-eval's own ALPACAEVAL_REFERENCE_OUTPUTS_2 loads (constants.py).
HUB_REPO = "tatsu-lab/alpaca_eval"
HUB_REFERENCES = "alpaca_eval_gpt4_baseline.json"
HUB_NAME = f"hf://{HUB_REPO}/{HUB_REFERENCES}"


def hub_references(local_files_only: bool = False) -> str:
    """The local path of `tatsu-lab/alpaca_eval`'s `alpaca_eval_gpt4_baseline.json`, downloaded
    with huggingface_hub into its cache (`local_files_only`: the cache only, never the network).
    Unreachable: an InputError in one line saying how to give a local copy (the file itself is an
    eval set: `eval.prompts=<copy> eval.references=file`)."""
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=HUB_REPO, filename=HUB_REFERENCES, repo_type="dataset",
                               local_files_only=local_files_only)
    except Exception as e:  # offline (LocalEntryNotFoundError, ConnectionError, ...), no such file
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise InputError(HUB_NAME, None, None, f"cannot download it ({type(e).__name__}: {why}); download it while "
                         f"online (huggingface_hub.hf_hub_download({HUB_REPO!r}, {HUB_REFERENCES!r}, "
                         "repo_type='dataset')) or set eval.prompts to a local copy and eval.references=file; "
                         f"{mode_line()}") from None


def resolve_evalset(prompts: str, references: str, fetch: bool = False,
                    allow_fallback: bool = True) -> tuple[str, str]:
    """(path, note) of the eval file to use. references "file": `prompts` itself. "hub": the
    GPT-4 Turbo references (`hub_references`; from the cache only unless `fetch`); when they cannot
    be had, `prompts` with a note saying so (a labelled fallback: the result's `reference` then
    names the file's generator, not gpt4_turbo) -- or, unless `allow_fallback`, the InputError.

    >>> resolve_evalset(DEFAULT_EVALSET, "file") == (DEFAULT_EVALSET, "")
    True
    """
    if references != "hub":
        return prompts, ""
    try:
        return hub_references(local_files_only=not fetch), ""
    except InputError as e:
        if not allow_fallback:    # a paper number judged against the example references would be a false one
            raise InputError(HUB_NAME, None, None, f"eval.references=hub: {e.reason} (or "
                             f"eval.allow_example_references=true: {Path(prompts).name}'s own references, "
                             "not AlpacaEval 2's)") from None
        return prompts, f"{e}; fallback: the references of {Path(prompts).name}"


def load_evalset(path: str) -> list[dict]:
    """Rows -> {"id", "instruction", "messages", "reference", "reference_generator", "dataset"}.
    Raises InputError naming the file, line (JSONL) or record (JSON array), and field."""
    p = Path(path)
    if not p.is_file():
        raise InputError(path, None, None, "eval set file not found")
    data = p.read_bytes()
    want = KNOWN_SHA256.get(p.name)
    if want and hashlib.sha256(data).hexdigest() != want:
        raise InputError(path, None, None, f"sha256 mismatch: this is not the shipped file (want {want[:12]}...); "
                                           "restore it with scripts/fetch_alpaca_eval.py")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, None, None, f"not UTF-8 (byte {e.start})") from None
    rows, unit = _rows(path, text)
    out, seen = [], {}
    for n, row in rows:
        def fail(field, reason, n=n):
            return InputError(path, n, field, reason, unit=unit)
        if not isinstance(row, dict):
            raise fail(None, f"expected an object, got {type(row).__name__}")
        for field in ("instruction", "output"):
            if not isinstance(row.get(field), str):
                raise fail(field, "missing" if field not in row else f"must be text, got {type(row[field]).__name__}")
        if not row["instruction"].strip():
            raise fail("instruction", "empty")
        for field in ("instruction", "output", "generator", "dataset"):   # lone surrogates: written mid-run
            check_unicode(row.get(field), field, fail)
        if row["instruction"] in seen:   # alpaca-eval joins model and reference outputs on the instruction
            raise fail("instruction", f"duplicate of {unit} {seen[row['instruction']]}")
        seen[row["instruction"]] = n
        out.append({"id": f"ae-{len(out):04d}", "instruction": row["instruction"],
                    "messages": [{"role": "user", "content": row["instruction"]}], "reference": row["output"],
                    "reference_generator": str(row.get("generator") or "reference"),
                    "dataset": str(row.get("dataset") or p.stem)})
    if not out:
        raise InputError(path, None, None, "no rows")
    return out


def _rows(path: str, text: str):
    """(position, row) pairs: JSONL lines (1-based) or JSON-array records (1-based)."""
    if text.lstrip().startswith("["):
        return list(enumerate(loads_json(text, path), 1)), "row"
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            rows.append((i, loads_json(line, path, i)))
    return rows, "line"
