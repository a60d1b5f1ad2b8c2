"""The run record: one run of a flow as an object, `RunRecord`, made by `start_run` and handed to
`finish_run` (run_records/lifecycle.py) and to the failure line (run_records/failure.py). On disk:

    <store>/runs/<id>/run.json       the record (what `avr resume <id>` reads): `stage` (the stage being
                                     computed), then `failed`, `stopped` or (found by `avr resume`) `crashed`
    <store>/runs/<id>/config.yaml    the run's resolved config

`avr` (avr_cli/run.py) wraps the flow call in `launched(...)`: a `Launch` that says how the run was
started (the command line, the run it resumes) and that receives the run's record once the flow
has begun it, so that `avr` can end a failed run with one line. Deployments and tests start runs
without one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import time
import uuid
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from avr_core.config import default_store_root
from avr_core.store import Store


@dataclass
class RunRecord:
    """One run: what it ran, where its store is, and how it was launched. `as_json()` is run.json,
    `summary_fields()` what the run's summary.json starts with (the same, less the launch)."""

    id: str
    started: float                  # time.time() after preflight
    preset: str
    overrides: list[str]
    params: dict                    # the deployment's form, as given (flows/params.py RunParams.model_dump())
    prompt_rows: int
    flow: str | None = None         # the Prefect flow and deployment it belongs to (None: `avr run` or a test)
    deployment: str | None = None
    flow_run_id: str | None = None
    flow_parameters: dict = field(default_factory=dict)    # the flow's other parameters, e.g. a synthesis split
    store: str = ""                 # the store root
    command: str | None = None      # how `avr` started it (None: a deployment or a test)
    resumes: str | None = None      # the run id it resumes
    host: str = ""                  # the process that runs it: `avr resume` tells a crashed run from a live one
    pid: int = 0

    @classmethod
    def begin(cls, store: Store, preset: str, overrides: list[str], params: dict, prompt_rows: int,
              launch: Launch) -> RunRecord:
        """A new run with a fresh id, of the Prefect flow run this is called in (if any)."""
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        return cls(id=run_id, started=time.time(), preset=preset, overrides=overrides, params=params,
                   prompt_rows=prompt_rows, **_origin(), store=store.root, command=launch.command,
                   resumes=launch.resumes, host=socket.gethostname(), pid=os.getpid())

    def as_json(self) -> dict:
        return asdict(self)

    def summary_fields(self) -> dict:
        return {k: v for k, v in self.as_json().items() if k not in ("command", "resumes", "host", "pid")}

    def path(self, name: str) -> str:
        """A file of the run's directory in the store, `runs/<id>/<name>`."""
        return f"{Store(self.store).path('runs', self.id)}/{name}"

    def save(self, config_yaml: str) -> None:
        """runs/<id>/config.yaml and runs/<id>/run.json."""
        store = Store(self.store)
        store.write_atomic(self.path("config.yaml"), config_yaml.encode())
        store.write_atomic(self.path("run.json"), json.dumps(self.as_json(), indent=2, default=str).encode())

    def record_failure(self, stage: str | None, error: str) -> None:
        """The failed run's run.json says where it failed (best effort: the failure line is what counts)."""
        self._note("failed", {"stage": stage, "error": error, "at": time.time()})

    def record_stop(self, signal_name: str, stage: str | None) -> None:
        """A run stopped by a signal says so in run.json, with the stage it was in: not a running run."""
        self._note("stopped", {"signal": signal_name, "stage": stage, "at": time.time()})

    def record_stage(self, stage: str) -> None:
        """The stage this run has started computing (a cache hit is not noted): where a run that
        vanished without a word was (`avr resume` records it as crashed, run_records/resume.py)."""
        self._note("stage", {"name": stage, "since": time.time()})

    def _note(self, key: str, value: dict) -> None:
        store = Store(self.store)
        with contextlib.suppress(Exception):
            record = json.loads(store.fs.cat_file(self.path("run.json")))
            record[key] = value
            store.write_atomic(self.path("run.json"), json.dumps(record, indent=2, default=str).encode())

    def resume_command(self) -> str:
        return resume_command(self.id, self.store)

    def name_flow_run(self) -> None:
        """Name the Prefect flow run after this run (`20261207-071807-890d19`), so the UI's run
        list and the CLI speak of the same run and `avr resume <flow-run UUID>` can say which run it
        resumes. Best effort: a run never fails for its name."""
        if not self.flow_run_id:
            return
        from prefect.client.orchestration import get_client
        try:
            with get_client(sync_client=True) as client:
                client.update_flow_run(self.flow_run_id, name=self.id)
        except Exception as e:  # noqa: BLE001 -- an API hiccup costs the name, not the run
            logging.getLogger(__name__).warning("could not name flow run %s %s: %s", self.flow_run_id, self.id, e)


def resume_command(run_id: str, store_root: str) -> str:
    """`avr resume <run id>`, with `--store` when the store is not the one `avr` finds by default.

    >>> resume_command("20261203-080303-fe9764", "/data/avr")
    'avr resume 20261203-080303-fe9764 --store /data/avr'
    """
    default = default_store_root()
    a, b = (r if "://" in r else os.path.abspath(r) for r in (store_root, default))
    return f"avr resume {run_id}" + ("" if a == b else f" --store {shlex.quote(store_root)}")


def _origin() -> dict:
    """The Prefect flow and deployment this run belongs to (deployment None: `avr run` or a test)."""
    from prefect.runtime import deployment, flow_run

    try:
        extra = {k: v for k, v in flow_run.parameters.items() if k != "params"}   # e.g. a synthesis run's split
        return {"flow": flow_run.flow_name or None, "deployment": deployment.name or None,
                "flow_run_id": flow_run.id or None, "flow_parameters": extra}
    except Exception:   # outside a flow run
        return {"flow": None, "deployment": None, "flow_run_id": None, "flow_parameters": {}}


@dataclass
class Launch:
    """How `avr` started the run it is about to call (recorded in run.json), a hook for when the run
    has begun (`on_start`: the supervisor learns the resume command), and, from then on, the run."""

    command: str | None = None
    resumes: str | None = None
    on_start: Callable[[RunRecord], None] | None = None
    run: RunRecord | None = None
    report: str | None = None       # the end of the run, for `avr` to print on stdout once the flow returns

    def started(self, run: RunRecord) -> None:
        self.run = run
        if self.on_start is not None:
            self.on_start(run)


# The launch of the flow call in progress: set by `launched` around it, read by `start_run` inside
# the flow (a context variable, so a flow run in another thread of the same call sees it too).
_LAUNCH: ContextVar[Launch | None] = ContextVar("avr_launch", default=None)


@contextlib.contextmanager
def launched(command: list[str] | None = None, resumes: str | None = None,
             on_start: Callable[[RunRecord], None] | None = None) -> Iterator[Launch]:
    """Around the flow call of `avr run` / `avr resume`: `command` is avr's argv; the yielded
    Launch holds the run's record once the flow's `start_run` has made it (None before)."""
    launch = Launch(shlex.join(["avr", *command]) if command else None, resumes, on_start)
    token = _LAUNCH.set(launch)
    try:
        yield launch
    finally:
        _LAUNCH.reset(token)


def current_launch() -> Launch:
    """The launch around this flow call; an empty one for deployments and tests."""
    return _LAUNCH.get() or Launch()
