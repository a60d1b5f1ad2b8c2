"""Checkpoints left behind by a kill after a training artifact was finished are swept by the
next training stage; those of an unfinished run (needed to resume) are kept."""
from avr_core.store import Store
from tasks.runtime.supervision import _sweep_work


def test_sweep_removes_only_the_checkpoints_of_finished_artifacts(tmp_path):
    store = Store(str(tmp_path))
    w = store.writer("rsft", "done1", {}, [], "test")
    w.write_file("model/config.json", b"{}")
    w.finalize()
    for name in ("rsft-done1", "cot_sft-running2", "judge_cache"):
        (tmp_path / ".work" / name / "ckpt").mkdir(parents=True)
    _sweep_work(store)
    assert sorted(p.name for p in (tmp_path / ".work").iterdir()) == ["cot_sft-running2", "judge_cache"]
    _sweep_work(Store(str(tmp_path / "empty")))   # no .work yet: nothing to do
