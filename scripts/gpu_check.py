"""The prepared accelerator check (run it through scripts/gpu_check.sh): every model path of a
paper run, on the embedded SmolLM2-135M and a score-head reward model made from it, no hub.

    bash scripts/gpu_check.sh          # NVIDIA GPUs: every visible GPU, <= 8 min
    bash scripts/gpu_check.sh --cpu    # the same steps on CPU (vLLM from .venv-vllm), <= 10 min

Steps, each in its own process (so each one's engines and memory are gone when it ends):
  vllm_sample   the `vllm` generator, one engine per GPU (data_parallel_size 0), a sampling round
  hf_rm         HFRewardScorer on the accelerator
  vllm_rm       the `vllm_rm` scorer (pooling runner), every GPU; scores must match hf_rm's
  ref_logps     reference log-probs of the DPO pairs
  train_dpo     a few DPO steps, DeepSpeed ZeRO-3 (bf16 on GPUs) on every visible GPU (CPU: 2 gloo ranks)
  eval_answer   the trained model answers one AlpacaEval instruction; the local judge rates it
It prints a table (step, device, seconds, tokens/s, peak accelerator memory) and exits 1 if any
step failed. Figures: docs/PERFORMANCE.md "GPU check".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_PROMPTS = {"gpu": 256, "cpu": 8}
NEW_TOKENS = {"gpu": 128, "cpu": 32}
RM_TOL = {"gpu": 2e-2, "cpu": 1e-3}      # fp32 both sides; GPU kernels (TF32, other attention) differ more


def prompts(n: int) -> list[list[dict]]:
    qs = ["Explain photosynthesis briefly.", "What is 17 * 23?", "Name three primary colours.",
          "Write a haiku about rain.", "How do vaccines work?", "Give me a tip for learning Python."]
    return [[{"role": "user", "content": f"{qs[i % len(qs)]} (#{i})"}] for i in range(n)]


def scored_convs(n: int) -> list[list[dict]]:
    answers = ["Sure, here it is.", "I don't know.", "It is 391, since 17 * 23 = 391.", "Red, yellow, blue."]
    return [p + [{"role": "assistant", "content": answers[i % len(answers)]}] for i, p in enumerate(prompts(n))]


def pair_rows(n: int = 8) -> list[dict]:
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"It is {2 * i + 1}, I think, maybe more."}]}
            for i in range(n)]


# -- steps: each runs in its own process and returns its row ------------------------------------
def step_vllm_sample(mode: str, work: Path) -> dict:
    from avr_core.backends.base import SamplingParams
    from avr_core.backends.vllm_offline import VLLMGenerator

    model = json.loads((work / "paths.json").read_text())["policy"]
    t0 = time.time()
    gen = VLLMGenerator(model, tensor_parallel_size=1, data_parallel_size=0, device="auto",
                        dtype="bfloat16" if mode == "gpu" else "float32", max_model_len=1024,
                        gpu_memory_utilization=0.5, enforce_eager=True)
    load_s = time.time() - t0
    t1 = time.time()
    out = gen.generate(prompts(N_PROMPTS[mode]), SamplingParams(n=2, max_new_tokens=NEW_TOKENS[mode], seed=0))
    s = time.time() - t1
    assert all(len(o) == 2 and all(o) for o in out), "empty samples"
    tok = gen.stats.tokens_generated
    gen.close()
    return {"device": gen.device, "seconds": s, "tokens": tok, "load_s": load_s}


def step_hf_rm(mode: str, work: Path) -> dict:
    from avr_core.backends.hf import HFRewardScorer

    rm = json.loads((work / "paths.json").read_text())["rm"]
    sc = HFRewardScorer(rm, dtype="float32", max_length=1024, batch_size=16, device="auto")
    convs = scored_convs(N_PROMPTS[mode])
    t0 = time.time()
    scores = sc.score(convs)
    s = time.time() - t0
    (work / "hf_scores.json").write_text(json.dumps(scores))
    from avr_core.backends.vllm_rm import tokenize_for_rm
    ntok = sum(len(x) for x in tokenize_for_rm(sc.tok, convs, 1024))
    return {"device": sc.device, "seconds": s, "tokens": ntok}


def step_vllm_rm(mode: str, work: Path) -> dict:
    from avr_core.backends.vllm_rm import VLLMRewardScorer, tokenize_for_rm

    rm = json.loads((work / "paths.json").read_text())["rm"]
    t0 = time.time()
    sc = VLLMRewardScorer(rm, dtype="float32", max_length=1024, device="auto", data_parallel_size=0,
                          gpu_memory_utilization=0.5, enforce_eager=True)
    load_s = time.time() - t0
    convs = scored_convs(N_PROMPTS[mode])
    t1 = time.time()
    scores = sc.score(convs)
    s = time.time() - t1
    sc.close()
    hf = json.loads((work / "hf_scores.json").read_text())
    diff = max(abs(a - b) for a, b in zip(scores, hf))
    assert diff <= RM_TOL[mode], f"vllm_rm vs hf_rm: max |diff| {diff:.3g} > {RM_TOL[mode]}"
    ntok = sum(len(x) for x in tokenize_for_rm(sc.tok, convs, 1024))
    return {"device": sc.device, "seconds": s, "tokens": ntok, "load_s": load_s, "max_diff_vs_hf": diff}


def step_ref_logps(mode: str, work: Path) -> dict:
    from transformers import AutoTokenizer

    from avr_core.backends.device import place
    from avr_core.training.data import tokenize_pairs
    from avr_core.training.logps import compute_reference_logps

    model = json.loads((work / "paths.json").read_text())["policy"]
    examples, _ = tokenize_pairs(pair_rows(), AutoTokenizer.from_pretrained(model), 256)
    t0 = time.time()
    rows = compute_reference_logps(model, examples, batch_size=4, dtype="float32", device="auto")
    s = time.time() - t0
    (work / "ref_logps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ntok = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)
    return {"device": place(model, "float32", "auto").label, "seconds": s, "tokens": ntok}


def step_train_dpo(mode: str, work: Path) -> dict:
    import shutil

    from avr_core.backends.device import cuda_count
    from avr_core.training.launch import child_env, launch_command, write_spec

    shutil.rmtree(work / "dpo", ignore_errors=True)      # a rerun in the same --work starts afresh
    model = json.loads((work / "paths.json").read_text())["policy"]
    n = cuda_count() if mode == "gpu" else 2
    steps = 3 if mode == "gpu" else 2
    cfg = dict(loss="dpo", beta=0.1, lr=5e-7, epochs=1, max_steps=steps, micro_batch_size=1, grad_accum=1,
               max_length=256 if mode == "gpu" else 128, zero_stage=3, bf16=mode == "gpu",
               gradient_checkpointing=mode == "gpu",
               checkpoint_every=100, warmup_ratio=0.0)
    spec = write_spec(work / "dpo" / "spec.json", model_path=model, rows=pair_rows(max(8, 2 * n)), cfg=cfg,
                      out_dir=str(work / "dpo" / "model"), ckpt_dir=str(work / "dpo" / "ckpt"),
                      ref_logps=str(work / "ref_logps.jsonl"), progress=False)
    env = {**child_env(), **({"AVR_DS_CPU_SHM": "0"} if mode == "cpu" else {})}
    t0 = time.time()
    p = subprocess.run(launch_command(spec, num_gpus=n), env=env, capture_output=True, text=True, timeout=420)
    s = time.time() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    summary = next(json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"loss"'))
    assert summary["world_size"] == n and summary["steps"] == steps, summary
    return {"device": f"{n} rank(s), {'cuda' if mode == 'gpu' else 'cpu'}, ZeRO-3{' bf16' if cfg['bf16'] else ''}",
            "seconds": s, "tokens": None, "train_s": summary.get("train_s"), "world_size": n}


def step_eval_answer(mode: str, work: Path) -> dict:
    from avr_core.backends.base import SamplingParams
    from avr_core.backends.hf import HFGenerator
    from avr_core.evaluation.judge import local_completions

    model = str(work / "dpo" / "model")
    assert Path(model, "config.json").exists(), "no trained model (train_dpo failed)"
    gen = HFGenerator(model, dtype="float32", batch_size=1, device="auto")
    q = "Give three tips for staying healthy."
    t0 = time.time()
    [[answer]] = gen.generate([[{"role": "user", "content": q}]],
                              SamplingParams(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS[mode]))
    prompt = (f"<|im_start|>user\nWhich answer to '{q}' is better? Output m for (m), M for (M).\n(m) {answer}\n"
              f"(M) Eat vegetables, sleep well, exercise.<|im_end|>")
    verdict = local_completions([prompt], "embedded:smollm2-135m-instruct", device="auto")["completions"][0]
    s = time.time() - t0
    assert answer.strip() and verdict in ("m", "M")
    return {"device": gen.device, "seconds": s, "tokens": gen.stats.tokens_generated, "verdict": verdict}


STEPS = ["vllm_sample", "hf_rm", "vllm_rm", "ref_logps", "train_dpo", "eval_answer"]
VLLM_STEPS = {"vllm_sample", "vllm_rm"}


def run_step(name: str, mode: str, work: Path) -> int:
    """Child process: run one step, write its row (with peak memory of this process) as JSON."""
    import resource

    row = {"step": name}
    try:
        row.update(globals()[f"step_{name}"](mode, work))
        row["ok"] = True
    except BaseException as e:  # noqa: BLE001 -- reported in the table
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-600:]}")
    row["rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    (work / f"{name}.json").write_text(json.dumps(row))
    return 0 if row["ok"] else 1


def _run_group(cmd: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a step in its own process group; past `timeout` the whole group (launcher, ranks,
    engine processes) is killed and the step reports 'timed out'."""
    import signal

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err = (err or "") + f"\ntimed out after {timeout:.0f}s (the check's budget)"
    return subprocess.CompletedProcess(cmd, proc.returncode, out or "", err or "")


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
            except Exception:
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()


