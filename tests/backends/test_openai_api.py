"""OpenAIGenerator against a real HTTP server on 127.0.0.1 that fakes the chat API.

`FlakyChatServer` (tests/backends/flaky_chat_server.py) answers `/v1/models` and
`/v1/chat/completions` deterministically: sample j of a request is
``"<last message content> #<seed>.<j>"``, so tests can check order, n and seeds. It can be
scripted to fail the next k chat requests in a given way, fail a seeded share of them, or go down.
"""
from __future__ import annotations

import socket

import pytest

from avr_core.backends.base import BackendUnavailable, Generator, SamplingParams
from avr_core.backends.openai_api import OpenAIGenerator, _retry_after
from tests.backends.flaky_chat_server import FlakyChatServer


@pytest.fixture
def server():
    with FlakyChatServer() as s:
        yield s


def make_gen(url, **kw):
    kw = {"backoff_s": 0.001, "max_backoff_s": 0.01, "timeout_s": 5.0, "progress": False, **kw}
    return OpenAIGenerator(url, "fake", **kw)


def conv(text):
    return [{"role": "user", "content": text}]


P = SamplingParams(n=2, temperature=0.7, top_p=0.8, max_new_tokens=16, seed=10)


def test_round_preserves_order_n_samples_and_counts(server):
    gen = make_gen(server.base_url, concurrency=4)
    assert isinstance(gen, Generator)
    out = gen.generate([conv(f"q{i}") for i in range(10)], P)
    # Seeds are offset by the conversation index; choices are re-sorted by their index.
    assert out == [[f"q{i} #{10 + 2 * i}.0", f"q{i} #{10 + 2 * i}.1"] for i in range(10)]
    s = gen.stats
    assert (s.calls, s.requests, s.samples, s.tokens_generated, s.retries, s.failed_requests) == (1, 10, 20, 60, 0, 0)
    assert s.cut_at_cap == 10          # finish_reason "length": one of the two choices of each request
    b = server.requests[0]["body"]
    assert {b["n"], b["max_tokens"], b["temperature"], b["top_p"]} == {2, 16, 0.7, 0.8}
    assert "continue_final_message" not in b


def test_continue_final_assistant_message(server):
    gen = make_gen(server.base_url)
    c = conv("rate it") + [{"role": "assistant", "content": "Rating: [["}]
    assert gen.generate([c], SamplingParams(n=1, seed=None)) == [["Rating: [[ #None.0"]]
    b = server.requests[0]["body"]
    assert b["continue_final_message"] is True and b["add_generation_prompt"] is False
    assert "seed" not in b


@pytest.mark.parametrize("mode", ["500", "429", "truncated", "empty"])
def test_transient_failures_are_retried(server, mode):
    server.fail(mode, times=2)
    gen = make_gen(server.base_url)
    out = gen.generate([conv("a")], P)
    assert len(out[0]) == 2 and all(out[0])
    assert gen.stats.retries == 2 and gen.stats.failed_requests == 0
    if mode == "empty":  # a bad sample is re-drawn with a shifted seed, not re-sent verbatim
        assert len({r["body"]["seed"] for r in server.requests}) == 3


def retry_delays(caplog) -> list[float]:
    """The delay of every retry the generator scheduled ("request i: why; retry n in d s")."""
    return [r.args[3] for r in caplog.records if r.name == "avr_core.backends.openai_api" and "retry" in r.msg]


def test_retry_after_is_respected(server, caplog):
    caplog.set_level("INFO", logger="avr_core.backends.openai_api")
    server.retry_after = "1"
    server.fail("429", times=1)
    gen = make_gen(server.base_url)
    assert gen.generate([conv("a")], P)[0]
    assert retry_delays(caplog) == [1.0]         # the server's Retry-After, not the 1 ms backoff
    assert gen.stats.retries == 1 and len(server.requests) == 2


