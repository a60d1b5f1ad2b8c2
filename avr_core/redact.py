"""Secrets never reach a log line, a Prefect artifact or a saved config.

A secret is (a) the value of an environment variable whose name says it is one (KEY, TOKEN,
SECRET, PASSWORD, PASSWD, CREDENTIAL in the name; not `..._PATH/_FILE/_DIR`, not TOKENIZERS)
or that the config names as a key variable (`generator.api_key_env`, `eval.judge.api_key_env`:
`register_env`), at least 8 characters long; or (b) text shaped like one: `Bearer <token>`,
`sk-...` (OpenAI), `hf_...` (Hugging Face), a password in a URL (`https://user:pw@host`),
`api_key=...` / `password: ...`. Each is replaced by `***`.

    >>> redact("Authorization: Bearer abc123456789, url https://me:pw1@host/v1, key sk-proj-0123456789abcdef")
    'Authorization: Bearer ***, url https://***@host/v1, key ***'

`install()` (called when the CLI and every flow module start) puts the redaction into every log
record the process makes: a log record factory (so handlers added later -- Prefect's API handler,
pytest's caplog -- see only redacted records), plus a filter on the handlers of the root, `avr`
and `prefect` loggers. No Prefect import here: this is plain `logging`.
"""
from __future__ import annotations

import logging
import os
import re
import traceback

MASK = "***"
MIN_LEN = 8                      # shorter values ("EMPTY", "false", "1") are not treated as secrets
_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)
_NOT_SECRET_NAME = re.compile(r"TOKENIZERS|(_PATH|_FILE|_DIR)$", re.I)
_PATTERNS = [
    (re.compile(r"(?i)\b(Bearer\s+)[A-Za-z0-9._~+/=-]{4,}"), r"\1" + MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), MASK),
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@"), MASK + "@"),
    (re.compile(r"(?i)\b(api[_-]?key|password|passwd|secret)(\"?'?\s*[:=]\s*[\"']?)[^\s\"',;}]{6,}"),
     r"\1\2" + MASK),
]
_EXTRA_NAMES: set[str] = set()   # env names the config says hold a key (any spelling)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def register_env(*names: str) -> None:
    """Treat these environment variables' values as secrets from now on (e.g. `api_key_env`)."""
    _EXTRA_NAMES.update(n for n in names if n)


def secret_values(extra_names: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Current values of the secret environment variables, longest first."""
    names = set(extra_names) | _EXTRA_NAMES
    vals = {v for k, v in os.environ.items()
            if len(v) >= MIN_LEN and (k in names or (_NAME.search(k) and not _NOT_SECRET_NAME.search(k)))}
    return sorted(vals, key=len, reverse=True)


def redact(text: str, extra_names: tuple[str, ...] | list[str] = ()) -> str:
    """`text` with every secret value and secret-shaped token replaced by `***`."""
    if not text:
        return text
    for v in secret_values(extra_names):
        if v in text:
            text = text.replace(v, MASK)
    for pat, rep in _PATTERNS:
        text = pat.sub(rep, text)
    return text


def _redact_record(record: logging.LogRecord) -> None:
    try:
        msg = record.getMessage()
    except Exception:   # a malformed call: leave it to the handler's own error reporting
        return
    clean = redact(msg)
    if clean != msg:
        record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:   # formatters use exc_text when it is set
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites the record with its secrets masked; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


_FILTER = RedactingFilter()


def install() -> None:
    """Redact every log record of this process from now on (idempotent)."""
    old = logging.getLogRecordFactory()
    if not getattr(old, "_avr_redacts", False):
        def factory(*args, **kwargs):
            record = old(*args, **kwargs)
            _redact_record(record)
            return record
        factory._avr_redacts = True
        logging.setLogRecordFactory(factory)
    for name in ("", "avr", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
        for h in lg.handlers:
            if _FILTER not in h.filters:
                h.addFilter(_FILTER)
