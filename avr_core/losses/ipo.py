from torch import Tensor


def ipo(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
        beta: float = 0.1) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """(h - 1/(2 beta))^2 with h = (pi_c - ref_c) - (pi_r - ref_r), averaged (Azar et al. 2023).

    As in the paper, log-probs are per sequence; callers may pass length-averaged ones.
    """
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, ((beta * (pi_chosen - ref_chosen)).detach(), (beta * (pi_rejected - ref_rejected)).detach())