def test_failed_for_good_yields_empty_and_is_counted(server):
    server.fail("500", times=3)  # max_retries=2 -> 3 attempts, all fail
    gen = make_gen(server.base_url, max_retries=2, concurrency=1)
    out = gen.generate([conv("a"), conv("b")], P)
    assert out[0] == [] and out[1] == ["b #12.0", "b #12.1"]
    assert gen.stats.failed_requests == 1 and gen.stats.retries == 2 and gen.stats.samples == 2


def test_permanent_4xx_is_not_retried(server):
    server.fail("400")
    gen = make_gen(server.base_url)
    assert gen.generate([conv("a")], P) == [[]]
    assert gen.stats.retries == 0 and gen.stats.failed_requests == 1 and len(server.requests) == 1


def test_api_key_from_env_never_in_errors(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    gen = make_gen(server.base_url, api_key_env="MY_KEY")
    gen.generate([conv("a")], P)
    assert server.requests[0]["auth"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(gen)
    monkeypatch.delenv("MY_KEY")
    make_gen(server.base_url, api_key_env="MY_KEY").generate([conv("a")], P)
    assert server.requests[1]["auth"] == "Bearer EMPTY"


def test_dead_server_raises_backend_unavailable(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-456")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = make_gen(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(BackendUnavailable) as e:
        gen.generate([conv("a")], P)
    msg = str(e.value)
    assert f"127.0.0.1:{port}/v1/models" in msg and "server" in msg and "sk-secret" not in msg


def test_empty_round_sends_nothing(server):
    gen = make_gen(server.base_url)
    assert gen.generate([], P) == [] and server.requests == []


def test_retry_after_parsing():
    assert _retry_after("3") == 3.0
    assert _retry_after("-1") == 0.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert _retry_after("garbage") is None


# -- server down: wait up to generator.down_budget_s, then fail the round loudly -------------

def test_server_down_longer_than_budget_raises_not_empty(server):
    gen = make_gen(server.base_url, max_retries=1, down_budget_s=0.3, concurrency=4)
    assert gen.generate([conv("a")], P) == [["a #10.0", "a #10.1"]]   # checked and working
    server.down()                                                    # connection refused from now on
    with pytest.raises(BackendUnavailable) as e:
        gen.generate([conv(f"q{i}") for i in range(6)], P)
    msg = str(e.value)
    assert server.base_url in msg and "down_budget_s=0.3" in msg and "resumes" in msg   # gave up at the budget
    assert gen.stats.failed_requests == 0         # abandoned, not silently turned into empty samples
    assert gen.stats.retries > 2                  # kept trying past max_retries while it was down
    with pytest.raises(BackendUnavailable, match="no OpenAI-compatible server"):   # re-checked first
        gen.generate([conv("a")], P)
    server.up()
    assert gen.generate([conv("a")], P) == [["a #10.0", "a #10.1"]]   # same port, back to normal


def test_server_answering_only_503_counts_as_down(server):
    gen = make_gen(server.base_url, max_retries=1, down_budget_s=0.3)
    gen.check()
    server.down("503")
    with pytest.raises(BackendUnavailable, match=r"HTTP 503"):
        gen.generate([conv("a")], P)
    assert gen.stats.failed_requests == 0


def test_server_down_shorter_than_budget_is_waited_out(server):
    import threading
    gen = make_gen(server.base_url, max_retries=1, down_budget_s=5.0)
    gen.check()
    server.down()
    threading.Timer(0.5, server.up).start()        # a restart: back within the budget
    out = gen.generate([conv(f"q{i}") for i in range(4)], P)
    assert out == [[f"q{i} #{10 + 2 * i}.0", f"q{i} #{10 + 2 * i}.1"] for i in range(4)]   # nothing dropped
    assert gen.stats.failed_requests == 0 and gen.stats.retries >= 4


def test_one_bad_request_on_a_live_server_is_dropped_not_waited_for(server):
    server.fail("500", times=100)                 # this request 500s every time; /models answers
    gen = make_gen(server.base_url, max_retries=2, concurrency=1, down_budget_s=60)
    assert gen.generate([conv("a")], P) == [[]]
    # given up after max_retries: a wait for the 60 s down budget would have kept retrying
    assert gen.stats.failed_requests == 1 and gen.stats.retries == 2 and len(server.requests) == 3
