"""Reference log-probs within a token budget (issue 32 item 1, review F4): every forward holds at
most `token_budget` tokens (rows x padded length), the numbers equal one pair per forward, and
`sequence_logps` never makes a float32 copy of more than one chunk of the logits."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from avr_core.training import logps
from avr_core.training.data import IGNORE

VOCAB = 97


class FakeCausalLM(torch.nn.Module):
    """A FAKE model: logits [B, T, VOCAB] from the current and the previous token only (so right
    padding cannot change a real position's logits), and the input shape of every forward."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.now = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g).to(dtype))
        self.prev = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g).to(dtype))
        self.shapes: list[tuple[int, int]] = []

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.shapes.append(tuple(input_ids.shape))
        prev = F.pad(input_ids[:, :-1], (1, 0), value=0)
        return type("Out", (), {"logits": self.now[input_ids] + 0.5 * self.prev[prev]})()


def fake_pairs(n: int, seed: int = 0, longest: int = 300) -> list[dict]:
    """`tokenize_pairs`-shaped pairs of mixed lengths: a prompt (masked) then a completion."""
    rng = random.Random(seed)

    def side(prompt: list[int]) -> tuple[list[int], list[int]]:
        completion = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, longest - len(prompt)))]
        return prompt + completion, [IGNORE] * len(prompt) + completion

    pairs = []
    for i in range(n):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 40))]
        (ci, cl), (ri, rl) = side(prompt), side(prompt)
        pairs.append({"id": f"p{i}", "chosen_input_ids": ci, "chosen_labels": cl,
                      "rejected_input_ids": ri, "rejected_labels": rl})
    return pairs


def run(pairs, **kw) -> tuple[list[dict], list[tuple[int, int]]]:
    model = FakeCausalLM()
    rows = logps.reference_logps(model, pairs, pad_token_id=0, device="cpu", **kw)
    return rows, model.shapes


@pytest.mark.parametrize("batch_size,budget", [(4, 1000), (8, 2400), (64, 600), (2, 10**6)])
def test_every_forward_stays_within_the_token_budget(batch_size, budget):
    pairs = fake_pairs(40)
    before = logps.REFERENCE_FORWARDS
    rows, shapes = run(pairs, batch_size=batch_size, token_budget=budget)
    assert logps.REFERENCE_FORWARDS - before == len(shapes)
    assert sum(r // 2 for r, _ in shapes) == len(pairs)                   # every pair exactly once
    longest = {max(len(p["chosen_input_ids"]), len(p["rejected_input_ids"])) for p in pairs}
    for rows_, padded in shapes:
        assert rows_ % 2 == 0 and rows_ // 2 <= batch_size                # batch_size still bounds pairs
        assert rows_ * padded <= budget or (rows_ == 2 and padded in longest)   # over budget: one pair alone
    assert [r["id"] for r in rows] == [p["id"] for p in pairs]           # input order


def test_longest_forward_runs_first_and_an_over_long_pair_runs_alone(caplog):
    pairs = fake_pairs(12, seed=1)
    pairs[5]["chosen_input_ids"] = pairs[5]["chosen_input_ids"] + [3] * 400   # 2 rows x >400 > 600
    pairs[5]["chosen_labels"] = pairs[5]["chosen_labels"] + [3] * 400
    with caplog.at_level("WARNING", logger="avr_core.training.logps"):
        rows, shapes = run(pairs, batch_size=4, token_budget=600)
    assert shapes[0] == (2, len(pairs[5]["chosen_input_ids"]))          # alone, and first: fails in minute one
    assert "1 pair(s) are longer than the token budget" in caplog.text
    assert all(r * t <= 600 for r, t in shapes[1:])


@pytest.mark.parametrize("batch_size,budget", [(4, 1000), (16, 4000)])
def test_batched_results_equal_one_pair_per_forward(batch_size, budget):
    pairs = fake_pairs(30, seed=2)
    batched, shapes = run(pairs, batch_size=batch_size, token_budget=budget)
    alone, alone_shapes = run(pairs, batch_size=1, token_budget=10**9)
    assert len(shapes) < len(alone_shapes) == len(pairs)                  # it really batched
    assert max(r for r, _ in shapes) > 2
    for b, a in zip(batched, alone):
        assert b["id"] == a["id"] and (b["n_chosen"], b["n_rejected"]) == (a["n_chosen"], a["n_rejected"])
        assert b["ref_chosen"] == pytest.approx(a["ref_chosen"], abs=1e-5, rel=1e-6)
        assert b["ref_rejected"] == pytest.approx(a["ref_rejected"], abs=1e-5, rel=1e-6)


def reference_sequence_logps(logits, labels):
    """The former implementation: cross-entropy over a full float32 copy."""
    labels, logits = labels[:, 1:], logits[:, :-1, :]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view(labels.shape)
    mask = labels != IGNORE
    return -(nll * mask).sum(-1), mask.sum(-1)


def labels_for(B, T, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 4] = IGNORE                 # prompt
    labels[-1, T // 2:] = IGNORE                 # a shorter (right-padded) row
    return labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_logps_and_gradients_equal_cross_entropy(chunk):
    B, T, V = 3, 50, 33
    x = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1)) * 4
    labels = labels_for(B, T, V)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    s, n = logps.sequence_logps(a, labels, chunk_tokens=chunk)
    s_ref, n_ref = reference_sequence_logps(b, labels)
    assert torch.equal(n, n_ref) and s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-6)
    (s * torch.tensor([1.0, -2.0, 0.5])).sum().backward()                 # training: gradients flow
    (s_ref * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


class Float32Sizes(TorchFunctionMode):
    """Records the element count of every float32 tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.sizes.append(t.numel())
        return out


def test_no_float32_copy_larger_than_one_chunk():
    B, T, V, chunk = 4, 60, 40, 8
    x = torch.randn(B, T, V).to(torch.bfloat16)                            # a model's bf16 logits
    labels = labels_for(B, T, V)
    with torch.no_grad(), Float32Sizes() as spy:
        s, _ = logps.sequence_logps(x, labels, chunk_tokens=chunk)
    assert spy.sizes and max(spy.sizes) <= chunk * V < B * (T - 1) * V
    torch.testing.assert_close(s, reference_sequence_logps(x, labels)[0], atol=1e-4, rtol=1e-6)


def test_compute_reference_logps_on_a_real_model_respects_the_budget(tiny_llama, tok, monkeypatch):
    from avr_core.training.data import tokenize_pairs

    from .conftest import pair_rows

    pairs, _ = tokenize_pairs(pair_rows(4), tok, 512)
    shapes = []
    real = logps.pair_logps
    monkeypatch.setattr(logps, "pair_logps", lambda m, b: shapes.append(tuple(b["input_ids"].shape)) or real(m, b))
    budget = 2 * max(len(p["chosen_input_ids"]) for p in pairs) * 2        # about 2 pairs a forward
    small = logps.compute_reference_logps(tiny_llama, pairs, batch_size=4, token_budget=budget)
    assert all(r * t <= budget for r, t in shapes) and len(shapes) >= 2
    shapes.clear()
    one = logps.compute_reference_logps(tiny_llama, pairs, batch_size=1)
    assert len(shapes) == 4
    for a, b in zip(small, one):
        assert a["id"] == b["id"]
        assert (a["ref_chosen"], a["ref_rejected"]) == pytest.approx((b["ref_chosen"], b["ref_rejected"]), abs=1e-4)
