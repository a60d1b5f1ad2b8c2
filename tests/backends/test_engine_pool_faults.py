"""EnginePool under faults (review F1-F3): exact counters, no stale or unread replies after an
engine error or an interrupted read, a dead engine seen by its wrappers, `broadcast`, and a
failed stage that releases its kept engines.

Everything runs on the real `EnginePool`, with the fake engines below inside real engine
processes (control flow only: they echo their input and count like `VLLMEngine`)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from avr_core import backends
from avr_core.backends.base import BackendStats, BackendUnavailable, SamplingParams
from avr_core.backends.engine_pool import EnginePool

pytestmark = pytest.mark.slow

FAKE = f"{__name__}:FakeEchoEngine"
P = SamplingParams()


class FakeEchoEngine:
    """Answers each conversation with itself and counts like `VLLMEngine` (cumulative, in place).
    A chunk holding "BAD" raises (an engine error: EngineDeadError, CUDA OOM), "DIE" ends the
    process (an OOM kill), "SLOW" takes longer than any test waits. `mark` is for `broadcast`."""

    def __init__(self, fail_mark: bool = False):
        self.stats, self.device, self.fail_mark = BackendStats(), "fake", fail_mark

    def generate_at(self, convs, params, offset=0):
        if "DIE" in convs:
            os._exit(1)
        self.stats.calls += 1
        self.stats.requests += len(convs)
        if "BAD" in convs:
            raise RuntimeError("engine error")
        if "SLOW" in convs:
            time.sleep(60)
        self.stats.samples += len(convs)
        self.stats.tokens_generated += 10 * len(convs)
        return [[c] for c in convs]

    def mark(self, tag):
        self.stats.calls += 1
        if self.fail_mark and tag == "fail":
            raise RuntimeError("cannot mark")
        return f"{os.getpid()}:{tag}"


class PoolGenerator:
    """The pooled `VLLMGenerator`'s shape without vLLM: what `tasks.runtime.Backend` and
    `VLLMJudgeScorer` use of it."""

    def __init__(self, pool):
        self.pool, self.engine, self.closed = pool, None, False

    @property
    def stats(self):
        return self.pool.stats

    def generate(self, convs, params):
        return self.pool.call("generate_at", list(convs), params)

    def close(self):
        self.closed = True
        self.pool.close()


@pytest.fixture
def pool3():
    pool = EnginePool(FAKE, {}, groups=[[], [], []])
    yield pool
    pool.close()


def _gone(procs) -> bool:
    return all(not p.is_alive() for p in procs)


# -- F1: counters ------------------------------------------------------------------------------
def test_counts_are_exact_per_shard_and_per_stage():
    """What Output.shards commits: per-shard deltas of Backend.stats(), here over two stages
    sharing one kept engine pool (a new Backend per stage), with uneven shards (one engine idle)."""
    from tasks.runtime import Backend

    pool = EnginePool(FAKE, {}, groups=[[], []])
    try:
        g, conv = PoolGenerator(pool), [{"role": "user", "content": "q"}]
        stats_object = g.stats
        for sizes in ([10, 10, 3, 1], [5, 7]):
            gen = Backend(lambda: g)
            first = gen.stats()
            shards = []
            for n in sizes:
                before = gen.stats()
                assert gen.generate([conv] * n, P) == [[conv]] * n
                after = gen.stats()
                shards.append({k: after[k] - before.get(k, 0) for k in ("calls", "requests", "samples",
                                                                        "tokens_generated")})
            assert shards == [{"calls": min(n, 2), "requests": n, "samples": n, "tokens_generated": 10 * n}
                              for n in sizes]
            assert gen.stats()["samples"] - first["samples"] == sum(sizes)
        assert g.stats is stats_object and pool.stats.samples == 36 and pool.stats.calls == 11
    finally:
        pool.close()


# -- F2: unread replies --------------------------------------------------------------------------
def test_after_an_engine_error_the_next_call_gets_its_own_answers(pool3):
    with pytest.raises(RuntimeError, match=r"engine process 1 .*engine error"):
        pool3.call("generate_at", ["a1", "BAD", "a3"], P)
    assert not pool3.closed                                  # drained: the pool stays usable
    assert pool3.stats.requests == 3 and pool3.stats.samples == 2   # the failed engine's count too
    assert pool3.call("generate_at", ["b1", "b2", "b3"], P) == [["b1"], ["b2"], ["b3"]]
    assert pool3.call("generate_at", ["c1", "c2", "c3"], P) == [["c1"], ["c2"], ["c3"]]
    assert pool3.stats.requests == 9 and pool3.stats.samples == 8


def test_large_replies_after_an_error_do_not_deadlock():
    """4 MB chunks (real rounds): an unread reply blocks its engine in `send`, and the next call
    would block in ours. Run in a thread, so a regression fails here instead of hanging."""
    pool = EnginePool(FAKE, {}, groups=[[], []])
    procs = list(pool.procs)
    big = "x" * 4_000_000
    try:
        with pytest.raises(RuntimeError, match="engine error"):
            pool.call("generate_at", ["BAD", big], P)
        done: list = []
        t = threading.Thread(target=lambda: done.append(pool.call("generate_at", [big, big + "y"], P)), daemon=True)
        t.start()
        t.join(60)
        if t.is_alive():
            for p in procs:                                  # unwedge the thread's pool, then fail
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("the call after an error with 4 MB replies did not return (deadlock)")
        assert [len(o[0]) for o in done[0]] == [4_000_000, 4_000_001]
    finally:
        pool.close()


def test_an_engine_that_does_not_drain_closes_the_pool():
    pool = EnginePool(FAKE, {}, groups=[[], []], drain_timeout_s=0.5)
    procs = list(pool.procs)
    with pytest.raises(RuntimeError, match=r"engine error; engine\(s\) \[1\] did not reply"):
        pool.call("generate_at", ["BAD", "SLOW"], P)
    assert pool.closed and _gone(procs)


def test_an_interrupted_read_closes_the_pool_never_stale(pool3):
    """A KeyboardInterrupt inside one engine's `recv`: its reply is unread, so the pool closes."""
    procs = list(pool3.procs)
    conn = pool3.conns[1]
    real = conn.recv

    def interrupted():
        conn.recv = real
        raise KeyboardInterrupt

    conn.recv = interrupted
    with pytest.raises(KeyboardInterrupt):
        pool3.call("generate_at", ["a1", "a2", "a3"], P)
    assert pool3.closed and _gone(procs)
    with pytest.raises(RuntimeError, match="closed"):
        pool3.call("generate_at", ["b1", "b2", "b3"], P)


