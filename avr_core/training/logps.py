"""Per-sequence log-probabilities of completion tokens, and the one-off reference pass.

The reference model's log-probs for a pair dataset are computed ONCE (`compute_reference_logps`)
and stored by the pipeline as their own artifact; training reads them and never runs the
reference model. `REFERENCE_FORWARDS` counts every reference forward pass in this process so
tests can assert that training adds none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from avr_core.training.data import IGNORE, collate_pairs

REFERENCE_FORWARDS = 0   # forward passes of a reference model in this process (tests read it)


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the labelled tokens of each row, and how many there are.

    logits [B, T, V] at position t predict labels[:, t + 1]; labels are -100 where masked.

    >>> logits = torch.zeros(1, 3, 4)                  # uniform over 4 tokens
    >>> sequence_logps(logits, torch.tensor([[-100, 1, 2]]))
    (tensor([-2.7726]), tensor([2]))

    i.e. 2 tokens x ln(1/4). Computed with cross-entropy in float32, one row at a time would
    give the same numbers; padding rows contribute nothing.
    """
    labels = labels[:, 1:]
    logits = logits[:, :-1, :]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view(labels.shape)
    mask = labels != IGNORE
    return -(nll * mask).sum(-1), mask.sum(-1)


def pair_logps(model, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward over a `collate_pairs` batch -> (logp_chosen, logp_rejected, n_chosen, n_rejected)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp, n = sequence_logps(logits, batch["labels"].to(logits.device))   # device_map: logits on the last GPU
    b = logp.shape[0] // 2
    return logp[:b], logp[b:], n[:b], n[b:]


@torch.no_grad()
def compute_reference_logps(model_path: str, tokenized_pairs: list[dict], batch_size: int = 4,
                            dtype: str = "float32", pad_token_id: int | None = None,
                            device: str | None = None, progress: bool = False) -> list[dict]:
    """Reference log-probs of every pair: one pass, no gradients.

    `tokenized_pairs` is the output of `tokenize_pairs` (with the same max_length as training,
    so both see the same tokens).

    >>> compute_reference_logps(path, tokenize_pairs(rows, tok, 512)[0])      # doctest: +SKIP
    [{'id': 'p1', 'ref_chosen': -12.73, 'ref_rejected': -15.02, 'n_chosen': 5, 'n_rejected': 7}, ...]

    n_* are completion token counts; `train` checks them against its own tokenisation.
    `device`: auto (CUDA when present; a model larger than one GPU is spread with
    device_map=auto) | cpu | cuda | cuda:N (avr_core/backends/device.py).
    """
    global REFERENCE_FORWARDS
    from transformers import AutoConfig, AutoModelForCausalLM

    from avr_core.backends.device import input_device, load

    model, _ = load(AutoModelForCausalLM, model_path, dtype, device or "auto", key="po.device")
    device = input_device(model)
    if pad_token_id is None:
        cfg = AutoConfig.from_pretrained(model_path)
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
        if isinstance(pad_token_id, list):
            pad_token_id = pad_token_id[0]
    # Batches of similar length (no gradients: far larger than a training micro-batch fits), so
    # little of each forward is padding; rows come back in the input order.
    order = sorted(range(len(tokenized_pairs)), key=lambda i: _pair_len(tokenized_pairs[i]))
    out: list[dict | None] = [None] * len(tokenized_pairs)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="reference log-probs", unit="batch")
    for s in starts:
        idx = order[s:s + batch_size]
        chunk = [tokenized_pairs[i] for i in idx]
        batch = collate_pairs(chunk, pad_token_id)
        batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        lc, lr, nc, nr = pair_logps(model, batch)
        REFERENCE_FORWARDS += 1
        for j, (i, ex) in enumerate(zip(idx, chunk)):
            out[i] = {"id": ex["id"], "ref_chosen": float(lc[j]), "ref_rejected": float(lr[j]),
                      "n_chosen": int(nc[j]), "n_rejected": int(nr[j])}
    del model
    from avr_core.backends.device import release_accelerator
    release_accelerator()
    return out


def _pair_len(ex: dict) -> int:
    return max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"]))


def ref_logps_by_id(rows: list[dict]) -> dict:
    """`compute_reference_logps` rows -> {id: (ref_chosen, ref_rejected, n_chosen, n_rejected)},
    the form `train(ref_logps=...)` takes (a 2-tuple (chosen, rejected) is accepted too)."""
    return {r["id"]: (r["ref_chosen"], r["ref_rejected"], r.get("n_chosen"), r.get("n_rejected")) for r in rows}
