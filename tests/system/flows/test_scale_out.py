"""Stage shards over many workers (issue 15, docs/SCALING.md "Many machines"): the real `respond`
stage (tasks/synthesis.py) on a local Ray cluster with 2 worker processes (`scale.engine=ray`),
16 prompts in 8 shards. Shards land on both workers; the artifact's key and data files are
byte-identical to the sequential run's; a worker killed with SIGKILL mid-shard costs that shard
once: redone on the restarted worker, nothing lost, nothing committed twice.

The generator is a scripted test double (`ScriptedGen`, control flow only): its answer depends on
the prompt and the call's seed (so a shard computed with the wrong salt would show), it logs every
shard it starts (pid, prompt) to a directory, and on request hangs in one shard until killed. It
reaches the Ray workers the way a real backend does: the stage's recipe (`work` and its unbuilt
`Lazy` generator) is shipped, and the generator is built inside the worker."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
N_PROMPTS, SHARD = 16, 2


class ScriptedGen:
    def __init__(self, log_dir: str, hang_on: str = ""):
        from avr_core.backends.base import BackendStats

        self.log_dir, self.hang_on, self.stats = Path(log_dir), hang_on, BackendStats()

    def generate(self, conversations, params):
        first = conversations[0][-1]["content"]
        (self.log_dir / f"{first}.{os.getpid()}.{time.monotonic_ns()}").touch()   # who started which shard
        if first == self.hang_on and not (self.log_dir.parent / "killed").exists():
            (self.log_dir.parent / f"hanging.{os.getpid()}").touch()
            time.sleep(300)                                # until the test kills this worker
        time.sleep(0.2)
        self.stats.calls += 1
        self.stats.requests += len(conversations)
        out = [[f"answer to {c[-1]['content']} (seed {params.seed})"] for c in conversations]
        self.stats.tokens_generated += sum(len(o[0].split()) for o in out)
        return out


@pytest.fixture(scope="module")
def ray_cluster():
    """ONE local Ray cluster (2 CPUs: 2 worker processes) for the module; starting one takes ~25 s here."""
    from tasks.runtime.ray_workers import ensure_ray, settings

    ray = ensure_ray(settings({"engine": "ray", "workers": 2}))
    yield ray
    ray.shutdown()


def _setup(tmp_path, monkeypatch, name: str, engine: str, hang_on: str = ""):
    from avr_core.config import load_config

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{j:02d}", "prompt": f"q{j:02d}"}) + "\n" for j in range(N_PROMPTS)))
    log = tmp_path / name / "calls"
    log.mkdir(parents=True)
    # replaces the backend factory; Ray ships it (by value, with log and hang_on) inside the recipe
    monkeypatch.setattr("tasks.synthesis.make_generator", lambda policy, backend: ScriptedGen(str(log), hang_on))
    cfg = load_config("tiny", [f"store.root={tmp_path / name / 'store'}", f"data.prompts={prompts}",
                               f"data.stage1_sft=[0,{N_PROMPTS}]", f"shard_size={SHARD}", f"scale.engine={engine}",
                               "scale.workers=2", "respond.use_dataset_answer=false"])
    return cfg, log


def _respond(cfg):
    from prefect import flow

    from tasks.synthesis import prompts, respond

    @flow(name="scale-out-respond")
    def f():
        return respond(cfg, dict(cfg["policy"]), prompts(cfg, "stage1_sft"))
    return f()


def _starts(log: Path) -> list[tuple[str, int]]:
    return [(p.name.split(".")[0], int(p.name.split(".")[1])) for p in log.iterdir()]


def _data(store, ref) -> dict[str, bytes]:
    return {rel: store.fs.cat_file(store.path(ref, rel)) for rel in store.manifest(ref)["files"]}


def test_shards_spread_over_two_ray_workers_byte_identical_to_the_sequential_run(tmp_path, monkeypatch, ray_cluster):
    from avr_core.store import Store

    seq_cfg, _ = _setup(tmp_path, monkeypatch, "seq", "local")
    seq = _respond(seq_cfg)
    cfg, log = _setup(tmp_path, monkeypatch, "ray", "ray")
    ref = _respond(cfg)

    assert ref.key == seq.key                                     # scale.* is no part of the key
    a, b = Store(seq_cfg["store"]["root"]), Store(cfg["store"]["root"])
    assert _data(a, seq) == _data(b, ref)                        # byte-identical data files
    ma, mb = a.manifest(seq), b.manifest(ref)
    assert ma["files"] == mb["files"] and ma["counts"] == mb["counts"] and ma["rows"] == mb["rows"]
    assert mb["shards"] == N_PROMPTS // SHARD == 8
    workers = mb["shard_workers"]                                # which worker computed which shard
    assert sorted(workers) == [f"{i:05d}" for i in range(8)]
    assert len(set(workers.values())) == 2 and all(w.startswith("ray:") for w in workers.values())
    assert sum(mb["workers"].values()) == 8 and len(mb["workers"]) == 2
    assert "shard_workers" not in ma                             # the sequential run's manifest as today
    starts = _starts(log)
    assert len({pid for _, pid in starts}) == 2 and os.getpid() not in {pid for _, pid in starts}
    assert len(starts) == 8                                      # every shard computed exactly once
    _report(shards_per_worker=sorted(mb["workers"].values(), reverse=True), byte_identical=True)


def test_a_worker_killed_mid_shard_costs_that_shard_once(tmp_path, monkeypatch, ray_cluster):
    import threading

    from avr_core.store import Store

    seq_cfg, _ = _setup(tmp_path, monkeypatch, "seq", "local")
    seq = _respond(seq_cfg)
    cfg, log = _setup(tmp_path, monkeypatch, "ray", "ray", hang_on="q10")    # shard 5's first prompt

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            hanging = list(tmp_path.glob("ray/hanging.*"))
            if hanging:
                (tmp_path / "ray" / "killed").touch()
                os.kill(int(hanging[0].name.split(".")[1]), signal.SIGKILL)
                return
            time.sleep(0.05)
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    ref = _respond(cfg)
    t.join(5)
    assert (tmp_path / "ray" / "killed").exists(), "no worker was killed"

    starts = _starts(log)
    per_prompt = {p: sum(1 for q, _ in starts if q == p) for p, _ in starts}
    assert per_prompt.pop("q10") == 2                            # the killed shard: redone once
    assert set(per_prompt.values()) == {1} and len(per_prompt) == 7   # every other shard: once
    a, b = Store(seq_cfg["store"]["root"]), Store(cfg["store"]["root"])
    assert ref.key == seq.key and _data(a, seq) == _data(b, ref)     # nothing lost, nothing duplicated
    assert [r["id"] for r in b.read_records(ref)] == [f"p{j:02d}" for j in range(N_PROMPTS)]
    killed_pid = int(next(tmp_path.glob("ray/hanging.*")).name.split(".")[1])
    redone_by = b.manifest(ref)["shard_workers"]["00005"]       # the restarted worker, a new process
    assert not redone_by.endswith(f":{killed_pid}") and redone_by.startswith("ray:")
    _report(killed_shard_starts=2, other_shard_starts=1)


def _report(**kv):
    """scripts/scale_check.sh reads what these tests measured (AVR_SCALE_REPORT: a JSON file)."""
    path = os.environ.get("AVR_SCALE_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        Path(path).write_text(json.dumps({**old, **kv}))
