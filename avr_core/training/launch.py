"""Run a training spec as its own process(es): the CLI the `deepspeed` launcher starts.

A spec is a JSON file naming everything `train()` takes, data by path:

    {"model_path": "/store/sft/KEY/model", "rows": "/store/pairs/KEY/pairs.jsonl",
     "cfg": {"loss": "dpo", "lr": 5e-7, "zero_stage": 3, "bf16": true},
     "out_dir": "/store/po/KEY/model", "ckpt_dir": "/store/po/KEY/ckpt",
     "ref_logps": "/store/ref/KEY/ref_logps.jsonl", "progress": true}

    subprocess.run(launch_command("spec.json", num_gpus=8), env=child_env(), check=True)

runs `deepspeed --num_gpus 8 ... --module avr_core.training --spec spec.json` (one process per
GPU); with num_gpus <= 1 it is plain `python -m avr_core.training --spec spec.json`. Rank 0
prints the summary as the last line of stdout (also in `out_dir/train_summary.json`).
A subprocess keeps distributed state out of the caller and can be killed and resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from avr_core.training.dist import child_env, free_port  # noqa: F401  (child_env is API)

SPEC_KEYS = {"model_path", "rows", "cfg", "out_dir", "ckpt_dir", "ref_logps", "progress", "keep_last"}


def launch_command(spec_path: str, num_gpus: int, master_port: int | None = None,
                   hostfile: str | None = None, num_nodes: int | None = None,
                   visible: str | None = None) -> list[str]:
    """The command that runs one training spec.

    >>> launch_command("/runs/po/spec.json", 8, master_port=29600, visible="")[1:]  # doctest: +NORMALIZE_WHITESPACE
    ['--num_gpus', '8', '--master_addr', '127.0.0.1', '--master_port', '29600', '--module', 'avr_core.training',
     '--spec', '/runs/po/spec.json']
    >>> launch_command("/runs/po/spec.json", 0)[1:]      # one process (CPU or one GPU): no launcher
    ['-m', 'avr_core.training', '--spec', '/runs/po/spec.json']

    With a hostfile (several nodes) the launcher takes hosts and slots from it, and `num_nodes`
    of them (`scale.hostfile`, `scale.num_nodes`); rank 0's node is the first host, and every
    node must reach it on `master_port`:

    >>> launch_command("/s.json", 0, master_port=29600, hostfile="/etc/avr/hostfile", num_nodes=4)[1:6]
    ['--hostfile', '/etc/avr/hostfile', '--num_nodes', '4', '--master_port']

    The launcher is the `deepspeed` script beside this interpreter (a venv need not be on PATH).
    `visible` is the caller's CUDA_VISIBLE_DEVICES (default: this process's); see `gpu_selection`.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if num_gpus <= 1 and hostfile is None:
        return [sys.executable, "-m", "avr_core.training", "--spec", str(spec_path)]
    script = Path(sys.executable).with_name("deepspeed")
    cmd = [str(script) if script.exists() else "deepspeed"]
    if hostfile is None:
        cmd += gpu_selection(num_gpus, visible) + ["--master_addr", "127.0.0.1"]
    else:
        cmd += ["--hostfile", hostfile] + (["--num_nodes", str(num_nodes)] if num_nodes else [])
        hosts = _hosts(hostfile)
        if len(hosts) == 1:   # one node: the launcher starts it locally; no ssh probe, no `ssh host hostname -I`
            cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1"]
        elif hosts:           # rank 0 runs on the first host: every node must resolve and reach that name
            cmd += ["--master_addr", hosts[0]]
    return cmd + ["--master_port", str(master_port or free_port()),
                  "--module", "avr_core.training", "--spec", str(spec_path)]


def gpu_selection(num_gpus: int, visible: str | None) -> list[str]:
    """The launcher's GPU arguments. `--num_gpus N` makes DeepSpeed DROP the caller's
    CUDA_VISIBLE_DEVICES and use GPUs 0..N-1 of the node (launcher/runner.py: "ignoring it
    because ... --num_gpus ... were used"). A caller restricted to some GPUs (a Slurm slice, a
    worker pinned to GPUs 4-7, a Ray actor, a run beside a kept engine) must train on THOSE, so
    its first N visible ids are named with `--include`:

    >>> gpu_selection(2, None), gpu_selection(2, "4,5,6,7"), gpu_selection(2, "")
    (['--num_gpus', '2'], ['--include', 'localhost:4,5'], ['--num_gpus', '2'])
    """
    ids = [i.strip() for i in (visible or "").split(",") if i.strip()]
    if not ids:
        return ["--num_gpus", str(num_gpus)]
    if not all(i.isdigit() for i in ids):
        raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r}: the DeepSpeed launcher takes GPU indices, not "
                         f"UUIDs or MIG names; set it to indices (e.g. 4,5,6,7)")
    if num_gpus > len(ids):
        raise ValueError(f"training asks for {num_gpus} GPUs but CUDA_VISIBLE_DEVICES={visible!r} allows {len(ids)}")
    return ["--include", "localhost:" + ",".join(ids[:num_gpus])]


def _hosts(hostfile: str) -> list[str]:
    """The host names of a DeepSpeed hostfile (`host slots=N` per line, `#` comments)."""
    try:
        lines = Path(hostfile).read_text().splitlines()
    except OSError:
        return []
    return [ln.split()[0] for ln in (x.split("#", 1)[0].strip() for x in lines) if ln]


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
    return rows


def write_spec(path: str | Path, **spec) -> Path:
    """Write a spec file (keys as in the module docstring); returns its path."""
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown spec keys {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    return path


def run_spec(spec_path: str | Path) -> dict:
    """Load a spec and call `train` in this process (what each launched process does)."""
    from avr_core.training.logps import ref_logps_by_id
    from avr_core.training.recipe import train

    spec = json.loads(Path(spec_path).read_text())
    missing = {"model_path", "rows", "cfg", "out_dir", "ckpt_dir"} - set(spec)
    unknown = set(spec) - SPEC_KEYS
    if missing or unknown:
        raise ValueError(f"{spec_path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    rows = spec["rows"] if isinstance(spec["rows"], list) else read_jsonl(spec["rows"])
    ref = spec.get("ref_logps")
    if isinstance(ref, str):
        ref = ref_logps_by_id(read_jsonl(ref))
    elif isinstance(ref, list):
        ref = ref_logps_by_id(ref)
    return train(spec["model_path"], rows, spec["cfg"], spec["out_dir"], spec["ckpt_dir"],
                 ref_logps=ref, progress=spec.get("progress", True), keep_last=spec.get("keep_last", 2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avr_core.training", description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="training spec JSON")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = ap.parse_args(argv)
    summary = run_spec(args.spec)
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary), flush=True)
    return 0


def launcher_problem(cfg: dict, trained: tuple[str, ...]) -> str | None:
    """What the DeepSpeed launcher would refuse in the CUDA_VISIBLE_DEVICES it is given (UUIDs or
    MIG names: it takes indices), hours in, at the first training; one line naming the key, or
    None. Only for sections that start the launcher (`num_gpus > 1`) on a CUDA machine."""
    from avr_core.backends.device import cuda_count

    over_one = {t: int((cfg.get(t) or {}).get("num_gpus") or 0) for t in trained}
    over_one = {t: k for t, k in over_one.items() if k > 1}
    if not over_one or (cfg.get("scale") or {}).get("hostfile") or cuda_count() == 0:
        return None
    for t, k in over_one.items():
        try:
            gpu_selection(k, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except ValueError as e:
            return f"key '{t}.num_gpus': {e}"
    return None
