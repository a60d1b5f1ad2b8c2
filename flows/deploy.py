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

from typing import Annotated, Literal

from omegaconf import OmegaConf
from prefect import flow
from prefect.schedules import Cron
from pydantic import Field

from avr_core.config import load_config
from avr_core.iterations import ALL_SLICES
from flows.evaluate import evaluate, test_time_scaling
from flows.learning_signal import signal_run
from flows.params import RunParams, as_params
from flows.pipeline import pipeline
from flows.runs import check_schedule, finish_run, start_run
from flows.stage1 import stage1, synthesis
from flows.stage2 import stage2

STAGE1_SLICES = ("stage1_sft", "stage1_po")


@flow(name="avr-synthesis-run", log_prints=True)
def synthesis_run(params: RunParams = RunParams(),  # noqa: B008 (Prefect parameter: the UI's run form)
                  split: Annotated[Literal["stage1_sft", "stage1_po", "stage2", "stage2_po", "heldout"], Field(
                      description="the prompt slice data.<split> to synthesise on")] = "stage1_sft") -> dict:
    """Stage-1 synthesis alone with the seed policy (respond -> critique -> refine -> rm_score -> select)."""
    run, cfg = start_run(params, (split,))            # preflight checks the slices each flow reads
    return finish_run(run, cfg, {"synthesis": synthesis(cfg, cfg["policy"], split)})


@flow(name="avr-stage1-run", log_prints=True)
def stage1_run(params: RunParams = RunParams()) -> dict:  # noqa: B008 (Prefect parameter)
    """Stage 1 alone: synthesis -> RSFT -> synthesis -> PO."""
    run, cfg = start_run(params, STAGE1_SLICES)
    s1 = stage1(cfg, cfg["policy"])
    return finish_run(run, cfg, {"stage1_pairs": s1["pairs"], "stage1_model": s1["model_ref"]})


@flow(name="avr-stage2-run", log_prints=True)
def stage2_run(params: RunParams = RunParams()) -> dict:  # noqa: B008
    """Stage 2 on the Stage-1 model (stage 1 from cache when done)."""
    run, cfg = start_run(params, (*STAGE1_SLICES, "stage2", "stage2_po"))   # signal preset: refused, no stage 2
    s2 = stage2(cfg, stage1(cfg, cfg["policy"])["model"])
    return finish_run(run, cfg, {"stage2_pairs": s2["pairs"], "stage2_model": s2["model_ref"]})


@flow(name="avr-evaluate-run", log_prints=True)
def evaluate_run(params: RunParams = RunParams()) -> dict:  # noqa: B008
    """Test-time scaling and the AlpacaEval leaderboard for every model (stages from cache when done)."""
    run, cfg = start_run(params, ALL_SLICES)
    seed = cfg["policy"]
    s1 = stage1(cfg, seed)
    s2 = stage2(cfg, s1["model"])
    tts = test_time_scaling(cfg, s1["model"])
    board = evaluate(cfg, {"seed": seed, "rsft": s1["rsft"], "stage1": s1["model"], "stage2": s2["model"]}, run["id"])
    return finish_run(run, cfg, {"test_time_scaling": tts}, board)


def deployments(preset: str = "tiny", overrides: list[str] = ()) -> list:
    """The pipeline (with the nightly schedule of `schedule.*`) and one deployment per stage flow,
    each defaulting to this preset and these overrides (validated here, before registering).
    Their parameters are `RunParams` (flows/params.py): the UI shows a typed form. With
    `iterate.continue_last=true` the nightly pipeline continues the chain of iterations in the
    store, so each night adds `iterate.count` iterations. A `flow: signal` preset has no stage 2, so
    it gets no stage-2 or evaluation deployment; its `avr-<preset>` runs flows/learning_signal.py."""
    cfg = load_config(preset, list(overrides))
    check_schedule(OmegaConf.to_container(cfg, resolve=True))
    params = {"params": as_params(preset=preset, overrides=list(overrides)).model_dump()}
    nightly = Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone, active=cfg.schedule.active)
    stages = (synthesis_run, stage1_run) if cfg.flow == "signal" else (synthesis_run, stage1_run, stage2_run,
                                                                        evaluate_run)
    return [pipeline.to_deployment(name=f"avr-{cfg.preset}", parameters=params, schedule=nightly,
                                   description=DESCRIPTION["pipeline"]),
            *[f.to_deployment(name=f"{f.name}-{cfg.preset}", parameters=params, description=DESCRIPTION[f.name])
              for f in stages]]


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
    return known[name](**given)


def deploy_to_pool(preset: str = "tiny", overrides: list[str] = (), pool: str = "avr-gpu") -> list:
    """Register the same deployments on a work pool (created as a `process` pool if missing):
    workers such as docker/compose.yaml's GPU worker pull their runs. The code must be at the
    same path on the worker (the image's /app)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    deps = deployments(preset, overrides)          # validates before anything is registered
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    return [d.apply(work_pool_name=pool) for d in deps]


def serve(preset: str = "tiny", overrides: list[str] = ()) -> None:
    """Register the deployments and serve them (blocks; Ctrl-C stops). Needs a real server:
    `avr server`, or PREFECT_API_URL pointing at one."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(preset, overrides))
