"""The DeepSpeed recipe on CPU (gloo, one process) with a tiny random Llama: losses, reference
log-probs read not recomputed, exact resume, and a loadable Hugging Face output directory."""
import json
import math

import pytest

from avr_core.training import logps
from avr_core.training.data import tokenize_pairs
from avr_core.training.recipe import train

from .conftest import pair_rows, sft_rows

pytestmark = [pytest.mark.slow,   # DeepSpeed training steps, seconds each
              pytest.mark.filterwarnings("ignore::FutureWarning")]   # deepspeed calls deprecated c10d names


def losses(out_dir):
    return [json.loads(l)["loss"] for l in open(f"{out_dir}/metrics.jsonl")]


def cfg(**kw):
    base = dict(loss="sft", lr=1e-3, epochs=20, step_cap=6, micro_batch_size=2, grad_accum=2,
                zero_stage=2, checkpoint_every=2, warmup_ratio=0.2, max_length=512)
    return {**base, **kw}


def test_sft_loss_decreases_on_a_repeated_example(tiny_llama, tmp_path):
    rows = [dict(sft_rows(1)[0], id=f"s{i}") for i in range(4)]
    s = train(tiny_llama, rows, cfg(lr=3e-3, warmup_ratio=0.0), tmp_path / "m", tmp_path / "c", progress=False)
    seq = losses(tmp_path / "m")
    assert s["steps"] == 6 and len(seq) == 6
    assert seq[-1] < seq[0] - 0.5 and all(b < a for a, b in zip(seq, seq[1:]))
    assert s["tokenize"] == {"kept": 4, "truncated": 0, "dropped_too_long": 0}
    rows0 = json.loads(open(tmp_path / "m" / "metrics.jsonl").readline())
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows0)


def test_in_process_training_leaves_no_distributed_variables(tiny_llama, tmp_path, monkeypatch):
    import os
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    train(tiny_llama, sft_rows(2), cfg(step_cap=1, zero_stage=0), tmp_path / "m", tmp_path / "c", progress=False)
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)   # a child process must not inherit them


@pytest.fixture(scope="module")
def pairs_and_refs(tiny_llama, tok):
    rows = pair_rows(4)
    pairs, _ = tokenize_pairs(rows, tok, 512)
    return rows, logps.ref_logps_by_id(logps.compute_reference_logps(tiny_llama, pairs, batch_size=2))


def test_dpo_starts_at_ln2_and_never_runs_the_reference(tiny_llama, tmp_path, pairs_and_refs):
    rows, refs = pairs_and_refs
    before = logps.REFERENCE_FORWARDS
    s = train(tiny_llama, rows, cfg(loss="dpo", lr=1e-3, step_cap=3), tmp_path / "m", tmp_path / "c",
              ref_logps=refs, progress=False)
    assert logps.REFERENCE_FORWARDS == before                 # zero reference forwards in training
    m = [json.loads(l) for l in open(tmp_path / "m" / "metrics.jsonl")]
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert m[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    for k in ("reward_accuracy", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"):
        assert k in m[0]
    assert m[-1]["reward_margin"] > 0 and s["steps"] == 3


@pytest.mark.parametrize("loss", ["ipo", "simpo", "rm_margin"])
def test_other_preference_losses_train(tiny_llama, tmp_path, pairs_and_refs, loss):
    rows, refs = pairs_and_refs
    s = train(tiny_llama, rows, cfg(loss=loss, step_cap=2, zero_stage=0), tmp_path / "m", tmp_path / "c",
              ref_logps=None if loss == "simpo" else refs, progress=False)
    assert s["steps"] == 2 and math.isfinite(s["final_loss"])


def test_missing_reference_logps_is_an_error(tiny_llama, tmp_path, pairs_and_refs):
    rows, refs = pairs_and_refs
    with pytest.raises(ValueError, match="needs reference log-probs"):
        train(tiny_llama, rows, cfg(loss="dpo"), tmp_path / "m", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="no entry for 1 pair"):
        train(tiny_llama, rows, cfg(loss="dpo"), tmp_path / "m", tmp_path / "c",
              ref_logps={k: v for k, v in refs.items() if k != "p3"}, progress=False)
    with pytest.raises(ValueError, match="unknown training config keys"):
        train(tiny_llama, rows, cfg(loss="dpo", betta=1), tmp_path / "m", tmp_path / "c", progress=False)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_exact_resume_6_vs_3_plus_3(tiny_llama, tmp_path, pairs_and_refs, zero_stage):
    """6 steps in one go == 3 steps, stop, a NEW call that resumes and runs to 6."""
    rows, refs = pairs_and_refs
    c = cfg(loss="dpo", zero_stage=zero_stage, micro_batch_size=1, checkpoint_every=2)
    one = train(tiny_llama, rows, c, tmp_path / "a", tmp_path / "ca", ref_logps=refs, progress=False)
    first = train(tiny_llama, rows, {**c, "step_cap": 3}, tmp_path / "b", tmp_path / "cb",
                  ref_logps=refs, progress=False)
    again = train(tiny_llama, rows, c, tmp_path / "b", tmp_path / "cb", ref_logps=refs, progress=False)
    assert (one["resumed_from"], first["steps"], again["resumed_from"], again["steps"]) == (None, 3, 3, 6)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"\nZeRO-{zero_stage} 6 vs 3+3 steps: max |diff| = {diff:.3g}")
    assert diff <= 1e-5
    assert len(set(round(x, 6) for x in a)) == 6           # the losses do move: a real comparison
    from safetensors.torch import load_file
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(wa[k].equal(wb[k]) for k in wa)             # and the final weights are identical
    committed = (tmp_path / "cb" / "LATEST").read_text()
    assert committed == "step-000006" and sorted(p.name for p in (tmp_path / "cb").glob("step-*")) == [
        "step-000004", "step-000006"]                      # keep_last=2


def test_checkpoint_of_another_run_is_refused(tiny_llama, tmp_path):
    train(tiny_llama, sft_rows(4), cfg(step_cap=1), tmp_path / "m", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"different run \(differs in \['lr'\]\)"):
        train(tiny_llama, sft_rows(4), cfg(step_cap=2, lr=1.0), tmp_path / "m", tmp_path / "c", progress=False)


def test_output_is_a_loadable_hf_model_that_generates(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = train(tiny_llama, sft_rows(4), cfg(step_cap=2, zero_stage=3), tmp_path / "m", tmp_path / "c", progress=False)
    out = tmp_path / "m"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "metrics.jsonl",
            "train_summary.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # no temp dirs left
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4
    trained = model.state_dict()["model.embed_tokens.weight"]
    start = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()["model.embed_tokens.weight"]
    assert not torch.equal(trained, start)                                         # the weights moved
    assert json.loads((out / "train_summary.json").read_text())["steps"] == s["steps"] == 2
