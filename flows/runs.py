"""Run bookkeeping shared by flows: load + validate config and inputs, save the resolved
config, and write a run summary (which stages came from cache) at the end."""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from avr_core import compare, identity
from avr_core.config import ConfigError, load_config, to_yaml
from avr_core.iterations import ALL_SLICES, check_slices
from avr_core.models import model_ref_problem
from avr_core.store import ArtifactRef, Store
from flows import supervisor
from flows.params import RunParams, as_params
from tasks.common import STAGE_LOG, policy_identity, publish, publish_plot, scorer_identity
from tasks.evaluate import validate_evalset
from tasks.synthesis import validate_prompts

# The prompt slices `data.<split>` each `flow:` reads; a slice a flow never reads is not checked
# (conf/signal.yaml has no stage 2: its stage2 slices are empty on purpose).
SLICES_READ = {"pipeline": ALL_SLICES, "signal": ("stage1_sft", "stage1_po", "heldout")}


def preflight(cfg: dict, slices: tuple | None = None) -> int:
    """The checks of a validated config against this machine, before any work: the prompt and
    eval files (InputError: file, line, field), the prompt slices the run reads (`slices`, default
    those of the config's `flow`: each non-empty and inside the prompt file), the model paths and
    the store root (ConfigError: the key), and what each model given by name is
    (`check_identities`). Returns the number of prompts. No model is loaded, nothing is written
    (but the embedded model's one-off conversion)."""
    from avr_core.backends.device import DeviceError, check_devices

    try:
        check_devices(cfg)                             # e.g. scorer.device=cuda on a machine without CUDA
    except DeviceError as e:
        raise ConfigError(str(e)) from None
    n = validate_prompts(cfg)                          # hf://: loads the dataset (or its cache), so n is known
    # iteration 0 here; flows/iterations.py checks the later ones (their slices move)
    check_slices(cfg["data"], n, range(1), 0, SLICES_READ[cfg["flow"]] if slices is None else slices,
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
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    store.write_atomic(f"{store.path('runs', run_id)}/config.yaml", to_yaml(cfg_obj).encode())
    print(f"run {run_id}: preset={preset} overrides={overrides} prompts={n} store={cfg['store']['root']}")
    origin = _origin()
    supervisor.record_run(origin["flow_run_id"])   # what `avr` names if the run is stopped
    return {"id": run_id, "started": time.time(), "preset": preset, "overrides": overrides,
            "params": params.model_dump(), "prompt_rows": n, **origin}, cfg


def _origin() -> dict:
    """The Prefect flow and deployment this run belongs to (deployment None: `avr run` or a test)."""
    from prefect.runtime import deployment, flow_run

    try:
        return {"flow": flow_run.flow_name or None, "deployment": deployment.name or None,
                "flow_run_id": flow_run.id or None}
    except Exception:   # outside a flow run
        return {"flow": None, "deployment": None, "flow_run_id": None}


def finish_run(run: dict, cfg: dict, outputs: dict[str, ArtifactRef], leaderboard: str | None = None) -> dict:
    store = Store(cfg["store"]["root"])
    wall = round(time.time() - run["started"], 1)
    summary = {**run, "wall_s": wall, "stages": list(STAGE_LOG),
               "outputs": {k: {"ref": str(v), "path": v.path, "counts": store.manifest(v)["counts"],
                               "rows": store.manifest(v)["rows"]} for k, v in outputs.items()}}
    from avr_core.inspect import recompute_reason
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
    for name, out in summary["outputs"].items():
        print(f"{name}: {out['path']}\n  rows={out['rows']}\n  counts={out['counts']}")
    print(f"\nper-stage wall time (run {run['id']}):\n{table}")
    if leaderboard:
        where = store.path("leaderboard", "leaderboard.md")
        print(f"\nleaderboard ({where}; `avr eval` shows it again):\n{leaderboard}")
    return summary


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
    print(f"\n{md}")
    return prev


def wall_time_table(log: list[dict], wall_s: float) -> str:
    """Markdown: one row per stage call in run order, with the models it loaded (vLLM engines
    started, HF models loaded) and their seconds, then the run's total and what the stages do
    not account for (Prefect flow bookkeeping, config and input checks).

    >>> print(wall_time_table([{"task": "respond", "artifact": "respond/ab", "cached": False, "wall_s": 30.0,
    ...                         "why": "changed config", "loads": 1, "load_s": 25.0}], 31.5))
    | stage | artifact | status | wall s | model loads (s) |
    |---|---|---|---|---|
    | respond | respond/ab | computed (changed config) | 30.0 | 1 (25.0) |
    | (outside stages) | | | 1.5 | |
    | **total** | | 1 computed, 0 cached | **31.5** | **1 (25.0)** |
    <BLANKLINE>
    """
    def status(r):
        return "cached" if r["cached"] else f"computed ({r['why']})" if r.get("why") else "computed"

    def loads(n, s):
        return f"{n} ({s:.1f})" if n else ""
    lines = ["| stage | artifact | status | wall s | model loads (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['artifact']} | {status(r)} | {r['wall_s']:.1f} | "
              f"{loads(r.get('loads', 0), r.get('load_s', 0.0))} |" for r in log]
    inside = sum(r["wall_s"] for r in log)
    n_cached = sum(r["cached"] for r in log)
    n_loads, load_s = sum(r.get("loads", 0) for r in log), sum(r.get("load_s", 0.0) for r in log)
    lines.append(f"| (outside stages) | | | {max(0.0, wall_s - inside):.1f} | |")
    lines.append(f"| **total** | | {len(log) - n_cached} computed, {n_cached} cached | **{wall_s:.1f}** | "
                 f"**{n_loads} ({load_s:.1f})** |")
    return "\n".join(lines) + "\n"
