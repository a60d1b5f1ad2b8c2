"""Tokenisation for the training recipe: chat template, loss mask, truncation counts, padding.

Two row formats come from the select stage (docs/DESIGN.md step 5):

    RSFT row:  {"id": "p1", "messages": [{"role": "user", "content": "2+2?"},
                                         {"role": "assistant", "content": "5"}, ...]}
    pair row:  {"id": "p1#r", "prompt": [{"role": "user", "content": "2+2?"}, ...],
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}], "reward_margin": 0.7}

The loss covers assistant turns only: each assistant's content plus the template's
end-of-turn marker (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`), so the model learns to stop.
Everything else -- system, user turns, the `<|im_start|>assistant\\n` header, the newline the
template writes after the marker -- has label -100.

Where an assistant turn starts and ends is found by rendering PREFIXES of the conversation
with the model's own chat template (`messages[:i]` with the generation prompt, `messages[:i+1]`
without), so no template-specific string is hard-coded. Each piece of text is then tokenised
on its own and the ids concatenated: the boundary between prompt and answer is always a token
boundary, as it is at inference, where the answer is generated after the tokenised prompt.

Nothing is cut silently: every function returns counts
`{"kept": ..., "truncated": ..., "dropped_too_long": ...}`.
"""
from __future__ import annotations

from typing import Any

from avr_core.backends.base import inert_control_tokens

IGNORE = -100
_PROBE = "AVR-PROBE-7f3a"   # an assistant content that no template will rewrite


# ---------------------------------------------------------------- chat-template spans

def _render(tok, messages: list[dict], generation_prompt: bool = False) -> str:
    # quoted role tags stay text (as at inference: avr_core.backends.base.inert_control_tokens)
    return tok.apply_chat_template(inert_control_tokens(messages), tokenize=False,
                                   add_generation_prompt=generation_prompt)


def end_of_turn(tok) -> tuple[str, str]:
    """(marker, suffix): what the template writes after an assistant's content.

    >>> end_of_turn(smollm2_tokenizer)      # ChatML     # doctest: +SKIP
    ('<|im_end|>', '<|im_end|>\\n')
    >>> end_of_turn(llama3_tokenizer)       # Llama-3    # doctest: +SKIP
    ('<|eot_id|>', '<|eot_id|>')

    The marker (suffix without trailing whitespace) is trained on; the whitespace is not.
    """
    text = _render(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}])
    at = text.rfind(_PROBE)
    if at < 0:
        raise ValueError("the chat template does not render assistant contents verbatim; "
                         "cannot locate assistant turns")
    suffix = text[at + len(_PROBE):]
    return suffix.rstrip(), suffix


