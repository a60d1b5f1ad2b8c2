"""Per-sequence log-probabilities of completion tokens, and the one-off reference pass.

The reference model's log-probs for a pair dataset are computed ONCE (`compute_reference_logps`)
and stored by the pipeline as their own artifact; training reads them and never runs the
reference model. `REFERENCE_FORWARDS` counts every reference forward pass in this process so
tests can assert that training adds none.

Memory (docs/SCALING.md, "Reference log-probs: peak memory"): the logits of a forward are
[rows, T, V] in the model's dtype, with V = 128,256 for Llama 3. The reference pass therefore
packs each forward within a TOKEN budget (rows x padded length), and `sequence_logps` reads the
logits a slice of positions at a time, so no full float32 copy of them is ever made.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from avr_core.training.data import IGNORE, collate_pairs

log = logging.getLogger(__name__)

REFERENCE_FORWARDS = 0   # forward passes of a reference model in this process (tests read it)
TOKEN_BUDGET = 16384     # reference pass: rows x padded length per forward (one 8192-token pair)
CHUNK_TOKENS = 1024      # positions whose log-softmax is in float32 at once (~0.5 GB at V = 128k)


def sequence_logps(logits: Tensor, labels: Tensor, chunk_tokens: int = CHUNK_TOKENS) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the labelled tokens of each row, and how many there are.

    logits [B, T, V] at position t predict labels[:, t + 1]; labels are -100 where masked.

    >>> logits = torch.zeros(1, 3, 4)                  # uniform over 4 tokens
    >>> sequence_logps(logits, torch.tensor([[-100, 1, 2]]))
    (tensor([-2.7726]), tensor([2]))

    i.e. 2 tokens x ln(1/4), in float32 whatever the logits' dtype; padding rows contribute nothing.

    Why chunks: log p(label) = logit[label] - logsumexp(logits), and only the logsumexp needs the
    whole vocabulary in float32. Each row is read `chunk_tokens` positions at a time through a
    VIEW (no reshape copy), so the float32 working set is O(chunk_tokens x V), not O(B x T x V).
    The same code serves training (`pair_logps`): it is differentiable (the gradient is
    softmax - onehot, as with cross-entropy), and what autograd keeps for the backward pass is one
    float32 chunk per chunk, i.e. one float32 copy of the logits in total, as cross-entropy's saved
    log-softmax was; the forward no longer holds two float32 copies at once. One code path for
    policy and reference means both log-probs come from the same arithmetic.
    """
    B, T, _ = logits.shape
    labels = labels.to(logits.device)
    sums, counts = [], (labels[:, 1:] != IGNORE).sum(-1)
    for b in range(B):
        row = logits.new_zeros((), dtype=torch.float32)
        for s in range(0, T - 1, chunk_tokens):
            e = min(s + chunk_tokens, T - 1)
            row = row + _chunk_logp_sum(logits[b, s:e], labels[b, s + 1:e + 1])
        sums.append(row)
    return torch.stack(sums), counts


def _chunk_logp_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """sum over labelled positions of log softmax(logits)[label]; logits [n, V], labels [n]."""
    mask = labels != IGNORE
    if not bool(mask.any()):                 # prompt-only or padding chunk: no vocabulary pass
        return logits.new_zeros((), dtype=torch.float32)
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    logp = picked - torch.logsumexp(logits.float(), dim=-1)
    return torch.where(mask, logp, torch.zeros_like(logp)).sum()


