"""A run's end releases the engines kept from stage to stage (keep_engine), whatever its outcome."""
from avr_core import backends
from flows.pipeline import pipeline
from flows.runs import release_all_engines
from flows.signal import signal


class FakeKeptEngine:   # control flow only: records its close()
    closed = False

    def close(self):
        self.closed = True


def test_completed_failed_or_crashed_runs_release_kept_engines():
    for f in (pipeline, signal):
        for hooks in (f.on_completion_hooks, f.on_failure_hooks, f.on_crashed_hooks):
            assert release_all_engines in hooks
    eng = FakeKeptEngine()
    backends._CACHE["kept"], backends._META["kept"] = eng, {"role": "generator", "keep": True, "gpus": (0,)}
    backends.release()                      # a stage's end keeps it...
    assert not eng.closed
    release_all_engines(None, None, None)   # ...the run's end does not
    assert eng.closed and "kept" not in backends._CACHE
