"""A run's end releases the engines kept from stage to stage (keep_engine), whatever its outcome."""
from avr_core import backends
from flows.learning_signal import signal_run
from flows.pipeline import pipeline
from run_records.lifecycle import release_all_engines


class FakeKeptEngine:   # control flow only: records its close()
    closed = False

    def close(self):
        self.closed = True


def test_completed_failed_or_crashed_runs_release_kept_engines():
    for f in (pipeline, signal_run):
        for hooks in (f.on_completion_hooks, f.on_failure_hooks, f.on_crashed_hooks):
            assert release_all_engines in hooks
    eng = FakeKeptEngine()
    backends._CACHE["kept"], backends._META["kept"] = eng, {"role": "generator", "keep": True, "gpus": (0,)}
    backends.release()                      # a stage's end keeps it...
    assert not eng.closed
    release_all_engines(None, None, None)   # ...the run's end does not
    assert eng.closed and "kept" not in backends._CACHE


def test_keeping_engines_changes_no_cache_key(tmp_path):
    """Persistence is lifetime, not content: every stage that samples or scores gets the same key
    whether its engine is kept (`keep_engine`) or not; a setting that shapes outputs still counts."""
    from omegaconf import OmegaConf

    from avr_core.config import load_config
    from tasks.synthesis import prompts, respond, rm_score

    def refs(*overrides):
        cfg = OmegaConf.to_container(load_config("tiny", [f"store.root={tmp_path}", *overrides]), resolve=True)
        p = prompts.ref(cfg, "stage1_sft")
        return respond.ref(cfg, cfg["policy"], p), rm_score.ref(cfg, p)

    base = refs("generator.keep_engine=false", "scorer.keep_engine=false")
    assert refs("generator.keep_engine=true", "scorer.keep_engine=true") == base
    assert refs("generator.kv_cache_gb=3")[0] != base[0]            # the check can fail: other keys count
