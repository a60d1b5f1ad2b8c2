import torch.nn.functional as F
from torch import Tensor


def rm_margin(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
              reward_margin: Tensor, beta: float = 0.1, gamma: float = 0.5) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """DPO that must clear a margin gamma * (r_chosen - r_rejected):

        -log sigma(beta[(pi_c - ref_c) - (pi_r - ref_r)] - gamma * reward_margin)

    reward_margin is AvR's refinement-aware reward r(y_{t+1}) - r(y_t), stored on every pair.
    """
    chosen = beta * (pi_chosen - ref_chosen)
    rejected = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected - gamma * reward_margin).mean()
    return loss, (chosen.detach(), rejected.detach())
