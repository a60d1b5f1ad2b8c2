"""The start and the end of a run, shared by every flow: `start_run` loads and validates the config
and inputs (run_records/preflight.py), saves the resolved config and the run record
(`runs/<id>/run.json`: what `avr resume <id>` reads) and returns the record, a `RunRecord`
(run_records/record.py); `finish_run` takes it back and writes the run's summary (which stages came
from cache, the wall-time tables, the comparison with the previous run) and prints the end of the
run (run_records/report.py). `release_all_engines` is the flows' end-of-run state hook."""
from __future__ import annotations

import json
import time

from omegaconf import OmegaConf

from avr_core import compare, identity
from avr_core.backends.device import size_cpu_threads
from avr_core.config import to_yaml
from avr_core.store import ArtifactRef, Store
from run_records.failure import quiet_repeated_tracebacks
from run_records.preflight import preflight
from run_records.record import RunRecord, current_launch
from run_records.report import end_of_run, per_stage_table, wall_time_table
from tasks.runtime import publish, publish_plot
from tasks.runtime.ledger import RUN, STAGE_LOG


def start_run(params, slices: tuple | None = None) -> tuple[RunRecord, dict]:
    """Everything that can reject a run happens here, before any stage runs. `params` is the run's
    form (flows/params.py `RunParams`): its config, loaded once by its validator, is the one this
    run checks, saves and runs; the form itself is recorded as given. `slices` the prompt slices
    this flow reads (default: those of the config's `flow`). The run record names the flow and
    deployment, so the run can be compared with the previous run of the same deployment at its
    end. Returns the record and the resolved config (a plain dict)."""
    preset, overrides, cfg_obj = params.preset, params.to_overrides(), params.config()
    cfg = OmegaConf.to_container(cfg_obj, resolve=True)
    identity.forget()                              # a re-pointed path or a new snapshot counts from this run on
    size_cpu_threads()                             # AVR_THREADS or this process's cores: runs side by side share
    n = preflight(cfg, slices)
    store = Store.of(cfg)
    STAGE_LOG.clear()                              # this run's wall-time table starts here
    quiet_repeated_tracebacks()
    launch = current_launch()
    run = RunRecord.begin(store, preset, list(overrides), params.model_dump(), n, launch)
    RUN["id"] = run.id                             # the stages' manifests say which run computed them
    RUN["on_compute"] = run.record_stage           # run.json: the stage in progress, should the run vanish
    run.save(to_yaml(cfg_obj))
    run.name_flow_run()
    resumes = f" (resumes run {run.resumes})" if run.resumes else ""
    print(f"run {run.id}{resumes}: preset={preset} overrides={overrides} prompts={n} store={store.root}\n"
          f"  if it fails or is stopped, resume it with: {run.resume_command()}")
    launch.started(run)                            # `avr`: the failure line; its supervisor: the stop line
    return run, cfg


def finish_run(run: RunRecord, cfg: dict, outputs: dict[str, ArtifactRef], leaderboard: str | None = None) -> dict:
    """The end of a completed run: its summary (runs/<id>/summary.json, returned), the wall-time
    tables and plot, the counts of its outputs and the comparison with the previous run, written and
    published; with `leaderboard` (the run evaluated its models), THIS run's leaderboard rows too.
    Prints the end of the run."""
    RUN["on_compute"] = None                       # the run's stages are done: no stage to note
    store = Store.of(cfg)
    wall = round(time.time() - run.started, 1)
    manifests = {k: store.manifest(v) for k, v in outputs.items()}
    summary = {**run.summary_fields(), "store": store.root, "wall_s": wall, "stages": list(STAGE_LOG),
               "outputs": {k: {"ref": str(v), "path": v.path, "counts": manifests[k]["counts"],
                               "rows": manifests[k]["rows"], "result": manifests[k].get("result")}
                           for k, v in outputs.items()}}
    from avr_core.catalog import recompute_reason
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.started))   # compare with earlier runs only
    for r in STAGE_LOG:   # why each computed stage could not come from cache
        if not r["cached"] and "why" not in r:
            stage, _, key = r["artifact"].partition("/")
            ref = store.ref(stage, key)
            r["why"] = recompute_reason(store, ref, started) if store.exists(ref) else "failed"
    table = wall_time_table(STAGE_LOG, wall)
    store.write_atomic(f"{store.path('runs', run.id)}/timings.md", table.encode())
    store.write_atomic(f"{store.path('runs', run.id)}/summary.json", json.dumps(summary, indent=2).encode())
    png = compare.plot_wall_times(STAGE_LOG)
    store.write_atomic(f"{store.path('runs', run.id)}/timings.png", png)
    publish_plot(store.ref("runs", run.id), "avr-run-timings", png, STAGE_LOG,
                 "wall time per stage: computed or from cache", table)
    counts = [{"output": name, "artifact": out["ref"], "count": k, "value": v}
              for name, out in summary["outputs"].items()
              for k, v in [*((f"rows:{n}", r) for n, r in out["rows"].items()), *sorted(out["counts"].items())]]
    publish(store.ref("runs", run.id), "avr-run-outputs", table=counts)   # the counts of what the run made
    summary["compare"] = _compare_with_previous(store, summary)
    if leaderboard is not None:   # this run's rows (the store keeps every run's)
        from tasks.evaluate import read_leaderboard
        summary["leaderboard"] = [r for r in read_leaderboard(store.root) if r["run"] == run.id]
    store.write_atomic(f"{store.path('runs', run.id)}/summary.json", json.dumps(summary, indent=2).encode())
    report = end_of_run(summary, per_stage_table(STAGE_LOG, wall), smoke=cfg["eval"]["smoke"])
    launch = current_launch()
    if launch.command:           # `avr run` / `avr resume`: the report is the command's output, on stdout
        launch.report = report
    else:                        # a deployment's run: its log (the flow's log_prints), shown in the UI
        print(report)
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
    return prev


def release_all_engines(flow=None, flow_run=None, state=None) -> None:
    """A run's end, completed, failed or crashed (a Prefect state hook): engines kept from stage to
    stage (`keep_engine`, the paper preset's layout) end with it, processes and memory, so a
    long-lived worker process holds nothing between runs, and its run record stops taking notes."""
    from avr_core import backends

    RUN["on_compute"] = None
    backends.clear_cache()