def pair_logps(model, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward over a `collate_pairs` batch -> (logp_chosen, logp_rejected, n_chosen, n_rejected)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp, n = sequence_logps(logits, batch["labels"].to(logits.device))   # device_map: logits on the last GPU
    b = logp.shape[0] // 2
    return logp[:b], logp[b:], n[:b], n[b:]


def plan_batches(lengths: list[int], batch_size: int, token_budget: int) -> list[list[int]]:
    """Group pair indices into forwards of at most `batch_size` pairs whose rows x padded length
    (2 x pairs x longest) stays within `token_budget`.

    Longest first, so the forward that needs the most memory runs in the first minute of the
    pass, not hours in. A pair that alone exceeds the budget still runs, alone (its 2 rows are
    the least any forward can hold); `compute_reference_logps` logs how many did.

    >>> plan_batches([10, 40, 30, 20], batch_size=4, token_budget=100)   # 2 rows x 40 > 100 / 2
    [[1], [2], [3, 0]]
    >>> plan_batches([10, 40, 30, 20], batch_size=1, token_budget=10**6)
    [[1], [2], [3], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        # sorted longest first: the padded length of a batch is its first pair's length
        if cur and len(cur) < batch_size and 2 * (len(cur) + 1) * lengths[cur[0]] <= token_budget:
            cur.append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def reference_logps(model, tokenized_pairs: list[dict], pad_token_id: int, device, batch_size: int = 4,
                    token_budget: int = TOKEN_BUDGET, progress: bool = False,
                    on_batch: Callable[[int, int], None] | None = None) -> list[dict]:
    """The reference pass over a loaded `model`: rows (see `compute_reference_logps`) in input order.
    `on_batch(done, total)` after every forward (a stage's progress artifact)."""
    global REFERENCE_FORWARDS
    lengths = [_pair_len(ex) for ex in tokenized_pairs]
    batches = plan_batches(lengths, batch_size, token_budget)
    total = len(batches)
    over = sum(1 for i in range(len(lengths)) if 2 * lengths[i] > token_budget)
    if over:
        log.warning("reference log-probs: %d pair(s) are longer than the token budget (%d tokens for 2 rows) "
                    "and run one pair per forward, at %d tokens", over, token_budget, 2 * max(lengths))
    out: list[dict | None] = [None] * len(tokenized_pairs)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="reference log-probs", unit="batch", disable=None)   # none in a log file
    for done, idx in enumerate(batches, 1):
        chunk = [tokenized_pairs[i] for i in idx]
        batch = collate_pairs(chunk, pad_token_id)
        batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        lc, lr, nc, nr = pair_logps(model, batch)
        REFERENCE_FORWARDS += 1
        for j, (i, ex) in enumerate(zip(idx, chunk)):
            out[i] = {"id": ex["id"], "ref_chosen": float(lc[j]), "ref_rejected": float(lr[j]),
                      "n_chosen": int(nc[j]), "n_rejected": int(nr[j])}
        del batch, lc, lr, nc, nr         # free this forward's tensors before the next one allocates
        if on_batch:
            on_batch(done, total)
    return out


def compute_reference_logps(model_path: str, tokenized_pairs: list[dict], batch_size: int = 4,
                            dtype: str = "float32", pad_token_id: int | None = None,
                            device: str | None = None, progress: bool = False,
                            token_budget: int = TOKEN_BUDGET,
                            on_batch: Callable[[int, int], None] | None = None) -> list[dict]:
    """Reference log-probs of every pair: one pass, no gradients.

    `tokenized_pairs` is the output of `tokenize_pairs` (with the same max_length as training,
    so both see the same tokens).

    >>> compute_reference_logps(path, tokenize_pairs(rows, tok, 512)[0])      # doctest: +SKIP
    [{'id': 'p1', 'ref_chosen': -12.73, 'ref_rejected': -15.02, 'n_chosen': 5, 'n_rejected': 7}, ...]

    n_* are completion token counts; `train` checks them against its own tokenisation.
    A forward holds at most `batch_size` pairs (2 x batch_size rows) AND at most `token_budget`
    tokens counted as rows x padded length, which bounds its logits ([rows, T, V]); a single pair
    longer than the budget runs alone (`plan_batches`).
    `device`: auto (CUDA when present; a model larger than one GPU is spread with
    device_map=auto) | cpu | cuda | cuda:N (avr_core/backends/device.py).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from avr_core.backends.device import input_device, load, release_accelerator

    if token_budget < 2:
        raise ValueError(f"token_budget must be >= 2 (got {token_budget})")
    model, _ = load(AutoModelForCausalLM, model_path, dtype, device or "auto", key="po.device")
    if pad_token_id is None:
        cfg = AutoConfig.from_pretrained(model_path)
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
        if isinstance(pad_token_id, list):
            pad_token_id = pad_token_id[0]
    try:
        return reference_logps(model, tokenized_pairs, pad_token_id, input_device(model), batch_size,
                               token_budget, progress, on_batch)
    finally:
        del model
        release_accelerator()


def _pair_len(ex: dict) -> int:
    return max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"]))


def ref_logps_by_id(rows: list[dict]) -> dict:
    """`compute_reference_logps` rows -> {id: (ref_chosen, ref_rejected, n_chosen, n_rejected)},
    the form `train(ref_logps=...)` takes (a 2-tuple (chosen, rejected) is accepted too)."""
    return {r["id"]: (r["ref_chosen"], r["ref_rejected"], r.get("n_chosen"), r.get("n_rejected")) for r in rows}
