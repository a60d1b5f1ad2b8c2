"""The toy models of scripts/gpu_check.py, built here with no network and no model package.

The check proves the code paths (engines, pooling, ZeRO-3, exports), not model quality, so a
2-layer Llama with random weights does. Its tokenizer is a byte-level BPE trained in-process
on a few sentences (every string encodes: no unknown tokens), wrapped as a
PreTrainedTokenizerFast with a ChatML template, as SmolLM2's. Sizes respect vLLM's kernels:
head size 64 is one that vLLM's CPU and GPU attention backends support.

    paths = build(Path("/tmp/work"))   # {"policy": ".../toy-policy", "rm": ".../toy-rm"}
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "What is 17 * 23? It is 391, since 17 * 23 = 391.", "Red, yellow and blue are primary colours.",
    "Rain taps the roof; a quiet haiku about rain.", "Vaccines train the immune system to know a germ.",
    "A tip for learning Python: write small programs every day.", "Sure, here it is. I don't know.",
    "Which answer is better? Output m for (m), M for (M).", "Eat vegetables, sleep well, exercise.",
    "The answer: Rating: [[7]] because the reasoning is sound and the result is correct.",
    "Critique the answer, then refine it; the user asked a question and the assistant replied.",
] + [f"What is {i} plus {i}? {i} plus {i} is {2 * i}. It is {2 * i + 1}, I think, maybe more." for i in range(64)]


def tokenizer(vocab_size: int = 1024):
    """A byte-level BPE fitted to CORPUS, with ChatML specials and template; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML, model_max_length=4096)


def config(tok):
    """2 layers, hidden 128, 2 heads of 64. initializer_range 0.1 rather than 0.02: attention and
    logits are then far from uniform, so scores differ across texts (the hf/vllm parity means
    something) and a misaligned DPO reference moves the first loss visibly off ln 2."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                       initializer_range=0.1, tie_word_embeddings=False, bos_token_id=None,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build(work: Path, seed: int = 0) -> dict:
    """Save the toy policy and a reward model (same trunk, a random 1-logit score head) under
    `work`; returns their paths. Rebuilt every time: a few seconds, and a stale model from an
    older version of this file can never be picked up."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = tokenizer()
    cfg = config(tok)
    torch.manual_seed(seed)
    policy, rm = work / "toy-policy", work / "toy-rm"
    model = LlamaForCausalLM(cfg).float()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    # pad_token_id in the config: HF's sequence classification pools the last non-pad token
    # and refuses batches > 1 without it (review A7)
    scorer = LlamaForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    torch.nn.init.normal_(scorer.score.weight, std=0.5)
    scorer.config.pad_token_id = tok.pad_token_id
    scorer.save_pretrained(rm)
    tok.save_pretrained(rm)
    paths = {"policy": str(policy), "rm": str(rm)}
    (work / "paths.json").write_text(json.dumps(paths))
    return {**paths, "vocab": len(tok), "params": sum(p.numel() for p in model.parameters())}
