"""The training recipe: one DeepSpeed recipe for RSFT and preference optimisation.

    from avr_core.training import tokenize_pairs, compute_reference_logps, train

    pairs, counts = tokenize_pairs(rows, tokenizer, max_length=2048)
    refs = compute_reference_logps(policy_path, pairs)        # once; stored as an artifact
    summary = train(policy_path, rows, cfg.po, out_dir, ckpt_dir, ref_logps=ref_logps_by_id(refs))

Modules: data (chat template, loss mask, truncation counts, padding), logps (per-sequence
log-probs, the reference pass), recipe (train), checkpoint (resume, HF export), dist
(DeepSpeed process setup), launch (spec files, the CLI the deepspeed launcher runs).
torch / deepspeed are imported by the modules that need them, not here.
"""
from __future__ import annotations

__all__ = ["tokenize_sft", "tokenize_pairs", "compute_reference_logps", "ref_logps_by_id",
           "train", "launch_command", "write_spec", "run_spec", "child_env"]


def __getattr__(name: str):
    if name in ("tokenize_sft", "tokenize_pairs"):
        from avr_core.training import data
        return getattr(data, name)
    if name in ("compute_reference_logps", "ref_logps_by_id"):
        from avr_core.training import logps
        return getattr(logps, name)
    if name == "train":
        from avr_core.training.recipe import train
        return train
    if name in ("launch_command", "write_spec", "run_spec", "child_env"):
        from avr_core.training import launch
        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
