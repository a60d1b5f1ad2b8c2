"""Chat-template tokenisation: the loss mask covers exactly the assistant turns (+ end token)."""
import pytest

from avr_core.training.data import (
    IGNORE,
    assistant_segments,
    collate_pairs,
    collate_sft,
    end_of_turn,
    tokenize_pairs,
    tokenize_sft,
)

from .conftest import conversation, pair_rows, sft_rows

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def trained_text(tok, ex, ids="input_ids", labels="labels"):
    return tok.decode([t for t, l in zip(ex[ids], ex[labels]) if l != IGNORE])


def test_mask_is_exactly_the_assistant_turns(tok):
    msgs = conversation(3)
    (ex,), counts = tokenize_sft([{"id": "a", "messages": msgs}], tok, max_length=1024)
    assistants = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert trained_text(tok, ex) == "".join(a + "<|im_end|>" for a in assistants)
    # the ids are the template's rendering, nothing added or lost
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    assert counts == {"kept": 1, "truncated": 0, "dropped_too_long": 0}


def test_each_trained_run_decodes_to_one_turn(tok):
    msgs = conversation(1)
    (ex,), _ = tokenize_sft([{"id": "a", "messages": msgs}], tok, max_length=1024)
    runs, cur = [], []
    for t, l in zip(ex["input_ids"], ex["labels"]):
        if l != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]


def test_last_turn_only(tok):
    msgs = conversation(2)
    (ex,), _ = tokenize_sft([{"id": "a", "messages": msgs}], tok, max_length=1024, last_turn_only=True)
    assert trained_text(tok, ex) == msgs[-1]["content"] + "<|im_end|>"


def test_llama3_style_template(tok):
    """A template with a different end-of-turn marker, trimming and a BOS: located, not assumed."""
    import copy
    t3 = copy.deepcopy(tok)
    t3.chat_template = LLAMA3_TEMPLATE
    t3.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    assert end_of_turn(t3) == ("<|eot_id|>", "<|eot_id|>")
    msgs = conversation(4)
    msgs[1]["content"] = "  padded answer  "          # the template trims it: we train on what it renders
    (ex,), _ = tokenize_sft([{"id": "a", "messages": msgs}], t3, max_length=1024)
    want = "".join(m["content"].strip() + "<|eot_id|>" for m in msgs if m["role"] == "assistant")
    assert trained_text(t3, ex) == want
    segs = assistant_segments(t3, msgs)
    assert "".join(s for s, _ in segs) == t3.apply_chat_template(msgs, tokenize=False)


def test_truncation_is_counted_and_fully_cut_rows_dropped(tok):
    rows = sft_rows(3)
    (full,), _ = tokenize_sft(rows[:1], tok, max_length=4096)
    n = len(full["input_ids"])
    first_label = next(i for i, l in enumerate(full["labels"]) if l != IGNORE)
    ex, counts = tokenize_sft(rows, tok, max_length=n - 3)
    assert counts == {"kept": 3, "truncated": 3, "dropped_too_long": 0}
    assert all(len(e["input_ids"]) == n - 3 == len(e["labels"]) for e in ex)
    ex, counts = tokenize_sft(rows, tok, max_length=first_label)   # no assistant token survives
    assert ex == [] and counts == {"kept": 0, "truncated": 0, "dropped_too_long": 3}


def test_pairs(tok):
    rows = pair_rows(2)
    ex, counts = tokenize_pairs(rows, tok, max_length=1024)
    assert counts == {"kept": 2, "truncated": 0, "dropped_too_long": 0}
    e = ex[0]
    prompt = tok.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(e["chosen_input_ids"][:e["prompt_len"]]) == prompt
    assert e["chosen_input_ids"][:e["prompt_len"]] == e["rejected_input_ids"][:e["prompt_len"]]
    assert trained_text(tok, e, "chosen_input_ids", "chosen_labels") == rows[0]["chosen"][0]["content"] + "<|im_end|>"
    want = rows[0]["rejected"][0]["content"] + "<|im_end|>"
    assert trained_text(tok, e, "rejected_input_ids", "rejected_labels") == want
    assert e["reward_margin"] == pytest.approx(0.5)


def test_pair_truncation_and_long_prompt_dropped(tok):
    rows = pair_rows(2)
    rows[1]["prompt"][0]["content"] = "word " * 300
    ex, counts = tokenize_pairs(rows, tok, max_length=40)
    assert counts == {"kept": 1, "truncated": 1, "dropped_too_long": 1}
    assert [e["id"] for e in ex] == ["p0"]
    assert len(ex[0]["rejected_input_ids"]) == 40


def test_bad_rows_name_the_row_and_field(tok):
    with pytest.raises(ValueError, match=r"row 0 \(id='x'\): messages\[1\].content"):
        tokenize_sft([{"id": "x", "messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": " "}]}], tok, 64)
    bad = pair_rows(1)
    bad[0]["chosen"] = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="'chosen' must be exactly one assistant message"):
        tokenize_pairs(bad, tok, 64)


def test_collators_pad_right_and_mask(tok):
    b = collate_sft([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                     {"input_ids": [5, 8], "labels": [IGNORE, 8]}], 2)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 8, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 8, IGNORE]]
    ex, _ = tokenize_pairs(pair_rows(2), tok, 1024)
    p = collate_pairs(ex, 2)
    assert p["input_ids"].shape[0] == 4 and p["ids"] == ["p0", "p1"]
    assert p["input_ids"][0, :len(ex[0]["chosen_input_ids"])].tolist() == ex[0]["chosen_input_ids"]
    assert p["input_ids"][2, :len(ex[0]["rejected_input_ids"])].tolist() == ex[0]["rejected_input_ids"]
    assert p["reward_margin"].tolist() == pytest.approx([0.5, 0.6])