def test_a_timeout_signal_during_a_slow_round_closes_the_pool():
    """A stage timeout fired while the pool waits (a signal handler raising): same discipline."""
    pool = EnginePool(FAKE, {}, groups=[[], []])
    procs = list(pool.procs)

    def on_alarm(*_):
        raise TimeoutError("stage timeout")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(TimeoutError):
            pool.call("generate_at", ["a", "SLOW"], P)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert pool.closed and _gone(procs)                     # the SLOW engine was killed, not awaited


def test_replies_owed_from_an_earlier_call_close_the_pool(pool3):
    """If anything is outstanding when a call starts, its answers cannot be told apart: refuse."""
    pool3.conns[0].send((99, "generate_at", (["old"], P, 0)))   # a send whose reply nobody read
    pool3._pending.add(0)
    with pytest.raises(RuntimeError, match=r"engine pool closed: engine\(s\) \[0\] still owed replies"):
        pool3.call("generate_at", ["new"], P)
    assert pool3.closed


# -- F3: dead engines ----------------------------------------------------------------------------
def test_a_dead_engine_closes_the_pool_and_its_wrappers_say_so():
    from avr_core.backends.vllm_judge import VLLMJudgeScorer
    from avr_core.backends.vllm_rm import VLLMRewardScorer

    pool = EnginePool(FAKE, {}, groups=[[], []])
    procs = list(pool.procs)
    rm = VLLMRewardScorer.__new__(VLLMRewardScorer)
    rm.pool, rm.engine, rm.base_url, rm.stats = pool, None, "", BackendStats()
    judge = VLLMJudgeScorer.__new__(VLLMJudgeScorer)
    judge.engines, judge.frame = PoolGenerator(pool), (lambda c: c)
    try:
        assert pool.call("generate_at", ["a", "b"], P) == [["a"], ["b"]]
        assert not rm.closed and not judge.closed
        with pytest.raises(BackendUnavailable, match=r"engine process 1 .* died"):
            pool.call("generate_at", ["DIE"], P)            # one prompt: only engine 1 gets a chunk
        assert pool.closed and _gone(procs)
        assert rm.closed and judge.closed                    # the factory rebuilds them now
        assert judge.stats.requests == 2 and judge.stats.samples == 2   # final counts stay readable
        for wrapper in (rm, judge):
            with pytest.raises(RuntimeError, match="is closed"):
                wrapper.score([[{"role": "user", "content": "q"}]])
    finally:
        rm.close()
        judge.close()


