"""Issue 37: the training subprocess's stdout (the recipe's JSON summary line) is log, not avr's
output: it reaches stderr, so `avr run`'s stdout carries the run's report alone."""
import sys

from avr_core.store import Store
from tasks.runtime.supervision import _run_training


class FakeOutput:
    """Just what `_run_training` reads of a stage's Output (control flow only): the store, the
    artifact and a progress hook."""

    def __init__(self, root: str):
        self.store = Store(root)
        self.ref = self.store.ref("train_sft", "0123456789abcdef")

    def progress_hook(self, what: str):
        return lambda done, total: None


def test_the_training_subprocess_prints_on_stderr_not_stdout(tmp_path, capfd):
    cmd = [sys.executable, "-c", "import json; print(json.dumps({'loss': 'sft', 'steps': 1}))"]
    assert _run_training(cmd, FakeOutput(str(tmp_path)), poll_s=0.05) == 0
    out, err = capfd.readouterr()
    assert '"loss": "sft"' in err and '"loss"' not in out
