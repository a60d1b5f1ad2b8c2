import torch
from torch import Tensor


def sft(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy over the unmasked (assistant) positions.

    logits [B, T, V] predict labels shifted by one; labels [B, T] hold -100 where masked.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)
