"""EnginePool process hygiene (D3): closing a pool leaves no engine process behind, not even the
grandchildren an engine starts (vLLM's EngineCore, its tensor-parallel workers), whether the
engine stops when asked or has to be killed.

The engine here is a fake (control flow only): it starts a `sleep` grandchild, as vLLM starts its
engine-core process, and either forgets it on close or never gets to close at all."""
from __future__ import annotations

import subprocess
import time

import psutil
import pytest

from avr_core.backends.base import BackendStats, SamplingParams
from avr_core.backends.engine_pool import EnginePool

pytestmark = pytest.mark.slow


class FakeEngineWithGrandchild:
    """An engine that owns a child process (its 'engine core') and does not stop it on close;
    with `hang_on_close` its close never returns (a wedged shutdown)."""

    def __init__(self, hang_on_close: bool = False):
        self.core = subprocess.Popen(["sleep", "600"])
        self.hang_on_close = hang_on_close
        self.stats = BackendStats()
        self.device = "fake"

    def generate_at(self, convs, params, offset):
        return [[str(self.core.pid)] for _ in convs]

    def close(self):
        if self.hang_on_close:
            time.sleep(600)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids, within_s: float = 5.0) -> list[int]:
    end = time.monotonic() + within_s
    while time.monotonic() < end and any(_running(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _running(p)]


@pytest.mark.parametrize("hang", [False, True], ids=["normal-close", "forced-close"])
def test_close_leaves_no_engine_process_or_grandchild(hang):
    pool = EnginePool(f"{__name__}:FakeEngineWithGrandchild", {"hang_on_close": hang}, groups=[[], []])
    workers = list(pool.pids)
    cores = sorted({int(o[0]) for o in pool.call("generate_at", [1, 2], SamplingParams())})
    assert len(cores) == 2 and all(_running(p) for p in workers + cores)
    t0 = time.monotonic()
    pool.close(timeout_s=2)
    took = time.monotonic() - t0
    assert _wait_gone(workers + cores) == []
    assert pool.closed and took < 10, took
    with pytest.raises(RuntimeError, match="closed"):
        pool.call("generate_at", [1], SamplingParams())
    pool.close()                                   # idempotent


def test_engine_left_behind_by_a_dead_parent_stops_itself(tmp_path):
    """The parent is killed outright (no close): its engines and their grandchildren end."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "sys.path[:0] = [sys.argv[1]]\n"
        "from avr_core.backends.engine_pool import EnginePool\n"
        "from avr_core.backends.base import SamplingParams\n"
        "if __name__ == '__main__':\n"
        "    pool = EnginePool('test_engine_pool:FakeEngineWithGrandchild', {}, groups=[[]])\n"
        "    core = pool.call('generate_at', [1], SamplingParams())[0][0]\n"
        "    print(pool.pids[0], core, flush=True)\n"
        "    time.sleep(600)\n")
    import os
    import pathlib
    import sys

    here = str(pathlib.Path(__file__).parent)
    repo = str(pathlib.Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, repo])}
    p = subprocess.Popen([sys.executable, str(script), repo], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker, core = map(int, p.stdout.readline().split())
        assert _running(worker) and _running(core)
        p.kill()
        p.wait()
        assert _wait_gone([worker, core], within_s=10) == []
    finally:
        p.kill()


class FakeSeededEngine:
    """Answers with the seed it was built with (control flow only)."""

    def __init__(self, seed: int = 0):
        self.seed, self.stats, self.device = seed, BackendStats(), "fake"

    def generate_at(self, convs, params, offset):
        return [[str(self.seed)] for _ in convs]


def test_per_engine_kwargs_reach_their_engine():
    pool = EnginePool(f"{__name__}:FakeSeededEngine", {"seed": 5}, groups=[[], []], per_engine=[{"seed": 7}])
    try:
        assert [o[0] for o in pool.call("generate_at", [1, 2], SamplingParams())] == ["7", "5"]
    finally:
        pool.close()
