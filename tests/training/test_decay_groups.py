"""Weight-decay groups (issue 32 item 4, review F10): chosen by parameter name and the model's own
shape, so ZeRO-3, whose parameters are partitioned as they load (every `p` an empty 1-D
placeholder), gets the same groups as ZeRO-2: biases and norm weights undecayed, the rest decayed."""
import pytest
import torch

from avr_core.config import TrainConfig
from avr_core.training import recipe

WD = 0.1


def tiny_llama_with_biases():
    """A random Llama with attention and MLP biases, so both kinds of exempt parameter exist."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                        mlp_bias=True, tie_word_embeddings=True))


def expected_exempt(name: str) -> bool:
    return name.endswith(".bias") or "norm" in name


def groups_by_name(model, weight_decay=WD) -> dict[float, set[str]]:
    """{weight_decay: {parameter names}} of `decay_groups`, names mapped back through identity."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[float, set[str]] = {}
    for g in recipe.decay_groups(model, weight_decay):
        out.setdefault(g["weight_decay"], set()).update(names[id(p)] for p in g["params"])
    return out


def check(groups: dict[float, set[str]], all_names: list[str]) -> None:
    assert set(groups) == {WD, 0.0}
    assert groups[0.0] == {n for n in all_names if expected_exempt(n)}
    assert groups[WD] == {n for n in all_names if not expected_exempt(n)}
    assert any(n.endswith(".bias") for n in groups[0.0]) and any("layernorm" in n for n in groups[0.0])
    assert "model.norm.weight" in groups[0.0] and "model.embed_tokens.weight" in groups[WD]
    assert "model.layers.1.mlp.down_proj.weight" in groups[WD]


def test_groups_by_name_not_by_the_local_shard_shape():
    model = tiny_llama_with_biases()
    names = [n for n, _ in model.named_parameters()]
    unpartitioned = groups_by_name(model)
    check(unpartitioned, names)
    for p in model.parameters():        # what deepspeed.zero.Init leaves: an empty 1-D tensor, real shape aside
        p.ds_shape = p.shape
        p.data = torch.empty(0, dtype=p.dtype)
    assert groups_by_name(model) == unpartitioned


def test_frozen_parameters_and_empty_groups_are_left_out():
    model = tiny_llama_with_biases()
    for n, p in model.named_parameters():
        p.requires_grad_(not expected_exempt(n))
    groups = recipe.decay_groups(model, WD)
    assert [g["weight_decay"] for g in groups] == [WD]
    assert len(groups[0]["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,exempt", [("transformer.h.0.ln_1.weight", True), ("bert.LayerNorm.weight", True),
                                         ("model.layers.0.self_attn.q_norm.weight", True),
                                         ("transformer.h.0.attn.c_attn.bias", True),
                                         ("model.layers.0.self_attn.o_proj.weight", False),
                                         ("lm_head.weight", False)])
def test_names(name, exempt):
    assert recipe.no_decay(name, torch.empty(4, 4)) is exempt


@pytest.mark.slow   # ~3 s here, but it starts a DeepSpeed process group in this process, as the other DS tests do
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_same_groups_reach_adamw_under_zero2_and_zero3(tmp_path, monkeypatch):
    """The real path: `_load_model` (ZeRO-3 partitions at load) then `_engine` (deepspeed.initialize),
    with an AdamW spy recording the groups the optimizer is built with."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from avr_core.training import dist

    tiny_llama_with_biases().save_pretrained(tmp_path / "m")
    seen: dict[int, dict[float, set[str]]] = {}

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kw):
            groups = [dict(g) for g in params]
            by_id = {id(p): n for n, p in model.named_parameters()}
            seen[stage] = {g["weight_decay"]: {by_id[id(p)] for p in g["params"]} for g in groups}
            super().__init__(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    with dist.session():
        for stage in (2, 3):
            cfg = TrainConfig(zero_stage=stage, weight_decay=WD, lr=1e-3)
            dsc = recipe.ds_config(cfg, world=1)
            model, hf_ds = recipe._load_model(str(tmp_path / "m"), cfg, dsc)
            try:
                partitioned = [p for p in model.parameters() if hasattr(p, "ds_shape")]
                assert bool(partitioned) == (stage == 3)
                if stage == 3:    # the trap F10 was about: every local tensor looks 1-D
                    assert all(p.ndim < 2 for p in partitioned)
                names = [n for n, _ in model.named_parameters()]
                engine = recipe._engine(model, cfg, dsc, total=1)
                engine.destroy()
            finally:
                if hf_ds is not None:
                    unset_hf_deepspeed_config()
            check(seen[stage], names)
    assert seen[2] == seen[3]
