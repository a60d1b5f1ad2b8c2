import torch.nn.functional as F
from torch import Tensor


def simpo(pi_chosen: Tensor, pi_rejected: Tensor, len_chosen: Tensor, len_rejected: Tensor,
          beta: float = 2.0, gamma: float = 0.5) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """-log sigma(beta * pi_c/|y_c| - beta * pi_r/|y_r| - gamma): length-normalised, no reference
    model (Meng et al. 2024). len_* are the numbers of completion tokens."""
    chosen = beta * pi_chosen / len_chosen
    rejected = beta * pi_rejected / len_rejected
    return -F.logsigmoid(chosen - rejected - gamma).mean(), (chosen.detach(), rejected.detach())
