"""Deployments: the whole pipeline and each stage as a flow a user picks in the Prefect UI,
with a typed form as parameters (flows/params.py: preset, prompts, policy, store, iterations,
`key=value` overrides), the pipeline on a nightly cron.

    avr server                        # a Prefect server + UI on 127.0.0.1:4200 (telemetry off)
    avr serve --preset tiny           # register the deployments and run what the UI triggers

A stage deployment runs its upstream stages too: they come back from cache when they are done
already, so "run stage 2 only" costs stage 2. Every run validates its parameters before any
work (`start_run`): a bad override fails at once, naming the key.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from omegaconf import DictConfig, OmegaConf
from prefect import flow
from prefect.schedules import Cron
from pydantic import Field

from avr_core.config import ConfigError, load_config
from avr_core.iterations import ALL_SLICES
from flows.evaluate import evaluate, test_time_scaling
from flows.learning_signal import signal_run
from flows.params import RunParams, as_params
from flows.pipeline import pipeline
from flows.stage1 import stage1, synthesis
from flows.stage2 import stage2
from run_records.lifecycle import finish_run, start_run
from run_records.preflight import check_schedule

STAGE1_SLICES = ("stage1_sft", "stage1_po")
ROOT = Path(__file__).resolve().parents[1]        # the checkout: workers run the flows from the same path


@flow(name="avr-synthesis-run", log_prints=True)
def synthesis_run(params: RunParams = RunParams(),  # noqa: B008 (Prefect parameter: the UI's run form)
                  split: Annotated[Literal["stage1_sft", "stage1_po", "stage2", "stage2_po", "heldout"], Field(
                      description="the prompt slice data.<split> to synthesise on")] = "stage1_sft") -> dict:
    """Stage-1 synthesis alone with the seed policy (respond -> critique -> refine -> rm_score -> select)."""
    params = as_params(params)
    run, cfg = start_run(params, (split,))                    # preflight checks the slices each flow reads
    return finish_run(run, cfg, {"synthesis": synthesis(cfg, cfg["policy"], split)})


@flow(name="avr-stage1-run", log_prints=True)
def stage1_run(params: RunParams = RunParams()) -> dict:  # noqa: B008 (Prefect parameter)
    """Stage 1 alone: synthesis -> RSFT -> synthesis -> PO."""
    params = as_params(params)
    run, cfg = start_run(params, STAGE1_SLICES)
    s1 = stage1(cfg, cfg["policy"])
    return finish_run(run, cfg, {"stage1_pairs": s1["pairs"], "stage1_model": s1["model_ref"]})


@flow(name="avr-stage2-run", log_prints=True)
def stage2_run(params: RunParams = RunParams()) -> dict:  # noqa: B008
    """Stage 2 on the Stage-1 model (stage 1 from cache when done)."""
    params = as_params(params)
    run, cfg = start_run(params, (*STAGE1_SLICES, "stage2", "stage2_po"))   # signal preset: refused, no stage 2
    s2 = stage2(cfg, stage1(cfg, cfg["policy"])["model"])
    return finish_run(run, cfg, {"stage2_pairs": s2["pairs"], "stage2_model": s2["model_ref"]})


@flow(name="avr-evaluate-run", log_prints=True)
def evaluate_run(params: RunParams = RunParams()) -> dict:  # noqa: B008
    """Test-time scaling and the AlpacaEval leaderboard for every model (stages from cache when done)."""
    params = as_params(params)
    run, cfg = start_run(params, ALL_SLICES)
    seed = cfg["policy"]
    s1 = stage1(cfg, seed)
    s2 = stage2(cfg, s1["model"])
    tts = test_time_scaling(cfg, s1["model"])
    board = evaluate(cfg, {"seed": seed, "rsft": s1["rsft"], "stage1": s1["model"], "stage2": s2["model"]}, run.id)
    return finish_run(run, cfg, {"test_time_scaling": tts}, board)


def deployments(preset: str = "tiny", overrides: list[str] = ()) -> list:
    """The pipeline (with the nightly schedule of `schedule.*`) and one deployment per stage flow,
    each defaulting to this preset and these overrides (validated here, before registering).
    Their parameters are `RunParams` (flows/params.py): the UI shows a typed form. With
    `iterate.continue_last=true` the nightly pipeline continues the chain of iterations in the
    store, so each night adds `iterate.count` iterations. A `flow: signal` preset has no stage 2, so
    it gets no stage-2 or evaluation deployment; its `avr-<preset>` runs flows/learning_signal.py."""
    return _deployments(preset, overrides)[0]


def _deployments(preset: str, overrides: list[str]) -> tuple[list, DictConfig]:
    """`deployments`, and the config they were validated with (registering loads it once)."""
    cfg = load_config(preset, list(overrides))
    check_schedule(OmegaConf.to_container(cfg, resolve=True))
    # the form's defaults for these deployments: validated just above, so not loaded a second time
    params = {"params": RunParams.model_construct(preset=preset, overrides=list(overrides)).model_dump()}
    nightly = Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone, active=cfg.schedule.active)
    stages = {"synthesis": synthesis_run, "stage1": stage1_run}
    if cfg.flow != "signal":
        stages |= {"stage2": stage2_run, "evaluate": evaluate_run}
    if cfg.schedule.flow not in ("pipeline", *stages):
        raise ConfigError(f"key 'schedule.flow': a `flow: {cfg.flow}` preset has no {cfg.schedule.flow} deployment "
                          f"(one of pipeline, {', '.join(stages)})")

    def when(name: str) -> dict:                   # the nightly schedule goes on one deployment
        return {"schedule": nightly} if cfg.schedule.flow == name else {}
    return [pipeline.to_deployment(name=f"avr-{cfg.preset}", parameters=params, description=DESCRIPTION["pipeline"],
                                   **when("pipeline")),
            *[f.to_deployment(name=f"{f.name}-{cfg.preset}", parameters=params, description=DESCRIPTION[f.name],
                              **when(name)) for name, f in stages.items()]], cfg


DESCRIPTION = {
    "pipeline": "The whole AvR pipeline (stage 1, stage 2, test-time scaling, AlpacaEval), `iterations` times. "
                "Nightly reruns reuse every cached stage; with continue_from=last each adds iterations. Artifacts: "
                "per-stage counts, the wall-time plot, the per-iteration plot, the leaderboard, and `avr-compare` "
                "(this run against the previous one). A preset with `flow: signal` (the signal preset) runs "
                "stage 1, the learning signal and test-time scaling instead (flows/learning_signal.py).",
    "avr-synthesis-run": "Stage-1 synthesis alone (respond, critique, refine, rm_score, select) with the seed policy "
                         "on one prompt slice: the quick one (tiny: a few minutes on CPU).",
    "avr-stage1-run": "Stage 1: synthesis, RSFT, synthesis with the RSFT policy, preference optimisation.",
    "avr-stage2-run": "Stage 2 on the Stage-1 model (stage 1 from cache when done).",
    "avr-evaluate-run": "Test-time scaling and the AlpacaEval leaderboard for every model (stages from cache).",
}


def resumed_run(flow_run_id: str) -> str:
    """Whom `avr resume <flow-run UUID>` resumes, for its run record: the avr run id, which names
    the flow run (run_records/record.py `name_flow_run`), else the UUID itself (a run that died
    before it was named)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    from run_records.resume import RUN_ID

    try:
        with get_client(sync_client=True) as client:
            name = client.read_flow_run(UUID(flow_run_id)).name
    except Exception:  # noqa: BLE001 -- the resume itself reports a missing run or server
        return flow_run_id
    return name if RUN_ID.match(name or "") else flow_run_id