# -- broadcast -----------------------------------------------------------------------------------
def test_broadcast_reaches_every_engine_and_counts():
    pool = EnginePool(FAKE, {}, groups=[[], [], []], per_engine=[{}, {"fail_mark": True}])
    try:
        out = pool.broadcast("mark", "w1")
        assert [o.split(":")[1] for o in out] == ["w1"] * 3
        assert [int(o.split(":")[0]) for o in out] == pool.pids     # one result per engine, in order
        assert pool.stats.calls == 3
        with pytest.raises(RuntimeError, match=r"engine process 1 .*cannot mark"):
            pool.broadcast("mark", "fail")
        assert not pool.closed and pool.stats.calls == 6            # drained, counted
        assert [o.split(":")[1] for o in pool.broadcast("mark", "w2")] == ["w2"] * 3
        assert pool.call("generate_at", ["a", "b", "c"], P) == [["a"], ["b"], ["c"]]
        assert pool.stats.calls == 12
    finally:
        pool.close()


# -- a failed stage releases kept engines ----------------------------------------------------------
class FakeKeptEngine:
    """A cached backend whose section says keep_engine: records its close()."""

    closed = False

    def close(self):
        self.closed = True


def _keep(key: str) -> FakeKeptEngine:
    eng = FakeKeptEngine()
    backends._CACHE[key], backends._META[key] = eng, {"role": "generator", "keep": True, "gpus": ()}
    return eng


def test_a_failed_stage_releases_its_kept_engines(tmp_path, monkeypatch, caplog):
    import tasks.runtime.skeleton as common
    from tasks.runtime import Spec, stage

    monkeypatch.setattr(common, "publish_stage", lambda *a, **k: None)   # no Prefect API needed
    backends.clear_cache()

    @stage(lambda cfg: Spec("fake_ok", {}), retries=0)
    def fake_ok(out, cfg: dict):
        held.append(_keep("kept"))
        out.commit({"records": [{"id": 1}]})

    @stage(lambda cfg: Spec("fake_fail", {}), retries=0)
    def fake_fail(out, cfg: dict):
        held.append(_keep("kept"))
        raise RuntimeError("boom")

    held: list = []
    try:
        fake_ok.fn({"store": {"root": str(tmp_path)}})
        assert not held[0].closed and "kept" in backends._CACHE      # a stage that succeeds keeps it
        with caplog.at_level("WARNING", logger="avr"), pytest.raises(RuntimeError, match="boom"):
            fake_fail.fn({"store": {"root": str(tmp_path)}})
        assert held[1].closed and "kept" not in backends._CACHE      # a failed one does not
        assert any("kept ones included" in r.getMessage() for r in caplog.records)
    finally:
        backends.clear_cache()
