"""`openai` backend: any OpenAI-compatible chat server (`vllm` API server, a hosted API).

One `generate` call is one round: every conversation becomes one `/chat/completions`
request asking for `n` samples, and all requests are in flight together (bounded by
`concurrency`), so the server can batch them and share prefixes.

Request sent for conversation i (worked example, `SamplingParams(n=2, seed=0)`, i=3)::

    POST {base_url}/chat/completions
    {"model": "smollm2", "messages": [{"role": "user", "content": "2+2?"}],
     "n": 2, "temperature": 0.7, "top_p": 0.8, "max_tokens": 256, "seed": 6}

A conversation ending with an assistant message is continued, not answered (vLLM's chat
extension; other servers ignore the two extra fields)::

    {"messages": [..., {"role": "assistant", "content": "Rating: [["}],
     "continue_final_message": true, "add_generation_prompt": false, ...}

Response read: ``choices[*].message.content`` ordered by ``choices[*].index`` and
``usage.completion_tokens`` -> ``["4", "Four."]`` for that conversation.

Failure policy: 5xx, 429 (honouring Retry-After), 408, timeouts, connection errors,
malformed or truncated JSON, missing or empty content are retried with exponential backoff
and jitter (each retry counted in ``stats.retries``); other 4xx (bad request, context too
long) are permanent. A request that fails for good yields ``[]`` and is counted in
``stats.failed_requests``; the round goes on.

Server down: a request whose retries ran out on a connection error, timeout or 5xx asks
``GET /models`` whether the server is up. If it answers, the failure was that request's
own (dropped and counted as above). If not, the server is down and the request keeps
waiting for it instead of being dropped (once it is back, the request's retries start
afresh). Once no chat request has had any answer but 5xx (or none at all) for
``down_budget_s``, `generate` raises `BackendUnavailable` naming the URL and how long,
abandoning the round: a down server never turns a round into empty samples. The next
`generate` checks the server again before sending anything.
The API key is read from the environment and is never logged or put in an exception.
"""
from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Sequence

import httpx
from tqdm.auto import tqdm

from avr_core.redact import register_env

from .base import BackendKind, BackendStats, BackendUnavailable, Conversation, SamplingParams, inert_control_tokens

log = logging.getLogger(__name__)

# A retry caused by the *content* (empty / wrong number of samples) re-sends with a shifted
# seed: the same seed would reproduce the same bad sample. The stride keeps retry seeds
# clear of the per-conversation seeds of any round of fewer than a million samples.
_RETRY_SEED_STRIDE = 1 << 20
_MAX_RETRY_AFTER_S = 600.0


class _Retryable(Exception):
    """One attempt failed in a way worth retrying; `delay_s` overrides the backoff."""

    def __init__(self, reason: str, delay_s: float | None = None, bad_content: bool = False,
                 no_answer: bool = False):
        super().__init__(reason)
        self.delay_s = delay_s
        self.bad_content = bad_content
        self.no_answer = no_answer   # no answer but 5xx (or none): maybe the server is down


class _Permanent(Exception):
    """One attempt failed in a way a retry cannot fix (e.g. 400: prompt too long)."""


