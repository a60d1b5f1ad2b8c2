"""A stage's progress as a Prefect progress artifact (the UI's Artifacts tab, and the run page):
created at the first unit of work, updated as shards, batches or training steps complete. Outside
a flow run, or with no API to reach, it does nothing: showing progress never fails a stage.

On the command line the same progress is one tqdm line per stage that redraws in place on a
terminal and is silent in a log file (`disable=None`), so a nightly log holds no bar spam.
"""
from __future__ import annotations

import os
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext

from tasks.runtime.ledger import logger


class StageProgress:
    """`done` of `total` units of one stage call, as a percentage on a progress artifact keyed
    `progress-<stage>`, its description naming the artifact. Updates are rate-limited
    (`min_interval_s`, or AVR_PROGRESS_INTERVAL_S, default 2 s) except the last, so a stage of ten
    thousand shards makes a few hundred API calls, not ten thousand."""

    def __init__(self, stage: str, key: str, total: int, unit: str, done: int = 0, min_interval_s: float | None = None):
        self.stage, self.key, self.total, self.unit = stage, key, max(1, total), unit
        self.min_interval_s = float(os.environ.get("AVR_PROGRESS_INTERVAL_S", "2")) if min_interval_s is None \
            else min_interval_s
        self.id, self.last, self.sent = None, 0.0, -1.0
        if FlowRunContext.get() is None:        # a bare call (tests of helpers, benchmarks): nothing to show
            return
        try:
            self.id = create_progress_artifact(self._pct(done), key=f"progress-{stage.replace('_', '-')}",
                                               description=self._text(done))
            self.sent, self.last = self._pct(done), time.monotonic()
        except Exception as e:                  # no API reachable: the store is the record
            logger().warning("%s: no progress artifact (%s)", stage, e)

    def _pct(self, done: int) -> float:
        return round(100.0 * min(done, self.total) / self.total, 1)

    def _text(self, done: int) -> str:
        return f"{self.stage}/{self.key}: {done} of {self.total} {self.unit}"

    def update(self, done: int) -> None:
        if self.id is None:
            return
        pct, now = self._pct(done), time.monotonic()
        if pct == self.sent or (done < self.total and now - self.last < self.min_interval_s):
            return
        try:
            update_progress_artifact(self.id, pct, description=self._text(done))
            self.sent, self.last = pct, now
        except Exception as e:
            logger().warning("%s: progress artifact not updated (%s)", self.stage, e)
            self.id = None