def resume(flow_run_id: str) -> dict:
    """Run a failed or crashed run again, with its own parameters read from the Prefect API:
    finished stages come back from cache and a half-finished sharded stage continues from its
    last committed shard. (From the UI, "Retry" on a served deployment's run does the same.)"""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        name = client.read_flow(run.flow_id).name
    known = {f.name: f for f in (pipeline, signal_run, synthesis_run, stage1_run, stage2_run, evaluate_run)}
    if name not in known:
        raise ValueError(f"flow run {flow_run_id} is a {name!r} run; avr resume knows {sorted(known)}")
    given = dict(run.parameters)
    if "params" not in given:   # a run from before the typed form: {"preset", "overrides"[, "split"]}
        given["params"] = {k: given.pop(k) for k in ("preset", "overrides") if k in given}
    given["params"] = as_params(given["params"])
    if run.state is not None and run.state.is_crashed():
        _record_crash(given["params"], run.name, run.state.message)
    return known[name](**given)


def _record_crash(params: RunParams, run_id: str, message: str | None) -> None:
    """A flow run Prefect marked Crashed (a worker or node that died): its avr run's run.json says
    so before it is resumed (run_records/resume.py `record_crash`; a run that died before it was
    named has no record to write)."""
    from avr_core.store import Store
    from run_records.resume import RUN_ID, read_record, record_crash

    if RUN_ID.match(run_id or ""):
        store = Store.of(params.config())
        if record_crash(store, run_id, read_record(store, run_id), prefect_crashed=message or ""):
            print(f"run {run_id} crashed ({message or 'Prefect marked it Crashed'}): recorded in its run.json",
                  file=sys.stderr)


