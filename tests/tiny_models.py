"""A tiny random Llama (hidden 64, 2 layers, ~13 MB in float32) carrying the real SmolLM2 tokenizer
and ChatML template: a policy, scorer or judge for tests and checks about MECHANISM (caching,
locking, sharding, object stores), where a real model's minutes on 2 cores buy nothing. Every file
stays far below s3fs's multipart threshold (50 MB), so it also uploads as single PUTs."""
from __future__ import annotations


def tiny_llama(path: str, seed: int = 0) -> str:
    """Write the model and tokenizer to `path` (created); returns `path`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from avr_core.model_refs import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
