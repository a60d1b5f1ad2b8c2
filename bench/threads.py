"""Two runs on one machine: torch threads per process, before and after (issue 37).

    .venv/bin/python bench/threads.py                  # ~3 min on 2 CPU cores
    .venv/bin/python bench/threads.py --prompts 16 --tokens 64 --json out.json

Each process does a stage's work: SmolLM2-135M-Instruct (fp32) answers the tiny preset's prompts
with `HFGenerator`, as `respond` does, and times its `generate` alone (loads are untimed; the
processes of a pair start generating together, at a shared start signal). Three settings, in one
run, on the same prompts:

    alone        one process, torch's threads = its cores (the affinity mask)
    two, before  two processes side by side, each with a thread per core: what every process did
    two, after   two processes side by side, each sized by `AVR_THREADS` = cores / 2
                 (avr_core/backends/device.py `size_cpu_threads`, which every run calls)

It prints each setting's slower process and the ratios: before / alone (the cliff), after /
alone, and before / after (what sizing the threads buys).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = """
import json, os, sys, time
from avr_core.backends.device import size_cpu_threads
threads = size_cpu_threads()
from avr_core.backends.base import SamplingParams
from avr_core.backends.hf import HFGenerator
from avr_core.inputs import load_prompts
from avr_core.model_refs import resolve_model_path
start, n, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gen = HFGenerator(resolve_model_path("embedded:smollm2-135m-instruct"), batch_size=8)
convs = [r["messages"] for r in load_prompts("avr_core/data/tiny_prompts.jsonl")][:n]
open(start + "." + str(os.getpid()), "w").close()          # loaded: ready
while not os.path.exists(start):
    time.sleep(0.01)
t = time.perf_counter()
gen.generate(convs, SamplingParams(n=1, temperature=0.0, max_new_tokens=tokens))
print(json.dumps({"threads": threads, "seconds": time.perf_counter() - t, "tokens": gen.stats.tokens_generated}))
"""


def run_side_by_side(count: int, env: dict, prompts: int, tokens: int) -> list[dict]:
    """`count` worker processes, started generating together; each one's result."""
    with tempfile.TemporaryDirectory() as d:
        start = os.path.join(d, "go")
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, start, str(prompts), str(tokens)], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for _ in range(count)]
        while len([f for f in os.listdir(d) if f.startswith("go.")]) < count:
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError("a worker failed to start (run it alone to see why)")
            time.sleep(0.1)
        Path(start).touch()
        return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("AVR_THREADS", "OMP_NUM_THREADS")}
    settings = {"alone": (1, base), "two, before": (2, base),
                "two, after": (2, {**base, "AVR_THREADS": str(max(1, cores // 2))})}
    results = {}
    for name, (count, env) in settings.items():
        results[name] = run_side_by_side(count, {**env, "TQDM_DISABLE": "1"}, args.prompts, args.tokens)
        slow = max(r["seconds"] for r in results[name])
        print(f"{name:12s} threads/process {results[name][0]['threads']}  slowest generate {slow:7.1f} s",
              flush=True)
    slowest = {k: max(r["seconds"] for r in v) for k, v in results.items()}
    print(f"\ncores {cores}; {args.prompts} prompts x {args.tokens} tokens per process\n"
          f"two, before / alone = {slowest['two, before'] / slowest['alone']:.2f}x\n"
          f"two, after  / alone = {slowest['two, after'] / slowest['alone']:.2f}x\n"
          f"two, before / two, after = {slowest['two, before'] / slowest['two, after']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "results": results, "slowest_s": slowest}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
