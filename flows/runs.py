"""Run bookkeeping shared by flows: load + validate config and inputs, save the resolved
config and the run record (`runs/<id>/run.json`: what `avr resume <id>` reads), write a run
summary (which stages came from cache) at the end, and the one line a failed run ends with."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import time
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from avr_core import compare, identity
from avr_core.config import ConfigError, load_config, to_yaml
from avr_core.iterations import ALL_SLICES, check_slices
from avr_core.model_refs import model_ref_problem
from avr_core.store import ArtifactRef, Store
from flows import supervisor
from flows.params import RunParams, as_params
from tasks.evaluate import validate_evalset
from tasks.runtime import policy_identity, publish, publish_plot, scorer_identity
from tasks.runtime.ledger import STAGE_LOG
from tasks.runtime.skeleton import StageTask
from tasks.synthesis import validate_prompts

# The prompt slices `data.<split>` each `flow:` reads; a slice a flow never reads is not checked
# (conf/signal.yaml has no stage 2: its stage2 slices are empty on purpose).
SLICES_READ = {"pipeline": ALL_SLICES, "signal": ("stage1_sft", "stage1_po", "heldout")}
# The training sections each `flow:` trains: only those have their `num_gpus` checked against this
# machine's GPUs (flows/learning_signal.py trains stage 1 only, so a stage-2 setting cannot refuse its run).
TRAINED = {"pipeline": ("rsft", "po", "cot_sft", "cot_po"), "signal": ("rsft", "po")}


def check_gpus(cfg: dict, trained: tuple[str, ...]) -> None:
    """Every device setting, `gpus` list, engine layout and training `num_gpus` against this
    machine (avr_core/backends/device.py), and the GPU list the DeepSpeed launcher would get
    (avr_core/training/launch.py): DeviceError with one line naming the key."""
    from avr_core.backends.device import DeviceError, check_devices
    from avr_core.training.launch import launcher_problem

    check_devices(cfg, trained)
    if problem := launcher_problem(cfg, trained):
        raise DeviceError(problem)


def preflight(cfg: dict, slices: tuple | None = None) -> int:
    """The checks of a validated config against this machine, before any work: the prompt and
    eval files (InputError: file, line, field), the prompt slices the run reads (`slices`, default
    those of the config's `flow`: each non-empty and inside the prompt file), the model paths and
    the store root (ConfigError: the key), and what each model given by name is
    (`check_identities`). Returns the number of prompts. No model is loaded, nothing is written
    (but the embedded model's one-off conversion). First, the GPUs: every device setting, `gpus`
    list, vLLM engine layout and training `num_gpus` against the CUDA devices visible here, so a
    count this node does not have fails now, not at the first training hours in."""
    from avr_core.backends.device import DeviceError

    try:   # e.g. scorer.device=cuda without CUDA, po.num_gpus=8 on one GPU
        check_gpus(cfg, TRAINED[cfg["flow"]])
    except DeviceError as e:
        raise ConfigError(str(e)) from None
    n = validate_prompts(cfg)                          # hf://: loads the dataset (or its cache), so n is known
    # iteration 0 here; flows/iterations.py checks the later ones (their slices move)
    if slices is None:
        extra = cfg["flow"] == "signal" and bool(cfg["data"].get("heldout_extra"))   # read by flows/learning_signal.py
        slices = SLICES_READ[cfg["flow"]] + (("heldout_extra",) if extra else ())
    check_slices(cfg["data"], n, range(1), 0, slices,
                 cfg["data"]["prompts"])
    validate_evalset(cfg)
    models = [("scorer.model.path", cfg["scorer"]["model"]["path"])]
    if cfg["generator"]["kind"] != "openai":          # there, the path may be the server's model name
        models.insert(0, ("policy.path", cfg["policy"]["path"]))
    if cfg["eval"]["judge"]["kind"] == "local":
        models.append(("eval.judge.local_model", cfg["eval"]["judge"]["local_model"]))
    for key, ref in models:
        if problem := model_ref_problem(ref):
            raise ConfigError(f"key '{key}': {problem} (got {ref!r})")
    _check_store_root(cfg["store"]["root"])
    check_schedule(cfg)
    check_identities(cfg)                              # last: it may convert the embedded model (seconds, once)
    return n


def check_identities(cfg: dict) -> None:
    """Resolve the revision or content digest of every model given by name, as the stages' keys
    will (avr_core/identity.py): an offline hub without the snapshot fails the run here, in one
    line, and each identity is computed once for the run (memoised; `start_run` forgets the last
    run's). The embedded model is converted here on its first use on this machine."""
    from avr_core.identity import IdentityError

    for key, keyed in (("policy.path", lambda: policy_identity(cfg["policy"], cfg["generator"])),
                       ("scorer.model.path", lambda: scorer_identity(cfg["scorer"]))):
        try:
            keyed()
        except IdentityError as e:
            raise ConfigError(f"key '{key}': {e}") from None


def check_schedule(cfg: dict) -> None:
    """`schedule.cron` and `schedule.timezone` as Prefect's scheduler will parse them."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    s = cfg["schedule"]
    try:
        CronSchedule(cron=s["cron"], timezone=s["timezone"])
    except ValidationError as e:
        err = e.errors()[0]
        key = "schedule.timezone" if "timezone" in err["msg"] else "schedule.cron"
        raise ConfigError(f"key '{key}': {err['msg'].removeprefix('Value error, ')}") from None


def _check_store_root(root: str) -> None:
    """A local store root must be (or be creatable as) a writable directory; URLs are not checked."""
    if "://" in root and not root.startswith("file://"):
        return
    p = Path(root.removeprefix("file://")).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"key 'store.root': not a directory (got {root!r})")
    up = p
    while not up.exists():
        up = up.parent
    if not up.is_dir():
        raise ConfigError(f"key 'store.root': {str(up)!r} is a file, not a directory (got {root!r})")
    if not os.access(up, os.W_OK | os.X_OK):
        raise ConfigError(f"key 'store.root': {str(up)!r} is not writable (got {root!r})")


def release_all_engines(flow=None, flow_run=None, state=None) -> None:
    """A run's end, completed, failed or crashed (a Prefect state hook): engines kept from stage to
    stage (`keep_engine`, the paper preset's layout) end with it, processes and memory, so a
    long-lived worker process holds nothing between runs."""
    from avr_core import backends

    backends.clear_cache()


# How `avr` started this process's run (set by flows/cli.py; empty for deployments and tests):
# the command line, and the run id it resumes. Recorded in run.json.
LAUNCH: dict = {}
# The run in progress in this process ({"id", "store"}), for the line a failure ends with.
CURRENT: dict = {}


@contextlib.contextmanager
def launched(command: list[str] | None = None, resumes: str | None = None):
    LAUNCH.update(command=shlex.join(["avr", *command]) if command else None, resumes=resumes)
    CURRENT.clear()
    try:
        yield
    finally:
        LAUNCH.clear()


def start_run(params: RunParams | dict, slices: tuple | None = None) -> tuple[dict, dict]:
    """Everything that can reject a run happens here, before any stage runs. `params` are the
    deployment's form (flows/params.py); `slices` the prompt slices this flow reads (default: those
    of the config's `flow`). The run record names the flow and deployment, so the run can be
    compared with the previous run of the same deployment at its end."""
    params = as_params(params)
    preset, overrides = params.preset, params.to_overrides()
    cfg_obj = load_config(preset, overrides)
    cfg = OmegaConf.to_container(cfg_obj, resolve=True)
    identity.forget()                              # a re-pointed path or a new snapshot counts from this run on
    n = preflight(cfg, slices)
    store = Store(cfg["store"]["root"])
    STAGE_LOG.clear()                              # this run's wall-time table starts here
    quiet_repeated_tracebacks()
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    run = {"id": run_id, "started": time.time(), "preset": preset, "overrides": overrides,
           "params": params.model_dump(), "prompt_rows": n, **_origin()}
    store.write_atomic(f"{store.path('runs', run_id)}/config.yaml", to_yaml(cfg_obj).encode())
    record = {**run, "store": store.root, "command": LAUNCH.get("command"), "resumes": LAUNCH.get("resumes")}
    store.write_atomic(f"{store.path('runs', run_id)}/run.json", json.dumps(record, indent=2, default=str).encode())
    CURRENT.update(id=run_id, store=store.root)
    resumes = f" (resumes run {LAUNCH['resumes']})" if LAUNCH.get("resumes") else ""
    print(f"run {run_id}{resumes}: preset={preset} overrides={overrides} prompts={n} store={store.root}\n"
          f"  if it fails or is stopped, resume it with: {resume_command(run_id, store.root)}")
    supervisor.record_run(run["flow_run_id"], resume_command(run_id, store.root))   # for the stop line
    return run, cfg


def resume_command(run_id: str, store_root: str) -> str:
    """`avr resume <run id>`, with `--store` when the store is not the one `avr` finds by default.

    >>> resume_command("20261203-080303-fe9764", "/data/avr")
    'avr resume 20261203-080303-fe9764 --store /data/avr'
    """
    default = os.environ.get("AVR_STORE") or "./artifacts"
    a, b = (r if "://" in r else os.path.abspath(r) for r in (store_root, default))
    return f"avr resume {run_id}" + ("" if a == b else f" --store {shlex.quote(store_root)}")


def failure_line(exc: BaseException) -> str | None:
    """The one line a failed run ends with: the stage, the error, what is kept, how to resume
    (None: no run had started in this process). The traceback is in the log above, once."""
    if not CURRENT:
        return None
    store, stage = Store(CURRENT["store"]), failed_stage(exc)
    kept = sum(store.exists(store.ref(*r["artifact"].split("/", 1))) for r in STAGE_LOG)
    error = (str(exc).strip().splitlines() or [""])[0]
    _record_failure(store, stage, f"{type(exc).__name__}: {error}")
    return (f"avr: run {CURRENT['id']} failed in stage {stage or '?'} ({type(exc).__name__}: {error}); kept in "
            f"{store.root}: the artifacts of {kept} finished stage{'s' * (kept != 1)}; resume (they are cache hits): "
            f"{resume_command(CURRENT['id'], store.root)}")


def failed_stage(exc: BaseException) -> str | None:
    """The stage task (tasks/runtime/skeleton.py StageTask) the exception came out of, from its traceback."""
    tb, name = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code is StageTask.__call__.__code__:
            name = tb.tb_frame.f_locals["self"].name      # the innermost one wins
        tb = tb.tb_next
    return name


def _record_failure(store: Store, stage: str | None, error: str) -> None:
    """The failed run's run.json says where it failed (best effort: the line is what counts)."""
    path = f"{store.path('runs', CURRENT['id'])}/run.json"
    with contextlib.suppress(Exception):
        record = json.loads(store.fs.cat_file(path))
        record["failed"] = {"stage": stage, "error": error, "at": time.time()}
        store.write_atomic(path, json.dumps(record, indent=2, default=str).encode())


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


def _origin() -> dict:
    """The Prefect flow and deployment this run belongs to (deployment None: `avr run` or a test)."""
    from prefect.runtime import deployment, flow_run

    try:
        extra = {k: v for k, v in flow_run.parameters.items() if k != "params"}   # e.g. a synthesis run's split
        return {"flow": flow_run.flow_name or None, "deployment": deployment.name or None,
                "flow_run_id": flow_run.id or None, "flow_parameters": extra}
    except Exception:   # outside a flow run
        return {"flow": None, "deployment": None, "flow_run_id": None, "flow_parameters": {}}


def finish_run(run: dict, cfg: dict, outputs: dict[str, ArtifactRef], leaderboard: str | None = None) -> dict:
    store = Store(cfg["store"]["root"])
    wall = round(time.time() - run["started"], 1)
    manifests = {k: store.manifest(v) for k, v in outputs.items()}
    summary = {**run, "store": store.root, "wall_s": wall, "stages": list(STAGE_LOG),
               "outputs": {k: {"ref": str(v), "path": v.path, "counts": manifests[k]["counts"],
                               "rows": manifests[k]["rows"], "result": manifests[k].get("result")}
                           for k, v in outputs.items()}}
    from avr_core.catalog import recompute_reason
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run["started"]))   # compare with earlier runs only
    for r in STAGE_LOG:   # why each computed stage could not come from cache
        if not r["cached"] and "why" not in r:
            stage, _, key = r["artifact"].partition("/")
            ref = store.ref(stage, key)
            r["why"] = recompute_reason(store, ref, started) if store.exists(ref) else "failed"
    table = wall_time_table(STAGE_LOG, wall)
    store.write_atomic(f"{store.path('runs', run['id'])}/timings.md", table.encode())
    store.write_atomic(f"{store.path('runs', run['id'])}/summary.json", json.dumps(summary, indent=2).encode())
    png = compare.plot_wall_times(STAGE_LOG)
    store.write_atomic(f"{store.path('runs', run['id'])}/timings.png", png)
    publish_plot(store.ref("runs", run["id"]), "avr-run-timings", png, STAGE_LOG,
                 "wall time per stage: computed or from cache", table)
    counts = [{"output": name, "artifact": out["ref"], "count": k, "value": v}
              for name, out in summary["outputs"].items()
              for k, v in [*((f"rows:{n}", r) for n, r in out["rows"].items()), *sorted(out["counts"].items())]]
    publish(store.ref("runs", run["id"]), "avr-run-outputs", table=counts)   # the counts of what the run made
    summary["compare"] = _compare_with_previous(store, summary)
    if leaderboard is not None:   # this run's rows (the store keeps every run's)
        from tasks.evaluate import read_leaderboard
        summary["leaderboard"] = [r for r in read_leaderboard(store.root) if r["run"] == run["id"]]
    store.write_atomic(f"{store.path('runs', run['id'])}/summary.json", json.dumps(summary, indent=2).encode())
    print(end_of_run(summary, per_stage_table(STAGE_LOG, wall), smoke=cfg["eval"]["smoke"]))
    return summary


def end_of_run(summary: dict, table: str, smoke: bool = False) -> str:
    """What a finished run prints last, about a screen: where its outputs are, the per-stage
    wall times, the learning signal and test-time scaling as numbers, THIS run's leaderboard rows
    and where the rest is. The store keeps everything (summary.json, compare.md, leaderboard.md)."""
    root, rid = summary["store"], summary["id"]
    lines = [f"\nrun {rid} finished in {summary['wall_s']:.0f} s; its outputs, in the store {root}:"]
    lines += [f"  {name:18} {o['path']}" for name, o in summary["outputs"].items()]
    lines.append(f"  {'run record':18} {root}/runs/{rid}/ (summary.json, timings.md, compare.md)")
    lines.append(f"\nwall time per stage (every call: {root}/runs/{rid}/timings.md):\n{table}")
    for name, o in summary["outputs"].items():
        lines += _result_lines(name, o.get("result"))
    if summary.get("leaderboard") is not None:
        from avr_core.evaluation import leaderboard as lb
        from tasks.evaluate import SMOKE_TITLE
        lines.append(f"leaderboard: this run's {len(summary['leaderboard'])} rows (every run's: `avr eval`, "
                     f"or {root}/leaderboard/leaderboard.md)\n")
        lines.append(lb.to_markdown(summary["leaderboard"], SMOKE_TITLE if smoke else None))
    prev = summary.get("compare")
    lines.append(f"compared with the previous run {prev}: {root}/runs/{rid}/compare.md (`avr compare {rid}`)"
                 if prev else "the first finished run of its kind in this store: nothing to compare with yet")
    return "\n".join(lines)


def _result_lines(name: str, result) -> list[str]:
    """An output's result as numbers: a learning signal (mean difference, 95% CI) or a
    test-time-scaling curve (its table); nothing for outputs without one."""
    from avr_core.scaling import to_markdown

    if isinstance(result, dict) and {"mean_diff", "ci95", "n"} <= result.keys():
        return [_signal_line(name, result), ""]
    if isinstance(result, dict) and "comparisons" in result:      # the signal preset's report
        return [*(_signal_line(f"{name} {c}", r) for c, r in result["comparisons"].items()), ""]
    if isinstance(result, list) and result and "R" in result[0]:
        return [f"{name}: mean score per refinement round R", to_markdown(result)]
    return []


def _signal_line(name: str, r: dict) -> str:
    """
    >>> _signal_line("learning_signal", {"mean_diff": 0.0123, "ci95": [-0.01, 0.0346], "n": 4, "b_better": 3,
    ...                                  "scorer": "reward_model"})
    'learning_signal (reward_model scorer, n=4): mean difference +0.0123, 95% CI [-0.0100, +0.0346]; better on 3 of 4'
    """
    (lo, hi), scorer = r["ci95"], f"{r['scorer']} scorer, " if r.get("scorer") else ""
    return (f"{name} ({scorer}n={r['n']}): mean difference {r['mean_diff']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]; "
            f"better on {r.get('b_better', '?')} of {r['n']}")


def _compare_with_previous(store: Store, summary: dict) -> str | None:
    """The markdown comparing this run with the previous run of the same deployment (or flow):
    runs/<id>/compare.md and the Prefect artifact `avr-compare`. None for the first run."""
    prev = compare.previous_run(store, summary)
    if prev is None:
        md = (f"### Run {summary['id']}\n\nThe first finished run of `{compare.source(summary)}` in this store: "
              "nothing to compare with yet.\n")
    else:
        md = compare.to_markdown(compare.compare(store, prev, summary["id"]))
    store.write_atomic(f"{store.path('runs', summary['id'])}/compare.md", md.encode())
    publish(store.ref("runs", summary["id"]), "avr-compare", markdown=md)
    return prev


def _engine_cells(rows: list[dict]) -> tuple[str, str]:
    """The "starts (s)" and "reloads (s)" cells of some stage calls: models loaded or vLLM engines
    started, and new weights put into a running engine (issue 31), each with their seconds."""
    def cell(n, key):
        s = sum(r.get(key, 0.0) for r in rows)
        return f"{n} ({s:.1f})" if n else ""
    return (cell(sum(r.get("loads", 0) for r in rows), "load_s"),
            cell(sum(r.get("reloads", 0) for r in rows), "reload_s"))


def per_stage_table(log: list[dict], wall_s: float) -> str:
    """`wall_time_table` with one row per stage rather than per call (a tiny run calls respond
    five times): what the end of a run prints, so it fits on a screen.

    >>> print(per_stage_table([{"task": "respond", "cached": False, "wall_s": 30.0, "loads": 1, "load_s": 25.0},
    ...                        {"task": "respond", "cached": False, "wall_s": 2.0, "reloads": 1, "reload_s": 1.0},
    ...                        {"task": "respond", "cached": True, "wall_s": 0.5}], 33.0))
    | stage | calls | computed | cached | wall s | starts (s) | reloads (s) |
    |---|---|---|---|---|---|---|
    | respond | 3 | 2 | 1 | 32.5 | 1 (25.0) | 1 (1.0) |
    | **total** | 3 | 2 | 1 | **33.0** | **1 (25.0)** | **1 (1.0)** |
    <BLANKLINE>
    """
    by_task: dict[str, list[dict]] = {}
    for r in log:
        by_task.setdefault(r["task"], []).append(r)

    def counts(rows):
        c = sum(not r["cached"] for r in rows)
        return f"{len(rows)} | {c} | {len(rows) - c}"
    lines = ["| stage | calls | computed | cached | wall s | starts (s) | reloads (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {t} | {counts(rows)} | {sum(r['wall_s'] for r in rows):.1f} | {' | '.join(_engine_cells(rows))} |"
              for t, rows in by_task.items()]
    starts, reloads = _engine_cells(log)
    lines.append(f"| **total** | {counts(log)} | **{wall_s:.1f}** | **{starts or 0}** | **{reloads or 0}** |")
    return "\n".join(lines) + "\n"


def wall_time_table(log: list[dict], wall_s: float) -> str:
    """Markdown: one row per stage call in run order, with the models it loaded (vLLM engines
    started, HF models loaded) and the new weights it put into running engines, with their
    seconds, then the run's total and what the stages do not account for (Prefect flow
    bookkeeping, config and input checks).

    >>> print(wall_time_table([{"task": "respond", "artifact": "respond/ab", "cached": False, "wall_s": 30.0,
    ...                         "why": "changed config", "loads": 1, "load_s": 25.0}], 31.5))
    | stage | artifact | status | wall s | starts (s) | reloads (s) |
    |---|---|---|---|---|---|
    | respond | respond/ab | computed (changed config) | 30.0 | 1 (25.0) |  |
    | (outside stages) | | | 1.5 | | |
    | **total** | | 1 computed, 0 cached | **31.5** | **1 (25.0)** | **0** |
    <BLANKLINE>
    """
    def status(r):
        return "cached" if r["cached"] else f"computed ({r['why']})" if r.get("why") else "computed"

    lines = ["| stage | artifact | status | wall s | starts (s) | reloads (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['artifact']} | {status(r)} | {r['wall_s']:.1f} | {' | '.join(_engine_cells([r]))} |"
              for r in log]
    inside = sum(r["wall_s"] for r in log)
    n_cached = sum(r["cached"] for r in log)
    starts, reloads = _engine_cells(log)
    lines.append(f"| (outside stages) | | | {max(0.0, wall_s - inside):.1f} | | |")
    lines.append(f"| **total** | | {len(log) - n_cached} computed, {n_cached} cached | **{wall_s:.1f}** | "
                 f"**{starts or 0}** | **{reloads or 0}** |")
    return "\n".join(lines) + "\n"
