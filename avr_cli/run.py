"""`avr run`: the whole pipeline, or the flow the preset's `flow:` names (flows/learning_signal.py
for `flow: signal`). Bad config or prompts fail before anything starts; the run itself goes on in a
worker process that SIGTERM or Ctrl-C stops in seconds (avr_cli/supervisor.py says why), and a
failure ends with one line (run_records/failure.py). `run_flow` is shared with `avr resume`."""
from __future__ import annotations

import signal
import sys

from avr_cli import supervisor
from avr_cli.presets import add_preset_parser, apply_hub_mode, with_params


def add_parser(subparsers) -> None:
    add_preset_parser(subparsers, "run", "run the whole pipeline")


def run(args) -> int:
    return with_params(args, lambda params: _run(params, args.argv))


def _run(params, argv: list[str]) -> int:
    # fail fast on bad config or prompts, before Prefect starts a server or anything is written
    from omegaconf import OmegaConf

    from run_records.preflight import preflight
    cfg = params.config()              # loaded once, by the params' validator; the flow runs this one
    apply_hub_mode(params)             # before preflight reads a hub dataset
    preflight(OmegaConf.to_container(cfg, resolve=True))
    # The run goes on in a worker process that SIGTERM or Ctrl-C stops in seconds, leaving
    # nothing behind; this process waits for it (avr_cli/supervisor.py says why).
    if not supervisor.is_worker():
        return supervisor.supervise(argv)
    if cfg.flow == "signal":           # stage 1 + learning signal + test-time scaling (conf/signal.yaml)
        from flows.learning_signal import signal_run as flow
    else:
        from flows.pipeline import pipeline as flow
    with supervisor.worker():
        return run_flow(lambda: flow(params=params), argv)


def run_flow(call, argv: list[str], resumes: str | None = None) -> int:
    """Run a flow in this (the worker) process. A failure ends with one line: the stage, the
    error, what is kept and the resume command; its traceback is in the log above, once."""
    from prefect.exceptions import TerminationSignal

    from run_records.failure import failed_stage, failure_line
    from run_records.record import launched

    with launched(argv, resumes, on_start=_tell_supervisor) as launch:
        try:
            call()
        except TerminationSignal as e:      # SIGTERM: run.json says it stopped, and where
            if launch.run is not None:
                launch.run.record_stop(signal.Signals(e.signal).name, failed_stage(e) or _in_flight())
            raise
        except Exception as e:
            line = failure_line(e, launch.run)
            if line is None:       # it failed before the run started: nothing to resume
                raise
            print(line, file=sys.stderr, flush=True)
            return 1
    if launch.report:      # the end of the run on stdout, after the logs (stderr): `avr run ... > report.txt`
        print(launch.report, flush=True)
    return 0


def _tell_supervisor(run) -> None:
    """As the run starts: the supervisor (if any) learns its flow run id and resume command, for the stop line."""
    supervisor.record_run(run.flow_run_id, run.resume_command())



def _in_flight() -> str | None:
    """The stage call this process began last: the one a signal between traceback frames interrupted."""
    from tasks.runtime.ledger import STARTED
    return STARTED[-1] if STARTED else None
