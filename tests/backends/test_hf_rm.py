"""`HFRewardScorer` on tiny randomly initialised reward models built from configs (no reward model
ships on PyPI): a config without pad_token_id still scores batches (A7), inputs cut at max_length
are counted (B5), and a Gemma-2 model keeps its attention soft-cap (B1: eager, not SDPA)."""
from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.slow
CONVS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
         for q, a in [("What is 2+2?", "4"), ("Name a colour.", "Blue, a calm colour of the sky and the sea."),
                      ("Say hi.", "hi")]]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from avr_core.model_refs import resolve_model_path
    return AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))


def _save(model, tok, path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_rm_without_pad(tok, tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1)
    assert cfg.pad_token_id is None
    torch.manual_seed(0)
    return _save(LlamaForSequenceClassification(cfg), tok, tmp_path_factory.mktemp("llama-rm"))


def test_a_config_without_pad_token_id_scores_batches(llama_rm_without_pad):
    from avr_core.backends.hf import HFRewardScorer

    rm = HFRewardScorer(llama_rm_without_pad, dtype="float32", batch_size=2, device="cpu")
    batched = rm.score(CONVS)
    single = [rm.score([c])[0] for c in CONVS]
    assert rm.model.config.pad_token_id == rm.tok.pad_token_id
    assert batched == pytest.approx(single, abs=1e-5)          # right padding: the last real token is read
    assert len({round(x, 5) for x in batched}) == 3 and rm.stats.truncated_inputs == 0


def test_inputs_cut_at_max_length_are_counted_and_warned_once(llama_rm_without_pad, caplog):
    from avr_core.backends.hf import HFRewardScorer, rm_token_ids

    rm = HFRewardScorer(llama_rm_without_pad, dtype="float32", batch_size=2, device="cpu")
    full, _ = rm_token_ids(rm.tok, CONVS, 10_000)
    cap = rm.max_length = sorted(len(x) for x in full)[1]       # the longest one is cut, the others not
    long = sum(len(x) > cap for x in full)
    assert long == 1
    with caplog.at_level(logging.WARNING, logger="avr_core.backends.hf"):
        rm.score(CONVS)
        rm.score(CONVS)
    assert rm.stats.truncated_inputs == 2 * long
    assert sum("cut on the right" in r.getMessage() for r in caplog.records) == 1
    ids, cut = rm_token_ids(rm.tok, CONVS, cap)
    assert cut == long and [x[:cap] for x in full] == ids     # the first `cap` tokens: right truncation


def test_over_long_skip_leaves_the_input_unscored_and_counts_it(llama_rm_without_pad, caplog):
    """`scorer.over_long=skip` (the authors: an over-long request fails, `bt_model` returns None):
    the over-long input gets None, the others the same scores as with truncation."""
    from avr_core.backends.hf import HFRewardScorer, rm_token_ids

    cut_rm = HFRewardScorer(llama_rm_without_pad, dtype="float32", batch_size=2, device="cpu")
    skip_rm = HFRewardScorer(llama_rm_without_pad, dtype="float32", batch_size=2, device="cpu", over_long="skip")
    full, _ = rm_token_ids(cut_rm.tok, CONVS, 10_000)
    cut_rm.max_length = skip_rm.max_length = sorted(len(x) for x in full)[1]
    longest = max(range(3), key=lambda i: len(full[i]))
    with caplog.at_level(logging.WARNING, logger="avr_core.backends.hf"):
        skipped, cut = skip_rm.score(CONVS), cut_rm.score(CONVS)
    assert skipped[longest] is None and cut[longest] is not None
    assert [s for i, s in enumerate(skipped) if i != longest] == \
        pytest.approx([s for i, s in enumerate(cut) if i != longest], abs=1e-5)
    assert (skip_rm.stats.skipped_inputs, skip_rm.stats.truncated_inputs, skip_rm.stats.requests) == (1, 0, 2)
    assert (cut_rm.stats.skipped_inputs, cut_rm.stats.truncated_inputs) == (0, 1)
    assert any("were not scored" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def gemma2_rm(tok, tmp_path_factory):
    import torch
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    # A small cap so that it matters with random weights (Gemma-2 itself uses 50).
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       attn_logit_softcapping=0.5, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Gemma2ForSequenceClassification(cfg)
    with torch.no_grad():      # larger attention logits than the default init gives, so the cap bites
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    return _save(model, tok, tmp_path_factory.mktemp("gemma2-rm"))


def _reference(path, impl, ids):
    import torch
    from transformers import AutoModelForSequenceClassification

    from avr_core.backends.hf import _pad_right

    m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    x, mask = _pad_right(ids, m.config.pad_token_id, torch)
    with torch.inference_mode():
        return m(input_ids=x, attention_mask=mask).logits[:, 0].tolist()


def test_gemma2_keeps_its_attention_softcap(gemma2_rm):
    from avr_core.backends.hf import HFRewardScorer, rm_token_ids

    rm = HFRewardScorer(gemma2_rm, dtype="float32", batch_size=2, device="cpu")
    assert rm.model.config._attn_implementation == "eager"
    got = rm.score(CONVS)
    ids, _ = rm_token_ids(rm.tok, CONVS, 4096)
    eager = [_reference(gemma2_rm, "eager", [x])[0] for x in ids]
    sdpa = [_reference(gemma2_rm, "sdpa", [x])[0] for x in ids]
    print(f"\ngemma2 rm: ours {got}, eager {eager}, sdpa (cap dropped) {sdpa}")
    assert got == pytest.approx(eager, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(eager, sdpa)) > 1e-3   # the cap changes the scores here


def test_a_closed_vllm_rm_refuses_clearly(llama_rm_without_pad):
    from avr_core.backends.vllm_rm import VLLMRewardScorer

    rm = VLLMRewardScorer(llama_rm_without_pad, base_url="http://127.0.0.1:9/v1", served_model="rm")
    assert rm.closed is False
    rm.close()
    assert rm.closed is True
    with pytest.raises(RuntimeError, match="closed"):
        rm.score(CONVS)
