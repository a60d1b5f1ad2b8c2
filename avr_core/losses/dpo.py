import torch.nn.functional as F
from torch import Tensor


def dpo(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
        beta: float = 0.1) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """-log sigma(beta[(pi_c - ref_c) - (pi_r - ref_r)]), averaged over pairs (Rafailov et al. 2023)."""
    chosen = beta * (pi_chosen - ref_chosen)
    rejected = beta * (pi_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), (chosen.detach(), rejected.detach())
