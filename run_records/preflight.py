"""The checks of a run before any work: the config against this machine's GPUs, the prompt and eval
files, the prompt slices the run's flow reads, model paths and identities, the store root, the
schedule. `avr run` runs `preflight` before it starts anything; `start_run` runs it again inside
the flow, so a deployment's run is refused the same way."""
from __future__ import annotations

import os
from pathlib import Path

from avr_core.config import ConfigError
from avr_core.iterations import ALL_SLICES, check_slices
from avr_core.model_refs import model_ref_problem
from avr_core.store.probe import probe
from tasks.evaluate import validate_evalset
from tasks.runtime import policy_identity, scorer_identity
from tasks.runtime.keys import served_elsewhere
from tasks.synthesis import validate_prompts

# The prompt slices `data.<split>` each `flow:` reads; a slice a flow never reads is not checked
# (conf/signal.yaml has no stage 2: its stage2 slices are empty on purpose).
SLICES_READ = {"pipeline": ALL_SLICES, "signal": ("stage1_sft", "stage1_po", "heldout")}
# The training sections each `flow:` trains: only those have their `num_gpus` checked against this
# machine's GPUs (flows/learning_signal.py trains stage 1 only, so a stage-2 setting cannot refuse its run).
TRAINED = {"pipeline": ("rsft", "po", "cot_sft", "cot_po"), "signal": ("rsft", "po")}


def check_gpus(cfg: dict, trained: tuple[str, ...]) -> None:
    """Every device setting, `gpus` list, engine layout and training `num_gpus` against this
    machine (avr_core/backends/device.py), and the GPU list the DeepSpeed launcher would get
    (avr_core/training/launch.py): DeviceError with one line naming the key."""
    from avr_core.backends.device import DeviceError, check_devices
    from avr_core.training.launch import launcher_problem

    check_devices(cfg, trained)
    if problem := launcher_problem(cfg, trained):
        raise DeviceError(problem)


def preflight(cfg: dict, slices: tuple | None = None) -> int:
    """The checks of a validated config against this machine, before any work: the prompt and
    eval files (InputError: file, line, field), the prompt slices the run reads (`slices`, default
    those of the config's `flow`: each non-empty and inside the prompt file), the model paths and
    the store root (ConfigError: the key), and what each model given by name is
    (`check_identities`). Returns the number of prompts. No model is loaded, nothing is written
    (but the embedded model's one-off conversion). First, the GPUs: every device setting, `gpus`
    list, vLLM engine layout and training `num_gpus` against the CUDA devices visible here, so a
    count this node does not have fails now, not at the first training hours in."""
    from avr_core.backends.device import DeviceError

    try:   # e.g. scorer.device=cuda without CUDA, po.num_gpus=8 on one GPU
        check_gpus(cfg, TRAINED[cfg["flow"]])
    except DeviceError as e:
        raise ConfigError(str(e)) from None
    n = validate_prompts(cfg)                          # hf://: loads the dataset (or its cache), so n is known
    # iteration 0 here; flows/iterations.py checks the later ones (their slices move)
    if slices is None:
        extra = cfg["flow"] == "signal" and bool(cfg["data"].get("heldout_extra"))   # read by flows/learning_signal.py
        slices = SLICES_READ[cfg["flow"]] + (("heldout_extra",) if extra else ())
    check_slices(cfg["data"], n, range(1), 0, slices,
                 cfg["data"]["prompts"])
    validate_evalset(cfg)
    models = [("scorer.model.path", cfg["scorer"]["model"]["path"])]
    if not served_elsewhere(cfg["generator"]):        # there, the path may be the server's model name
        models.insert(0, ("policy.path", cfg["policy"]["path"]))
    if cfg["eval"]["judge"]["kind"] == "local":
        models.append(("eval.judge.local_model", cfg["eval"]["judge"]["local_model"]))
    for key, ref in models:
        if problem := model_ref_problem(ref):
            raise ConfigError(f"key '{key}': {problem} (got {ref!r})")
    _check_store_root(cfg["store"]["root"])
    check_schedule(cfg)
    check_identities(cfg)                              # last: it may convert the embedded model (seconds, once)
    return n


def check_identities(cfg: dict) -> None:
    """Resolve the revision or content digest of every model given by name, as the stages' keys
    will (avr_core/identity.py): an offline hub without the snapshot fails the run here, in one
    line, and each identity is computed once for the run (memoised; `start_run` forgets the last
    run's). The embedded model is converted here on its first use on this machine."""
    from avr_core.identity import IdentityError

    for key, keyed in (("policy.path", lambda: policy_identity(cfg["policy"], cfg["generator"])),
                       ("scorer.model.path", lambda: scorer_identity(cfg["scorer"]))):
        try:
            keyed()
        except IdentityError as e:
            raise ConfigError(f"key '{key}': {e}") from None


def check_schedule(cfg: dict) -> None:
    """`schedule.cron` and `schedule.timezone` as Prefect's scheduler will parse them."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    s = cfg["schedule"]
    try:
        CronSchedule(cron=s["cron"], timezone=s["timezone"])
    except ValidationError as e:
        err = e.errors()[0]
        key = "schedule.timezone" if "timezone" in err["msg"] else "schedule.cron"
        raise ConfigError(f"key '{key}': {err['msg'].removeprefix('Value error, ')}") from None


def _check_store_root(root: str) -> None:
    """A local store root must be (or be creatable as) a writable directory; an object store must
    take a write within seconds (avr_core/store/probe.py)."""
    if "://" in root and not root.startswith("file://"):
        if problem := probe(root):
            raise ConfigError(f"key 'store.root': {problem}")
        return
    p = Path(root.removeprefix("file://")).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"key 'store.root': not a directory (got {root!r})")
    up = p
    while not up.exists():
        up = up.parent
    if not up.is_dir():
        raise ConfigError(f"key 'store.root': {str(up)!r} is a file, not a directory (got {root!r})")
    if not os.access(up, os.W_OK | os.X_OK):
        raise ConfigError(f"key 'store.root': {str(up)!r} is not writable (got {root!r})")
