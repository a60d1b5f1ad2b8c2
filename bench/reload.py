"""bench/sampling.py --engine reload: new weights into the running engine vs a fresh engine, side by side.

    .venv/bin/python bench/sampling.py --engine reload                   # ~3 min on 2 quiet CPU cores
    .venv/bin/python bench/sampling.py --engine reload --run-reloads 9   # with a tiny run's own counts

One process, one model size, the `vllm` generator as the `tiny` preset runs it (eager, 1 GiB KV
cache), through the factory the stages use (`avr_core.backends.make_generator`):
- start: a fresh engine on the policy's weights (`VLLMGenerator` built: engine core, weights,
  KV cache; the first start of the process also pays `import vllm` and is not counted);
- reload: the same policy handed to the factory while an engine of the same architecture runs:
  `reload_weights` into it plus a prefix-cache reset (issue 31).
The policy is the seed with noise on two layers (same architecture and tokenizer, other numbers:
a fine-tune's change, in kind). Both are timed `--repeats` times, alternating; each row gives
the median and the range. Then a whole tiny run's engine seconds: before issue 31 every policy
change and every training started engines (`--run-starts-before`, 15 in docs/PERFORMANCE.md "tiny
on the vLLM path"); now a run starts `--run-starts` engines and reloads `--run-reloads` times
(read them off a run's end-of-run table: "starts (s)" and "reloads (s)"). Results:
docs/PERFORMANCE.md.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def perturbed_copy(src: str, dst: Path, scale: float = 0.02) -> str:
    """`src` with Gaussian noise on two layers' weights, saved with its tokenizer: new weights of
    the same architecture (what a training hands the next stage)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers.3." in name or ".layers.7." in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


def _sections(args, path: str) -> tuple[dict, dict]:
    policy = {"path": path, "dtype": args.dtype, "trust_remote_code": False}
    backend = {"kind": "vllm", "tensor_parallel_size": 1, "data_parallel_size": 1, "gpu_memory_utilization": 0.9,
               "max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager,
               "kv_cache_gb": 1, "keep_engine": True}
    return policy, backend


def measure(args, model_dir: str) -> dict:
    """Seconds of each fresh start and each reload, alternating, in this process."""
    from avr_core.backends import builds, clear_cache, make_generator

    with tempfile.TemporaryDirectory() as tmp:
        trained = perturbed_copy(model_dir, Path(tmp) / "trained")
        t = time.perf_counter()
        make_generator(*_sections(args, model_dir))          # imports vllm: not a start we count
        first = round(time.perf_counter() - t, 1)
        starts, reloads, current = [], [], model_dir
        try:
            for _ in range(args.repeats):
                for _ in range(2):                            # back and forth: every call is a policy change
                    current = trained if current == model_dir else model_dir
                    reloads.append(_timed(make_generator, builds, _sections(args, current), "reload"))
                clear_cache()                                 # the engine ends; the same policy starts afresh
                starts.append(_timed(make_generator, builds, _sections(args, current), "start"))
        finally:
            clear_cache()
    return {"first_start_s": first, "starts": starts, "reloads": reloads}


def _timed(make_generator, builds, sections: tuple[dict, dict], event: str) -> float:
    """The factory's own seconds for the one engine event this call must cause."""
    n = len(builds())
    make_generator(*sections)
    got = builds()[n:]
    assert [b["event"] for b in got] == [event], f"expected one {event}, got {got}"
    return got[0]["seconds"]


def report(args, m: dict) -> str:
    start, reload = statistics.median(m["starts"]), statistics.median(m["reloads"])
    before = args.run_starts_before * start
    after = args.run_starts * start + args.run_reloads * reload

    def rng(xs):
        return f"{min(xs):.2f}-{max(xs):.2f}"
    lines = ["| measure | seconds (median) | range | n | ratio |", "|---|---:|---|---:|---:|",
             f"| fresh engine start | {start:.2f} | {rng(m['starts'])} | {len(m['starts'])} | 1.00 |",
             f"| new weights into the running engine | {reload:.2f} | {rng(m['reloads'])} | {len(m['reloads'])} | "
             f"**{start / reload:.1f}x faster** |",
             f"| tiny run's engine seconds, before ({args.run_starts_before} starts) | {before:.0f} | | | 1.00 |",
             f"| tiny run's engine seconds, now ({args.run_starts} starts + {args.run_reloads} reloads) | "
             f"{after:.0f} | | | **{before / after:.1f}x less** |"]
    return "\n".join(lines) + f"\n# first start in the process (import vllm included, not counted): " \
                              f"{m['first_start_s']} s\n"


def main_reload(args, model_dir: str, env: dict, header) -> int:
    header(env, args)
    print(f"# reload: {model_dir}, {args.dtype}, max_model_len={args.max_model_len}, "
          f"{'eager' if args.enforce_eager else 'compiled'}, {args.repeats} repeats")
    print(report(args, measure(args, model_dir)))
    return 0
