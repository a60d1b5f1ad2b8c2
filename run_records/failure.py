"""How a failed run ends: one line (the stage, the error, what is kept, the resume command), its
traceback in the log above once (Prefect would log it once per flow run it passes through)."""
from __future__ import annotations

import contextlib
import logging

from avr_core.store import Store
from run_records.record import RunRecord
from tasks.runtime.ledger import STAGE_LOG
from tasks.runtime.skeleton import StageTask


def failure_line(exc: BaseException, run: RunRecord | None) -> str | None:
    """The one line a failed run ends with: the stage, the error, what is kept, how to resume
    (None: the run had not started). The traceback is in the log above, once."""
    if run is None:
        return None
    store, stage = Store(run.store), failed_stage(exc)
    kept = sum(store.exists(store.ref(*r["artifact"].split("/", 1))) for r in STAGE_LOG)
    error = (str(exc).strip().splitlines() or [""])[0]
    run.record_failure(stage, f"{type(exc).__name__}: {error}")
    return (f"avr: run {run.id} failed in stage {stage or '?'} ({type(exc).__name__}: {error}); kept in "
            f"{store.root}: the artifacts of {kept} finished stage{'s' * (kept != 1)}; resume (they are cache hits): "
            f"{run.resume_command()}")


def failed_stage(exc: BaseException) -> str | None:
    """The stage task (tasks/runtime/skeleton.py StageTask) the exception came out of, from its traceback."""
    tb, name = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code is StageTask.__call__.__code__:
            name = tb.tb_frame.f_locals["self"].name      # the innermost one wins
        tb = tb.tb_next
    return name


class _RepeatedTraceback(logging.Filter):
    """Prefect logs a failure's traceback once per flow run it passes through (a stage in
    avr-synthesis in avr-stage1 in avr-pipeline: three times). Keep the first; later records of
    the same exception keep their one-line message."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            if getattr(exc, "_avr_logged", False):
                record.exc_info, record.exc_text = None, None
            else:
                with contextlib.suppress(AttributeError):
                    exc._avr_logged = True
        return True


def quiet_repeated_tracebacks() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _RepeatedTraceback) for f in lg.filters):
            lg.addFilter(_RepeatedTraceback())