class OpenAIGenerator(BackendKind):
    """Generator over an OpenAI-compatible `/chat/completions` endpoint.

    >>> gen = OpenAIGenerator("http://127.0.0.1:8000/v1", "smollm2")   # doctest: +SKIP
    >>> gen.generate([[{"role": "user", "content": "2+2?"}]], SamplingParams(n=2))  # doctest: +SKIP
    [['4', 'The answer is 4.']]
    """

    required = {"base_url": ""}     # the server to ask: there is no model here

    @classmethod
    def served_elsewhere(cls, section: dict) -> bool:
        return True

    @classmethod
    def from_config(cls, path, model, backend, frame=None):
        """`path`: the policy's name, the server's model unless `served_model` names another."""
        return cls(base_url=backend["base_url"], model=backend["served_model"] or path,
                   api_key_env=backend["api_key_env"], concurrency=backend["concurrency"],
                   timeout_s=backend["timeout_s"], max_retries=backend["max_retries"],
                   down_budget_s=backend["down_budget_s"])

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 16, timeout_s: float = 120.0, max_retries: int = 4,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0, down_budget_s: float = 300.0,
                 progress: bool | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        register_env(api_key_env)    # its value is masked in every log line (avr_core/redact.py)
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.down_budget_s = float(down_budget_s)
        self._down_since: float | None = None   # monotonic time of the first no-answer since the last answer
        # tqdm's disable=None hides the bar when stderr is not a terminal (CI, Prefect workers).
        self._bar_disable = None if progress is None else not progress
        self.stats = BackendStats()
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._checked = False
        # Kept private and out of __repr__; servers like vLLM accept any key ("EMPTY").
        api_key = os.environ.get(api_key_env) or "EMPTY"
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=self.concurrency,
                                max_keepalive_connections=self.concurrency),
        )

    def __repr__(self) -> str:
        return f"OpenAIGenerator(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "OpenAIGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reachability -----------------------------------------------------------------

    def check(self) -> None:
        """GET {base_url}/models once; raise BackendUnavailable if nobody answers there."""
        url = f"{self.base_url}/models"
        hint = ("start an OpenAI-compatible server there (e.g. `avr_core.backends.vllm_server."
                "serve_vllm`, or `python -m vllm.entrypoints.openai.api_server`) or fix the "
                "backend's base_url")
        try:
            r = self._client.get(url, timeout=min(10.0, self._client.timeout.read or 10.0))
        except httpx.HTTPError as e:
            raise BackendUnavailable(f"no OpenAI-compatible server at {url} "
                                     f"({type(e).__name__}: {e}); {hint}") from None
        if r.status_code in (401, 403):
            raise BackendUnavailable(f"{url} refused the API key (HTTP {r.status_code}); "
                                     f"set ${self.api_key_env} to a valid key")
        if r.status_code >= 500:
            raise BackendUnavailable(f"server at {url} answers HTTP {r.status_code}; {hint}")
        if r.status_code == 200:
            try:
                ids = [m.get("id") for m in r.json().get("data", [])]
            except (ValueError, AttributeError):
                ids = []
            if ids and self.model not in ids:
                log.warning("model %r is not among those served at %s: %s", self.model, url, ids)
        self._checked = True

    # -- generation ---------------------------------------------------------------------

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        with self._lock:
            self.stats.calls += 1
            self.stats.requests += len(conversations)
        if not conversations:
            return []
        if not self._checked:
            self.check()
        results: list[list[str]] = [[] for _ in conversations]
        with self._lock:
            self._down_since = None   # each round gets the whole budget
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations)),
                                  thread_name_prefix="openai-gen")
        try:
            futures = {pool.submit(self._request, i, conv, params, stop): i
                       for i, conv in enumerate(conversations)}
            with tqdm(total=len(futures), desc="generate", unit="req", leave=False,
                      disable=self._bar_disable) as bar:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
        except BackendUnavailable:
            self._checked = False     # the next round checks the server before sending anything
            raise
        finally:
            # On Ctrl-C / a down server / an unexpected error, do not keep sending the rest of
            # the round: requests waiting to retry wake up and stop.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        return results

    def _body(self, conv: Conversation, params: SamplingParams, seed: int | None) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in inert_control_tokens(conv)]
        body = {"model": self.model, "messages": messages, "n": params.n,
                "temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": params.max_new_tokens}
        if seed is not None:
            body["seed"] = seed
        if messages and messages[-1]["role"] == "assistant":
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return body

    def _request(self, index: int, conv: Conversation, params: SamplingParams,
                 stop: threading.Event | None = None) -> list[str]:
        """All attempts for one conversation; [] (counted) when it fails for good.

        Raises BackendUnavailable when the server has been down for longer than the budget."""
        stop = stop or threading.Event()
        # Seed offset per conversation: prompts get different samples, reruns the same ones. A
        # vLLM server seeds sample j of a request with seed + j, so the offset steps by n: no two
        # samples of a round share a random stream (review B3).
        base_seed = None if params.seed is None else params.seed + index * params.n
        content_retries = 0
        attempt = 0       # retries charged to this request (and its backoff step)
        tries = 0
        waited = False    # found the whole server down since the last charged retry
        while not stop.is_set():
            seed = None if base_seed is None else base_seed + content_retries * _RETRY_SEED_STRIDE
            tries += 1
            try:
                texts, tokens, cut = self._attempt(self._body(conv, params, seed), params.n)
            except _Permanent as e:
                log.warning("request %d failed for good: %s", index, e)
                break
            except _Retryable as e:
                if e.no_answer:
                    self._check_down_budget(e)
                if attempt >= self.max_retries:
                    if e.no_answer and self._server_down():
                        waited = True   # the server itself is down: wait for it (up to the budget)
                    elif waited:        # it came back meanwhile: this request's retries start afresh
                        waited, attempt = False, 0
                    else:
                        log.warning("request %d failed after %d attempts: %s", index, tries, e)
                        break
                content_retries += e.bad_content
                delay = e.delay_s if e.delay_s is not None else self._backoff(attempt)
                if e.no_answer:   # a down server is given up on at the budget, not a backoff later
                    delay = min(delay, self._budget_left() + 0.01)
                log.info("request %d: %s; retry %d in %.2fs", index, e, tries, delay)
                with self._lock:
                    self.stats.retries += 1
                if stop.wait(delay):
                    break
                attempt += 1
                continue
            with self._lock:
                self.stats.samples += len(texts)
                self.stats.tokens_generated += tokens
                self.stats.cut_at_cap += cut
            return texts
        if stop.is_set():
            return []   # round abandoned: not this request's failure, nothing to count
        with self._lock:
            self.stats.failed_requests += 1
        return []

    # -- server down --------------------------------------------------------------------

    def _answered(self, ok: bool) -> None:
        """Record a chat attempt's outcome for the down clock: any answer but 5xx resets it."""
        with self._lock:
            if ok:
                self._down_since = None
            elif self._down_since is None:
                self._down_since = time.monotonic()

    def _down_s(self) -> float:
        with self._lock:
            since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    def _budget_left(self) -> float:
        return max(0.0, self.down_budget_s - self._down_s())

    def _check_down_budget(self, e: _Retryable) -> None:
        down_s = self._down_s()
        if down_s > self.down_budget_s:
            raise BackendUnavailable(
                f"the OpenAI-compatible server at {self.base_url} has given no answer but errors for "
                f"{down_s:.1f}s, longer than down_budget_s={self.down_budget_s:g} (last: {e}); the round "
                f"was abandoned rather than returned empty. Restart the server (or fix generator.base_url, "
                f"or raise generator.down_budget_s for slow restarts) and run again: committed shards "
                f"are kept and the stage resumes after them")

    def _server_down(self) -> bool:
        """Is the whole server down (GET /models gets no answer, or 5xx), not just one request?"""
        try:
            r = self._client.get(f"{self.base_url}/models",
                                 timeout=min(10.0, self._client.timeout.read or 10.0))
        except httpx.HTTPError:
            return True
        return r.status_code >= 500

    def _backoff(self, attempt: int) -> float:
        # "Equal jitter": half fixed, half random, so many failed requests do not retry in lockstep.
        d = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
        return d / 2 + self._rng.uniform(0, d / 2)

    def _attempt(self, body: dict, n: int) -> tuple[list[str], int, int]:
        try:
            r = self._client.post(f"{self.base_url}/chat/completions", json=body)
        except httpx.TimeoutException as e:
            self._answered(False)
            raise _Retryable(f"timeout ({type(e).__name__})", no_answer=True) from None
        except httpx.TransportError as e:  # connection refused/reset, truncated response
            self._answered(False)
            raise _Retryable(f"transport error ({type(e).__name__}: {e})", no_answer=True) from None
        self._answered(r.status_code < 500)
        if r.status_code == 429:
            raise _Retryable("HTTP 429", delay_s=_retry_after(r.headers.get("retry-after")))
        if r.status_code >= 500 or r.status_code == 408:
            raise _Retryable(f"HTTP {r.status_code}", delay_s=_retry_after(r.headers.get("retry-after")),
                             no_answer=r.status_code >= 500)
        if r.status_code != 200:
            raise _Permanent(f"HTTP {r.status_code}: {r.text[:300]}")
        try:
            data = r.json()
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            texts = [c["message"]["content"] for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _Retryable(f"malformed response ({type(e).__name__}: {r.text[:120]!r})") from None
        if len(texts) != n:
            raise _Retryable(f"expected {n} choices, got {len(texts)}", bad_content=True)
        if any(not isinstance(t, str) or not t for t in texts):
            raise _Retryable("empty content", bad_content=True)
        usage = data.get("usage") or {}
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        cut = sum(c.get("finish_reason") == "length" for c in choices)   # stopped by max_tokens, not finished
        return texts, int(tokens) if isinstance(tokens, (int, float)) else 0, cut


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, from either form the RFC allows.

    >>> _retry_after("2"), _retry_after(None), _retry_after("soon")
    (2.0, None, None)
    """
    if not value:
        return None
    try:
        return min(_MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return min(_MAX_RETRY_AFTER_S, max(0.0, when.timestamp() - time.time()))
