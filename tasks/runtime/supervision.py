"""Training as a supervised subprocess (`python -m avr_core.training`, or the `deepspeed`
launcher for several GPUs): the Prefect worker never holds CUDA/NCCL or process-group state, and
the task's timeout can actually stop it (a blocking call in a worker thread cannot be interrupted,
PrefectHQ/prefect#15760). Checkpoints go to `<store>/.work/<stage>-<key>/ckpt`, so a killed or
failed training resumes from its last checkpoint when run again.

On an object store (store.root=s3://...) the subprocess still reads and writes local files: the
base model is fetched into the local artifact cache (`Store.fetch`, keyed by artifact key and
manifest checksum), the model is written to a local staging directory and uploaded into the
artifact before its manifest is committed, and checkpoints live in a local work directory that is
synced to `<store>/.work/<stage>-<key>/ckpt` (each committed step, then its LATEST) while training
runs, so a rerun on ANOTHER machine resumes from the last synced step. Several nodes:
`scale.hostfile` / `scale.num_nodes` (the DeepSpeed launcher, docs/SCALING.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psutil

from avr_core import backends
from avr_core.model_refs import resolve_model_path
from avr_core.store import ArtifactRef, LeaseLost, Store, artifact_cache_dir, assert_lease, held_state, note_progress
from avr_core.store.objects import files_under, remove_tree
from avr_core.training.dist import child_env
from avr_core.training.launch import launch_command, write_spec
from tasks.runtime.ledger import logger
from tasks.runtime.output import Output


def _local_dir(store: Store, ref: ArtifactRef) -> Path:
    """Where the training subprocess writes the artifact's model: the artifact's own directory on a
    local store; on an object store a local staging directory, uploaded before the manifest."""
    if not store.remote:
        return Path(store.local_path(ref))
    return Path(artifact_cache_dir()) / ".staging" / f"{ref.stage}-{ref.key}"


def _work_dir(store: Store, name: str) -> Path:
    """Checkpoints and inputs of an unfinished training run: `<store>/.work/<name>` on a local
    store; on an object store a local directory synced to that place (`_CkptSync`)."""
    if not store.remote:
        return Path(store.local_path(store.ref(".work", name)))
    return Path(artifact_cache_dir()) / ".work" / name


class _CkptSync:
    """Object stores: upload each newly committed checkpoint step (its files, then LATEST, the
    commit point of avr_core/training/checkpoint.py) to `<store>/.work/<name>/<attempt>/ckpt`,
    every `AVR_CKPT_SYNC_S` seconds while training runs and once at its end; `restore` brings the
    furthest synced step back to a machine that has none.

    Each attempt syncs under its own name and checks its lease before every upload, so a holder
    paused past its lease can never overwrite or delete the checkpoints of the one that took over."""

    def __init__(self, store: Store, out: Output, name: str, local: Path):
        self.store, self.ref, self.name, self.local, self.sent = store, out.ref, name, local, ""
        self.attempt = out.writer.attempt
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"ckpt-sync:{name}", daemon=True)

    def restore(self) -> int:
        """Download the furthest synced step into a temporary directory, LATEST last, and rename it
        into place: an interrupted restore leaves no `ckpt/LATEST`, so it is redone, never trusted."""
        if (self.local / "LATEST").exists():
            return 0
        best = self._furthest()
        if best is None:
            return 0
        base, tag = best
        tmp = self.local.with_name(f"{self.local.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        files = files_under(self.store.fs, f"{base}/{tag}")
        for p in files:
            local = tmp / tag / p[len(f"{base}/{tag}/"):]
            local.parent.mkdir(parents=True, exist_ok=True)
            self.store.fs.get_file(p, str(local))
        (tmp / "LATEST").write_text(tag)          # the commit point, last
        shutil.rmtree(self.local, ignore_errors=True)
        os.replace(tmp, self.local)
        logger().info("%s: resuming from checkpoint %s synced to the store (%d files)", self.name, tag, len(files))
        return len(files) + 1

    def _furthest(self) -> tuple[str, str] | None:
        """(attempt's ckpt dir, tag) of the highest step any attempt synced, by its LATEST."""
        found = []
        for latest in [p for p in files_under(self.store.fs, self.store.path(".work", self.name))
                       if p.endswith("/ckpt/LATEST")]:
            tag = self.store.fs.cat_file(latest).decode().strip()
            found.append((tag, latest.rsplit("/", 1)[0]))
        if not found:
            return None
        tag, base = max(found, key=lambda t: t[0])     # tags are step-<zero-padded>: order = step order
        return base, tag

    def sync(self) -> None:
        latest = self.local / "LATEST"
        tag = latest.read_text().strip() if latest.exists() else ""
        if not tag or tag == self.sent or not (self.local / tag).is_dir():
            return
        base = (".work", self.name, self.attempt, "ckpt")
        assert_lease(self.store, self.ref)
        self.store.upload(str(self.local / tag), *base, tag)
        assert_lease(self.store, self.ref)
        self.store.fs.pipe_file(self.store.path(*base, "LATEST"), latest.read_bytes())
        note_progress(self.store, self.ref)
        for old in self.store.fs.ls(self.store.path(*base), detail=False):   # only this attempt's own
            if old.rsplit("/", 1)[-1] not in (tag, "LATEST"):
                remove_tree(self.store.fs, old)
        self.sent = tag

    def _loop(self) -> None:
        while not self.stop.wait(float(os.environ.get("AVR_CKPT_SYNC_S", "30"))):
            try:
                self.sync()
            except LeaseLost:
                return
            except Exception as e:   # a step written meanwhile, a network blip: next time
                logger().warning("%s: checkpoint sync failed (%s); retrying", self.name, e)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        if exc[0] is None:
            self.sync()


def _sweep_work(store: Store) -> None:
    """Remove the checkpoints of training runs whose model artifact is finished: a kill while
    the last run removed them would otherwise leave them (a model's size, and more) forever."""
    work = _work_dir(store, "")
    for d in (work.iterdir() if work.is_dir() else []):
        stage_name, _, key = d.name.partition("-")
        if key and d.is_dir() and store.exists(store.ref(stage_name, key)):
            shutil.rmtree(d, ignore_errors=True)
            if store.remote:
                _rm_remote_work(store, d.name)


def free_accelerators(stage_name: str) -> None:
    """Training and the reference model need the GPUs that sampling stages' kept engines
    (`keep_engine: true`) hold. Those engines outlive it: on CUDA they sleep (memory freed, the
    engine kept) and wake with the next policy's weights; on the CPU they stay (host memory);
    anything else is closed (`avr_core.backends.suspend`)."""
    if done := backends.suspend():
        logger().info("%s: engines for the training: %s", stage_name, ", ".join(done))


def _rm_remote_work(store: Store, name: str) -> None:
    if store.remote and store.fs.exists(store.path(".work", name)):
        store.fs.rm(store.path(".work", name), recursive=True)


def run_training(out: Output, cfg, stage_name, base, data: ArtifactRef, rows: list[dict], ref_logps) -> None:
    """Write the rows (and reference log-probs) for the training subprocess, run it, and put the
    exported model into the artifact; its checkpoints go once the manifest is written."""
    store, ref = out.store, out.ref
    free_accelerators(stage_name)
    _sweep_work(store)
    if not rows:
        raise ValueError(f"{stage_name}: no training rows in {data} (see its manifest counts)")
    model_dir = _local_dir(store, ref)
    name = f"{stage_name}-{ref.key}"
    work = _work_dir(store, name)
    work.mkdir(parents=True, exist_ok=True)
    sync = _CkptSync(store, out, name, work / "ckpt") if store.remote else None
    if sync:
        sync.restore()
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = dict(model_path=resolve_model_path(base["path"]), rows=str(work / "rows.jsonl"), cfg=cfg[stage_name],
                out_dir=str(model_dir / "model"), ckpt_dir=str(work / "ckpt"), progress=True)
    if ref_logps is not None:
        (work / "ref_logps.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in store.read_records(ref_logps)))
        spec["ref_logps"] = str(work / "ref_logps.jsonl")
    scale = cfg.get("scale") or {}
    hostfile = scale.get("hostfile") or None     # several nodes: the launcher reads hosts and slots from it
    cmd = launch_command(str(write_spec(work / "spec.json", **spec)), cfg[stage_name]["num_gpus"],
                         hostfile=hostfile, num_nodes=scale.get("num_nodes") or None)
    logger().info("%s: %s", stage_name, " ".join(cmd))
    with sync or contextlib.nullcontext():
        returncode = _run_training(cmd, out, progress_file=work / "ckpt" / "progress.json")
    if returncode != 0:
        raise RuntimeError(f"{stage_name}: training exited with {returncode}; checkpoints kept in "
                           f"{work / 'ckpt'}, a rerun resumes from the last one")
    summary = json.loads((model_dir / "model" / "train_summary.json").read_text())
    if store.remote:   # the model into the artifact, before the skeleton commits its manifest
        n = out.upload(str(model_dir / "model"), "model")
        logger().info("%s: uploaded the model (%d files) to %s", stage_name, n, store.url(ref, "model"))
        out.after.append(lambda: shutil.rmtree(model_dir, ignore_errors=True))
        out.after.append(lambda: _rm_remote_work(store, name))
    out.extra["train"] = summary
    out.counts.update({f"tokenize_{k}": v for k, v in summary.get("tokenize", {}).items()})
    out.after.append(lambda: shutil.rmtree(work, ignore_errors=True))  # checkpoints only resume an unfinished run
    logger().info("%s: trained (steps=%s, final loss=%s)", stage_name, summary.get("steps"), summary.get("final_loss"))


def _run_training(cmd: list[str], out: Output, poll_s: float = 2.0, progress_file: Path | None = None) -> int:
    """Run the training subprocess. While it runs, its CPU time advancing counts as progress for
    the lease (store.stall_s), and a lost lease stops it at once: the process that took over trains
    this model, and two trainings must not race. The steps it reports in `progress_file`
    (avr_core/training/recipe.py) go to the stage's progress artifact."""
    # its stdout (the recipe's JSON summary line, the launcher's chatter) is log, not avr's output:
    # onto this process's stderr (fd 2), so stdout carries the run's report alone
    proc = subprocess.Popen(cmd, env=child_env(dict(os.environ)), stdout=2)
    last_cpu, t0 = -1.0, time.monotonic()
    steps = out.progress_hook("training steps")
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            _report_steps(progress_file, steps)
            state = held_state(out.store, out.ref)
            if state is not None and state.get("lost"):
                logger().error("%s: lease lost (%s): stopping the training subprocess", out.ref, state["lost"])
                _terminate(proc)
                raise LeaseLost(f"{out.ref}: lease lost while training ({state['lost']})")
            cpu = _tree_cpu_s(proc.pid)
            if cpu > last_cpu:
                last_cpu = cpu
                note_progress(out.store, out.ref)
            if time.monotonic() - t0 > 72 * 3600:
                _terminate(proc)
                raise TimeoutError(f"{out.ref}: training ran over 72 h")
    except BaseException:
        _terminate(proc)
        raise
    if proc.returncode == 0:
        _report_steps(progress_file, steps)
    return proc.returncode


def _report_steps(progress_file: Path | None, hook) -> None:
    try:
        reached = json.loads(progress_file.read_text()) if progress_file else None
    except (OSError, ValueError):           # not written yet (loading the model), or being replaced
        return
    if reached:
        hook(reached["step"], reached["of"])


def _tree_cpu_s(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        return sum(sum(q.cpu_times()[:2]) for q in [p, *p.children(recursive=True)])
    except psutil.Error:
        return 0.0


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