def deploy_to_pool(preset: str = "tiny", overrides: list[str] = (), pool: str = "avr-gpu") -> list:
    """Register the same deployments on a work pool that workers such as docker/compose.yaml's GPU
    worker pull their runs from (the code must be at the same path on the worker: the image's /app).

    The pool (a `process` pool, created if missing) runs at most `schedule.max_runs` flow runs at
    once: a second nightly run waits while the first holds the node's GPUs (Prefect's work-pool
    concurrency limit). And Prefect's own zombie detection is set up: an automation that marks a
    Running run Crashed once its heartbeats stop for `schedule.zombie_after_s` (a worker or node
    that died), so the UI shows it Crashed and "Retry" or `avr resume <flow-run id>` resumes it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    deps, cfg = _deployments(preset, overrides)     # validates before anything is registered
    limit = int(cfg.schedule.max_runs)
    with get_client(sync_client=True) as client:
        try:
            if client.read_work_pool(pool).concurrency_limit != limit:
                client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=limit))
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", concurrency_limit=limit))
    crash_unresponsive_runs(int(cfg.schedule.zombie_after_s))
    beat = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s(cfg.schedule.zombie_after_s))}
    for d in deps:   # a process worker runs each flow in a fresh temporary directory unless told where the code is
        jobs = d.job_variables or {}
        d.job_variables = {**jobs, "working_dir": str(ROOT), "env": {**jobs.get("env", {}), **beat}}
    return [d.apply(work_pool_name=pool) for d in deps]


def heartbeat_s(zombie_after_s: int) -> int:
    """How often a run beats so that the zombie automation never crashes a live one: three beats
    per `schedule.zombie_after_s`, and at least Prefect's minimum of 30 s. Set by the deployment
    (workers) and by `avr serve` (its runs), not left to each machine's PREFECT_FLOWS_HEARTBEAT_FREQUENCY:
    Prefect's default of 180 s under a 60 s automation crashed every served run (CI, 7 December 2026)."""
    return max(30, int(zombie_after_s) // 3)


ZOMBIES = "avr: crash runs without heartbeats"


def crash_unresponsive_runs(after_s: int) -> None:
    """The automation of Prefect's "detect zombie flows" guide, created once (by name) and kept at
    `after_s`: a flow run that sent a heartbeat and then neither another nor a final state within
    `after_s` seconds is set Crashed."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=after_s))
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat for {after_s} s: the worker or its node died")
    try:
        old = Automation.read(name=ZOMBIES)
    except ValueError:
        old = None
    if old is not None:
        if old.trigger.within == trigger.within:
            return
        old.delete()
    Automation(name=ZOMBIES, trigger=trigger, actions=[action]).create()


def serve(preset: str = "tiny", overrides: list[str] = ()) -> None:
    """Register the deployments and serve them (blocks; Ctrl-C stops). Needs a real server:
    `avr server`, or PREFECT_API_URL pointing at one. At most `schedule.max_runs` runs at once, as
    on a work pool (`deploy_to_pool`): more wait their turn."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    deps, cfg = _deployments(preset, overrides)
    schedule = cfg.schedule
    beat = heartbeat_s(schedule.zombie_after_s)
    # the served runs are child processes of this one (they get its environment and its settings):
    # they beat as often as the zombie automation of `avr deploy` needs, whatever this shell exported
    os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(beat)
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: beat}):
        prefect_serve(*deps, limit=int(schedule.max_runs))
