"""What this process records about its stage calls: the run's logger, the wall-time table
(`STAGE_LOG`), which artifacts it computed rather than found (`COMPUTED`), and one line per engine
start or weight reload. Flows run their stages one after another in the flow's own process, so
plain module-level lists suffice; the run record (run_records/lifecycle.py) reads them at the end."""
from __future__ import annotations

import logging

from prefect.logging import get_run_logger

log = logging.getLogger("avr")


def logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a run (unit tests of helpers)
        return log


# Every stage call of this process, in order: what the run's wall-time table is made of.
STAGE_LOG: list[dict] = []


COMPUTED: set[str] = set()   # artifacts this process computed (not cache hits): for STAGE_LOG
STARTED: list[str] = []      # every stage call this process began, as it began: the one a signal interrupts
# The avr run in progress (run_records/lifecycle.py start_run): "id" names it in every manifest it
# computes; "on_compute" (the run record's `record_stage`) is called with each stage that starts
# computing, so run.json says which stage a run that vanished (kill -9, a dead node) was in.
RUN: dict = {"id": None, "on_compute": None}


def log_engine_events(stage_name: str, events: list[dict]) -> None:
    """One line per engine start or weight reload of a stage, on its Prefect run: what a run
    pays for engines, and why a start was not a reload (`avr_core.backends.builds`)."""
    for b in events:
        if b.get("event") == "reload":
            logger().info("%s: new weights into the running %s engine in %.1fs (%s)", stage_name, b["role"],
                          b["seconds"], b.get("why") or "woken")
        else:
            logger().info("%s: started a %s %s in %.1fs%s", stage_name, b["kind"], b["role"], b["seconds"],
                          f" (not a reload: {b['why']})" if b.get("why") else "")

