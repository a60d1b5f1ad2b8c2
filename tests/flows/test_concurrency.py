"""Concurrency, with real OS processes against the test harness's Prefect API (issue #7).

The stage here is a FAKE (`fake_slow`): a sharded stage through the real `stage_task` +
`stage` skeleton + store machinery whose work is a slow pure function that logs every call to a
file, so the tests can count who computed what. Control flow only; no model is involved.

1. the same stage and config in two processes at once: one computes, the other waits (and says
   so), then reuses the very same artifact; the store verifies;
2. two configs side by side: neither waits for the other, both artifacts are right;
3. N processes appending to the (append-only) leaderboard at once lose no row;
4. a lock holder killed with SIGKILL mid-stage does not block the next process, which resumes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WAITING = "waiting for another process computing"


# -- the child processes -------------------------------------------------------------------------
def _fake_stage():
    from collections import Counter

    from tasks.runtime import Spec, stage

    def fake_slow_spec(cfg):
        return Spec("fake_slow", {"x": cfg["x"]})

    @stage(fake_slow_spec, retries=0, timeout_s=120)
    def fake_slow(out, cfg: dict):
        fake, d = cfg["fake"], Path(cfg["fake"]["dir"])

        def work(shard, i):
            with open(d / "calls.log", "a") as f:       # O_APPEND: one whole line per call
                f.write(f"{cfg['x']} {os.getpid()} {i}\n")
            if i == 0 and fake["gate"]:
                _wait_for(lambda: fake["gate"](d), f"gate {fake['gate_name']}")
            if i == fake["hang_at"]:
                (d / "hanging").touch()
                time.sleep(600)                          # until the test kills this process
            time.sleep(fake["delay"])
            return {"records": [{"id": r["id"], "y": r["id"] * cfg["x"]} for r in shard]}, Counter()

        out.shards(lambda: [{"id": j} for j in range(8)], 2, work)
    return fake_slow


GATES = {   # what shard 0 of a computing process waits for (the tests' way to force an overlap)
    "go": lambda d: (d / "go").exists(),
    "both_computing": lambda d: len({ln.split()[1] for ln in (d / "calls.log").read_text().splitlines()}) >= 2,
}


def _wait_for(cond, what, timeout=30.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"fake stage: {what} not reached in {timeout} s")
        time.sleep(0.05)


def _child(argv):
    from prefect import flow

    cfg = json.loads(argv[0])
    cfg["fake"]["gate_name"] = cfg["fake"]["gate"]
    cfg["fake"]["gate"] = GATES.get(cfg["fake"]["gate"])
    fake_slow = _fake_stage()

    @flow(name="fake-concurrency")
    def fake_flow():
        return fake_slow(cfg)

    print("RESULT " + json.dumps({"ref": str(fake_flow())}), flush=True)


def _leaderboard_child(root, who, n):
    from avr_core.evaluation import leaderboard as lb
    from avr_core.store import Store

    for i in range(n):
        lb.append(Store(root), [{"run": f"{who}-{i}", "model": who, "artifact": f"eval_judge/{who}{i}",
                                 "lc_kind": "official", "win_rate": 50.0}])


if __name__ == "__main__":
    if sys.argv[1] == "leaderboard":
        _leaderboard_child(*sys.argv[2:4], int(sys.argv[4]))
    else:
        _child(sys.argv[1:])
    sys.exit(0)


# -- the tests -----------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def env(tmp_path):
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "AVR_RETRY_DELAY_S": "0",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


class Child:
    def __init__(self, env, log: Path, *args):
        self.log = log
        self.p = subprocess.Popen([sys.executable, "-m", "tests.flows.test_concurrency", *args], cwd=ROOT, env=env,
                                  stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def result(self, timeout=240) -> str:
        assert self.p.wait(timeout) == 0, self.text()
        return json.loads(self.text().split("RESULT ", 1)[1].splitlines()[0])["ref"]


def cfg(tmp_path, root, x, gate=None, hang_at=-1, lock_timeout_s=0, work=None):
    d = tmp_path / (work or f"work-{x}")
    d.mkdir(exist_ok=True)
    (d / "calls.log").touch()
    return json.dumps({"store": {"root": str(root), "lock_timeout_s": lock_timeout_s}, "x": x,
                       "fake": {"dir": str(d), "gate": gate, "hang_at": hang_at, "delay": 0.05}})


def calls(tmp_path, x) -> list[tuple[int, int]]:
    lines = (tmp_path / f"work-{x}" / "calls.log").read_text().splitlines()
    return [(int(p), int(i)) for _, p, i in (ln.split() for ln in lines)]


def check_artifact(root, ref: str, x: int):
    from avr_core.catalog import verify
    from avr_core.store import Store

    store = Store(str(root))
    stage, key = ref.split("/")
    assert store.read_records(store.ref(stage, key)) == [{"id": j, "y": j * x} for j in range(8)]
    assert verify(store, store.ref(stage, key)) == []
    files = store.manifest(store.ref(stage, key))["files"]
    assert not any("lock" in f for f in files)                  # lock files are no data


@pytest.mark.slow
def test_same_stage_same_config_computes_once_and_the_other_waits_and_reuses(tmp_path, env):
    from avr_core.catalog import verify
    from avr_core.store import Store

    root, c = tmp_path / "store", cfg(tmp_path, tmp_path / "store", 2, gate="go")
    a, b = Child(env, tmp_path / "a.log", c), Child(env, tmp_path / "b.log", c)
    # hold the computing process in shard 0 until the other one says it waits: a real overlap
    pids = lambda: {pid for pid, _ in calls(tmp_path, 2)}  # noqa: E731
    # (up to 240 s: two cold Prefect processes on a loaded 2-core machine; a hang guard, not a speed check)
    # The lock holder may say nothing yet when the other reports its wait (it takes the lock, then
    # reaches shard 0): wait for both facts, or for the failure, never judge in between.
    _wait_for(lambda: (WAITING in a.text() + b.text() and len(pids()) >= 1) or len(pids()) > 1,
              "one process in shard 0 and the other waiting for the lock", 240)
    assert len(pids()) == 1, "both processes are computing the same artifact"
    (tmp_path / "work-2" / "go").touch()
    ra, rb = a.result(), b.result()

    assert ra == rb
    waiter = a if WAITING in a.text() else b
    assert f"{WAITING} {ra}" in waiter.text()
    done = calls(tmp_path, 2)
    assert len({pid for pid, _ in done}) == 1                   # exactly one process computed ...
    assert sorted(i for _, i in done) == [0, 1, 2, 3]           # ... every shard, once
    assert done[0][0] != waiter.p.pid
    check_artifact(root, ra, 2)
    store = Store(str(root))
    assert verify(store) == []                                  # the whole store: no unfinished dir
    assert [str(r) for r in store.list()] == [ra]               # a lock is no artifact ...
    assert list((root / ".locks").iterdir()) == []              # ... and none outlives its stage


@pytest.mark.slow
def test_two_configs_run_side_by_side_without_waiting_for_each_other(tmp_path, env):
    root = tmp_path / "store"
    # both log their work to one file; shard 0 of each waits until both are computing
    c2, c3 = (cfg(tmp_path, root, x, gate="both_computing", work="shared") for x in (2, 3))
    a, b = Child(env, tmp_path / "a.log", c2), Child(env, tmp_path / "b.log", c3)
    ra, rb = a.result(), b.result()                             # each waits in shard 0 for the other

    assert ra != rb
    assert WAITING not in a.text() + b.text()
    check_artifact(root, ra, 2)
    check_artifact(root, rb, 3)


@pytest.mark.slow
def test_concurrent_leaderboard_appends_lose_no_row(tmp_path, env):
    from avr_core.evaluation import leaderboard as lb
    from avr_core.store import Store

    root, n, k = tmp_path / "store", 4, 20       # append-only: one new row file per append, no lock
    kids = [Child(env, tmp_path / f"lb{w}.log", "leaderboard", str(root), f"w{w}", str(k)) for w in range(n)]
    for kid in kids:
        assert kid.p.wait(60) == 0, kid.text()
    rows = lb.read(Store(str(root)))
    assert sorted(r["run"] for r in rows) == sorted(f"w{w}-{i}" for w in range(n) for i in range(k))
    assert len(list((root / "leaderboard" / "rows").glob("*.json"))) == n * k
    lb.append(Store(str(root)), [])          # the views are derived: the next append rewrites them from all rows
    assert len((root / "leaderboard" / "leaderboard.md").read_text().splitlines()) == 2 + n * k


@pytest.mark.slow
def test_a_lock_holder_killed_with_sigkill_does_not_block_the_restart(tmp_path, env):
    root = tmp_path / "store"
    a = Child(env, tmp_path / "a.log", cfg(tmp_path, root, 2, hang_at=2))
    _wait_for(lambda: (tmp_path / "work-2" / "hanging").exists(), "the holder hanging in shard 2", timeout=60)
    os.kill(a.p.pid, signal.SIGKILL)                            # holds the lock, shards 0 and 1 committed
    a.p.wait(10)

    b = Child(env, tmp_path / "b.log", cfg(tmp_path, root, 2, lock_timeout_s=20))
    rb = b.result()
    assert WAITING not in b.text()                              # took the dead holder's lock at once
    done = calls(tmp_path, 2)
    assert [i for pid, i in done if pid == b.p.pid] == [2, 3]   # resumed: committed shards not redone
    check_artifact(root, rb, 2)
    assert list((root / ".locks").iterdir()) == []              # the killed holder's lock file is gone


def test_a_wait_past_the_timeout_fails_cleanly_naming_the_artifact(tmp_path):
    from avr_core.store import ArtifactLockTimeout, Store

    store = Store(str(tmp_path))
    ref = store.ref("critique", "k1")
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from avr_core.store import Store; s = Store(sys.argv[1])\n"
                               "with s.lock(s.ref('critique', 'k1')):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # gives up at its own 0.3 s, while the holder still holds the lock for a minute
        with pytest.raises(ArtifactLockTimeout, match=rf"critique/k1: another process \(pid={holder.pid} .*0.3 s"):
            with store.lock(ref, timeout=0.3):
                pass
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    with store.lock(ref, timeout=5):          # the holder is gone: free again
        with store.lock(ref, timeout=0.1):    # re-entrant within one process
            pass
    assert not Store("memory://avr-test").lockable   # an object store: no lock (module docstring)
