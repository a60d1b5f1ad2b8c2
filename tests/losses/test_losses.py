"""Each loss against values computed by hand (the arithmetic is in the comments)."""
import math

import torch
from pytest import approx

from avr_core.losses import dpo, ipo, rm_margin, sft, simpo


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_dpo_by_hand():
    # (pi_c - ref_c) - (pi_r - ref_r) = 0 - (-1) = 1; beta=0.1: -log sigma(0.1) = 0.644397
    loss, (rc, rr) = dpo(t(-1.0), t(-2.0), t(-1.0), t(-1.0), beta=0.1)
    assert float(loss) == approx(0.644397, abs=1e-6)
    assert (float(rc), float(rr)) == approx((0.0, -0.1))


def test_dpo_at_init_is_ln2():
    # policy == reference: every margin is 0, -log sigma(0) = ln 2
    loss, _ = dpo(t(-3.0, -5.0), t(-4.0, -1.0), t(-3.0, -5.0), t(-4.0, -1.0), beta=0.5)
    assert float(loss) == approx(math.log(2))


def test_ipo_by_hand():
    # h = (−1 − −1) − (−2 − −1) = 1; beta=0.1: 1/(2*0.1) = 5; (1 - 5)^2 = 16
    loss, _ = ipo(t(-1.0), t(-2.0), t(-1.0), t(-1.0), beta=0.1)
    assert float(loss) == approx(16.0)


def test_simpo_by_hand():
    # beta=2: 2*(-4)/4 = -2 ; 2*(-9)/3 = -6 ; -2 - (-6) - 0.5 = 3.5 ; -log sigma(3.5) = 0.029750
    loss, (rc, rr) = simpo(t(-4.0), t(-9.0), t(4.0), t(3.0), beta=2.0, gamma=0.5)
    assert float(loss) == approx(0.0297502, abs=1e-6)
    assert (float(rc), float(rr)) == approx((-2.0, -6.0))


def test_rm_margin_by_hand():
    # dpo logit 0.1 (as above) minus gamma*margin = 0.5*0.4 = 0.2 -> -log sigma(-0.1) = 0.744397
    loss, _ = rm_margin(t(-1.0), t(-2.0), t(-1.0), t(-1.0), t(0.4), beta=0.1, gamma=0.5)
    assert float(loss) == approx(0.744397, abs=1e-6)
    # gamma = 0 is plain DPO
    margin = rm_margin(t(-1.0), t(-2.0), t(-1.0), t(-1.0), t(0.4), beta=0.1, gamma=0.0)
    assert float(margin[0]) == approx(0.644397, abs=1e-6)


def test_sft_by_hand():
    # vocab 2, uniform logits -> CE = ln 2 on each unmasked target; masked positions ignored
    logits = torch.zeros(1, 3, 2, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, -100]])
    assert float(sft(logits, labels)) == approx(math.log(2))
    # a confident correct prediction: logits (0, ln 3) -> p(1) = 3/4 -> CE = ln(4/3)
    logits[0, 0, 1] = math.log(3)
    assert float(sft(logits, labels)) == approx(math.log(4 / 3))
