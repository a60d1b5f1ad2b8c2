"""Per-sequence log-probs and the one-off reference pass."""
import math

import pytest
import torch

from avr_core.training import logps
from avr_core.training.data import collate_pairs, tokenize_pairs

from .conftest import pair_rows


def test_sequence_logps_by_hand():
    # uniform over 4 tokens: each labelled token has log-prob ln(1/4); 2 labelled tokens
    s, n = logps.sequence_logps(torch.zeros(2, 3, 4), torch.tensor([[-100, 1, 2], [-100, -100, 3]]))
    assert s.tolist() == pytest.approx([2 * math.log(0.25), math.log(0.25)]) and n.tolist() == [2, 1]


def test_reference_logps_one_pass_match_a_single_forward(tiny_llama, tok):
    from transformers import AutoModelForCausalLM

    pairs, _ = tokenize_pairs(pair_rows(3), tok, 512)
    before = logps.REFERENCE_FORWARDS
    refs = logps.compute_reference_logps(tiny_llama, pairs, batch_size=2)
    assert logps.REFERENCE_FORWARDS - before == 2           # ceil(3 / 2) batched forwards
    assert [r["id"] for r in refs] == ["p0", "p1", "p2"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for i in range(3):     # each pair alone, unpadded: batches are length-sorted, rows come back in order
        with torch.no_grad():
            lc, lr, nc, nr = logps.pair_logps(model, collate_pairs(pairs[i:i + 1], tok.pad_token_id))
        assert (refs[i]["ref_chosen"], refs[i]["ref_rejected"]) == pytest.approx((float(lc), float(lr)), abs=1e-4)
        assert (refs[i]["n_chosen"], refs[i]["n_rejected"]) == (int(nc), int(nr))
    by_id = logps.ref_logps_by_id(refs)
    assert by_id["p0"][:2] == (refs[0]["ref_chosen"], refs[0]["ref_rejected"])