def assistant_segments(tok, messages: list[dict], last_turn_only: bool = False,
                       eot: tuple[str, str] | None = None) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into consecutive pieces of text, each flagged trained or not.

    >>> assistant_segments(smollm2_tokenizer, [{"role": "user", "content": "2+2?"},
    ...                                        {"role": "assistant", "content": "4"}])  # doctest: +SKIP
    [('<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face'
      '<|im_end|>\\n<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n', False),
     ('4<|im_end|>', True),
     ('\\n', False)]

    "".join(texts) is exactly the template's rendering of the whole conversation.
    `eot` is `end_of_turn(tok)`, computed here when not given.
    """
    marker, suffix = eot or end_of_turn(tok)
    full = _render(tok, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_turn_only:
        turns = turns[-1:]
    cuts: list[tuple[int, int]] = []
    for i in turns:
        start_text = _render(tok, messages[:i], generation_prompt=True)
        end_text = _render(tok, messages[:i + 1])
        if not (end_text.startswith(start_text) and full.startswith(end_text)):
            raise ValueError(
                f"chat template is not prefix-stable at assistant turn {i}: rendering the "
                "conversation up to that turn is not a prefix of rendering all of it "
                "(templates that rewrite earlier turns are not supported)")
        if not end_text.endswith(suffix):
            raise ValueError(f"assistant turn {i} does not end with the template's "
                             f"end-of-turn text {suffix!r}")
        content_end = len(end_text) - len(suffix)
        cuts.append((len(start_text), content_end + len(marker)))
    segments: list[tuple[str, bool]] = []
    pos = 0
    for a, b in cuts:
        if a > pos:
            segments.append((full[pos:a], False))
        segments.append((full[a:b], True))
        pos = b
    if pos < len(full):
        segments.append((full[pos:], False))
    return segments


def _ids(tok, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tok(texts, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- row checks

def _check_messages(where: str, messages: Any, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field '{field}' must be a non-empty list of messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: {field}[{j}].role must be system, user or assistant")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"{where}: {field}[{j}].content must be non-empty text")


def _where(k: int, row: dict) -> str:
    return f"row {k} (id={row.get('id')!r})"


# ---------------------------------------------------------------- SFT

def tokenize_sft(rows: list[dict], tok, max_length: int,
                 last_turn_only: bool = False) -> tuple[list[dict], dict]:
    """RSFT rows -> token ids with labels on the assistant turns, plus counts.

    >>> ex, counts = tokenize_sft([{"id": "p1", "messages": [
    ...     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}],
    ...     smollm2_tokenizer, max_length=512)                           # doctest: +SKIP
    >>> tok.decode([t for t, l in zip(ex[0]["input_ids"], ex[0]["labels"]) if l != -100])  # doctest: +SKIP
    '4<|im_end|>'
    >>> counts                                                          # doctest: +SKIP
    {'kept': 1, 'truncated': 0, 'dropped_too_long': 0}

    Longer than max_length: cut on the right and counted as truncated; if the cut leaves no
    trained token the row is dropped and counted as dropped_too_long.
    """
    out: list[dict] = []
    counts = {"kept": 0, "truncated": 0, "dropped_too_long": 0}
    eot = end_of_turn(tok)
    for k, row in enumerate(rows):
        where = _where(k, row)
        if "id" not in row:
            raise ValueError(f"{where}: missing field 'id'")
        _check_messages(where, row.get("messages"), "messages")
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise ValueError(f"{where}: field 'messages' has no assistant turn to train on")
        segs = assistant_segments(tok, row["messages"], last_turn_only, eot)
        input_ids: list[int] = []
        labels: list[int] = []
        for ids, (_, trained) in zip(_ids(tok, [s for s, _ in segs]), segs):
            input_ids += ids
            labels += ids if trained else [IGNORE] * len(ids)
        if len(input_ids) > max_length:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if all(l == IGNORE for l in labels):
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += 1
        counts["kept"] += 1
        out.append({"id": row["id"], "input_ids": input_ids, "labels": labels})
    return out, counts


# ---------------------------------------------------------------- pairs

def tokenize_pairs(rows: list[dict], tok, max_length: int) -> tuple[list[dict], dict]:
    """Preference rows (TRL conversational format) -> chosen / rejected ids and labels.

    prompt     = chat template of row["prompt"] with the generation prompt
    completion = assistant content + end-of-turn marker (e.g. '4<|im_end|>')
    chosen     = prompt + chosen completion; rejected = prompt + rejected completion;
    labels are -100 on the prompt.

    >>> ex, counts = tokenize_pairs([{"id": "p1", "prompt": [{"role": "user", "content": "2+2?"}],
    ...     "chosen": [{"role": "assistant", "content": "4"}],
    ...     "rejected": [{"role": "assistant", "content": "5"}], "reward_margin": 0.7}],
    ...     smollm2_tokenizer, max_length=512)                           # doctest: +SKIP
    >>> sorted(ex[0])                                                   # doctest: +SKIP
    ['chosen_input_ids', 'chosen_labels', 'id', 'prompt_len', 'rejected_input_ids',
     'rejected_labels', 'reward_margin']

    A prompt of max_length tokens or more leaves no room for an answer: the pair is dropped
    and counted (dropped_too_long). Otherwise completions are cut on the right to fit and the
    pair is counted as truncated if either side was cut.
    """
    out: list[dict] = []
    counts = {"kept": 0, "truncated": 0, "dropped_too_long": 0}
    eot = end_of_turn(tok)
    for k, row in enumerate(rows):
        where = _where(k, row)
        if "id" not in row:
            raise ValueError(f"{where}: missing field 'id'")
        _check_messages(where, row.get("prompt"), "prompt")
        texts = {}
        for side in ("chosen", "rejected"):
            _check_messages(where, row.get(side), side)
            if len(row[side]) != 1 or row[side][0]["role"] != "assistant":
                raise ValueError(f"{where}: field '{side}' must be exactly one assistant message")
            segs = assistant_segments(tok, row["prompt"] + row[side], True, eot)
            trained = [i for i, (_, t) in enumerate(segs) if t]
            prompt_text = "".join(s for s, _ in segs[:trained[-1]])
            texts[side] = (prompt_text, segs[trained[-1]][0])
        if texts["chosen"][0] != texts["rejected"][0]:
            raise ValueError(f"{where}: chosen and rejected render different prompts")
        prompt_ids, c_ids, r_ids = _ids(tok, [texts["chosen"][0], texts["chosen"][1], texts["rejected"][1]])
        if len(prompt_ids) >= max_length:
            counts["dropped_too_long"] += 1
            continue
        room = max_length - len(prompt_ids)
        if len(c_ids) > room or len(r_ids) > room:
            counts["truncated"] += 1
        counts["kept"] += 1
        ex = {"id": row["id"], "prompt_len": len(prompt_ids),
              "reward_margin": float(row["reward_margin"]) if row.get("reward_margin") is not None else None}
        for side, ids in (("chosen", c_ids[:room]), ("rejected", r_ids[:room])):
            ex[f"{side}_input_ids"] = prompt_ids + ids
            ex[f"{side}_labels"] = [IGNORE] * len(prompt_ids) + ids
        out.append(ex)
    return out, counts


# ---------------------------------------------------------------- padding

def _pad(seqs: list[list[int]], value: int):
    import torch

    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate_sft(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a micro-batch: {"input_ids", "attention_mask", "labels"} tensors [B, T].

    >>> collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...              {"input_ids": [5, 8], "labels": [-100, 8]}], pad_id=2)   # doctest: +SKIP
    {'input_ids': tensor([[5, 6, 7], [5, 8, 2]]), 'attention_mask': tensor([[1, 1, 1], [1, 1, 0]]),
     'labels': tensor([[-100, 6, 7], [-100, 8, -100]])}
    """
    ids = [e["input_ids"] for e in examples]
    return {"input_ids": _pad(ids, pad_id),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            "labels": _pad([e["labels"] for e in examples], IGNORE)}


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """B pairs -> ONE batch of 2B rows: chosen_1..chosen_B then rejected_1..rejected_B.

    Adds "reward_margin" [B] (0.0 where a row has none) and "ids"; rows [:B] are chosen,
    [B:] rejected, so one forward pass scores both sides.
    """
    import torch

    batch = collate_sft([{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in examples]
                        + [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples],
                        pad_id)
    batch["reward_margin"] = torch.tensor([e.get("reward_margin") or 0.0 for e in examples], dtype=torch.float32)
    batch["ids"] = [e["id"] for e in examples]
    return batch


def pad_id(tok) -> int:
    """The padding id: the tokenizer's pad token, else its eos (padding is masked anyway)."""
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return pid
