"""`vllm_judge` scorer: the `judge` scorer's expected rating, read off a vLLM engine.

The same number as `avr_core.backends.hf.JudgeScorer` (tests/system/backends/test_vllm_judge.py): the
caller's judge prompt (`frame`) ends right before the rating digit, the conversation is rendered
here with the model's chat template and cut on the LEFT to `max_length` tokens (the rating
position stays at the end), and the score is sum_k k * p(k) over the tokens "1".."9",
renormalised. vLLM returns the log-probabilities of exactly those nine tokens for the next
position (`logprob_token_ids`), so one prefill per conversation scores it and the engine batches
the whole call. Placement is the `vllm` generator's: one engine in this process on a CPU, a pool
of engine processes over the GPUs (`avr_core.backends.vllm_offline.VLLMGenerator`).

    >>> rm = VLLMJudgeScorer(path, frame=judge_frame, enforce_eager=True)    # doctest: +SKIP
    >>> rm.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])  # doctest: +SKIP
    [5.07]
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from .base import BackendStats, Conversation, ScorerKind, scorer_args
from .vllm_offline import vllm_scorer_args


def expected_rating(logprobs: Sequence[float]) -> float:
    """sum_k k * p(k) for k = 1..len(logprobs), the probabilities renormalised over those tokens.

    >>> round(expected_rating([math.log(0.5), math.log(0.5)]), 3)      # "1" and "2" alike
    1.5
    >>> expected_rating([0.0, float("-inf"), float("-inf")])            # only "1" possible
    1.0
    """
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return sum((k + 1) * w for k, w in enumerate(weights)) / sum(weights)


class VLLMJudgeScorer(ScorerKind):
    """Expected judge rating from vLLM (see the module docstring). `close()` ends its engine(s)."""

    vllm_engines = takes_frame = True

    @classmethod
    def from_config(cls, path, model, scorer, frame=None):
        return cls(path, **vllm_scorer_args(scorer_args(cls, model, scorer, frame), scorer))

    def __init__(self, path: str, dtype: str = "float32", batch_size: int = 8, max_length: int = 4096,
                 trust_remote_code: bool = False, frame: Callable[[Conversation], Conversation] | None = None,
                 device: str = "auto", gpus=(), tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False, kv_cache_gb: float | None = None):
        from .hf import _load_tokenizer
        from .vllm_offline import VLLMGenerator

        self.frame, self.max_length = frame, max_length
        self.tok = _load_tokenizer(path, trust_remote_code)
        self.rating_ids = [self.tok.convert_tokens_to_ids(str(k)) for k in range(1, 10)]
        # max_length + 1: a prompt of max_length tokens still leaves room for the one scored position
        self.engines = VLLMGenerator(path, tensor_parallel_size, data_parallel_size, gpus, device, dtype=dtype,
                                     max_model_len=max_length + 1, trust_remote_code=trust_remote_code,
                                     gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                     kv_cache_gb=kv_cache_gb)
        self.device = self.engines.device

    @property
    def stats(self) -> BackendStats:
        # the pool's one stats object (it outlives the pool), so the final counts stay readable
        return self.engines.stats

    @property
    def closed(self) -> bool:
        """Closed by `close()`, or its engine pool closed underneath it (an engine process died, an
        interrupted read): the factory then builds a new scorer instead of handing out a dead one.
        Asked of the pool directly, not only of the generator, whose own flag only `close()` sets."""
        pool = getattr(self.engines, "pool", None)
        return bool(self.engines.closed) or (pool is not None and pool.closed)

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        """One expected rating per conversation [x, ..., y], framed by `frame`."""
        if self.frame is None:
            raise ValueError("VLLMJudgeScorer has no judge prompt: build it with avr_core.scorers.make_scorer "
                             "(or pass frame=avr_core.scorers.judge_frame)")
        if self.closed:
            raise RuntimeError("this VLLMJudgeScorer is closed (its engine has ended): build a new one "
                               "(avr_core.backends.make_scorer)")
        from .hf import render

        prompts = [self.tok.encode(render(self.tok, self.frame(c)), add_special_tokens=False)[-self.max_length:]
                   for c in conversations]
        if not prompts:
            return []
        if self.asleep:
            self.wake()
        if self.engines.engine is not None:
            rows = self.engines.engine.next_token_logprobs_at(prompts, self.rating_ids)
        else:
            rows = self.engines.pool.call("next_token_logprobs_at", prompts, self.rating_ids)
        return [expected_rating(r) for r in rows]

    @property
    def asleep(self) -> bool:
        return self.engines.asleep

    def sleep(self) -> bool:
        """Its engines sleep while the policy's run on the same GPUs (CUDA; see VLLMGenerator.sleep)."""
        return self.engines.sleep()

    def wake(self) -> None:
        self.engines.wake()

    def close(self) -> None:
        self.engines.close()