def make_models(work: Path) -> dict:
    """The embedded policy's HF directory and a score-head reward model made from it (no hub)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from avr_core.models import resolve_model_path

    policy = resolve_model_path("embedded:smollm2-135m-instruct")
    rm = work / "smollm2-rm"
    if not (rm / "config.json").exists():
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(policy)
        m = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
        m.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        torch.nn.init.normal_(m.score.weight, std=0.05)
        m.save_pretrained(rm)
        tok.save_pretrained(rm)
    paths = {"policy": policy, "rm": str(rm)}
    (work / "paths.json").write_text(json.dumps(paths))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the same steps on CPU")
    ap.add_argument("--work", default=None, help="work directory (default: a fresh temporary one)")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)       # child process: one step
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    mode = "cpu" if args.cpu else "gpu"
    if args.step:
        return run_step(args.step, mode, Path(args.work))

    import tempfile

    from avr_core.backends.device import cuda_count
    from avr_core.backends.vllm_server import vllm_env_python

    if mode == "gpu" and cuda_count() == 0:
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); use --cpu", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="avr-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    if mode == "cpu":
        env.update(AVR_FORCE_NO_CUDA="1", CUDA_VISIBLE_DEVICES="", VLLM_CPU_KVCACHE_SPACE="1")
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    budget = float(os.environ.get("AVR_GPU_CHECK_BUDGET_S", 580 if mode == "cpu" else 460))
    deadline = t0 + budget                 # the table is printed even when the budget runs out
    make_models(work)
    print(f"gpu_check ({mode}): work dir {work}; models ready in {time.time() - t0:.0f}s", flush=True)
    rows = []
    for name in args.steps.split(","):
        py = sys.executable
        if name in VLLM_STEPS and mode == "cpu":
            py = str(vllm_env_python() or "")
            if not py:
                rows.append({"step": name, "ok": False, "error": "no vllm-cpu env (bash scripts/setup_vllm_env.sh)"})
                continue
        step_env = dict(env)
        if py != sys.executable:
            step_env.pop("VIRTUAL_ENV", None)
        ts = time.time()
        left = deadline - ts
        if left < 10:
            rows.append({"step": name, "ok": False, "error": f"not run: the {budget:.0f}s budget is spent"})
            continue
        cmd = [py, __file__, "--step", name, "--work", str(work)] + (["--cpu"] if args.cpu else [])
        with GpuMemPoll(mode == "gpu") as mem:
            p = _run_group(cmd, step_env, work, left)
        f = work / f"{name}.json"
        row = json.loads(f.read_text()) if f.exists() else {
            "step": name, "ok": False, "error": f"exit {p.returncode}: {p.stderr[-600:]}"}
        row["wall_s"] = round(time.time() - ts, 1)
        row["peak_gpu_gib"] = None if mem.peak is None else round(mem.peak, 2)
        rows.append(row)
        print(f"  {name}: {'ok' if row['ok'] else 'FAILED'} in {row['wall_s']}s", flush=True)
        if not row["ok"]:
            (work / f"{name}.log").write_text(p.stdout[-20000:] + p.stderr[-20000:])
    print(table(rows, mode))
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAILED {r['step']}: {r['error']} (log: {work / (r['step'] + '.log')})", file=sys.stderr)
    return 1 if bad else 0


def table(rows: list[dict], mode: str) -> str:
    mem = "peak GPU mem (GiB, all procs)" if mode == "gpu" else "peak RSS (GiB, step proc)"
    lines = [f"| step | device | seconds | tokens/s | {mem} | ok |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s = r.get("seconds")
        tps = f"{r['tokens'] / s:.0f}" if r.get("tokens") and s else "-"
        m = r.get("peak_gpu_gib") if mode == "gpu" else r.get("rss_gib")
        lines.append(f"| {r['step']} | {r.get('device', '-')} | {s:.1f} | {tps} | {m if m is not None else '-'} | "
                     f"{'yes' if r['ok'] else 'NO'} |" if s is not None else
                     f"| {r['step']} | {r.get('device', '-')} | - | - | - | NO |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
