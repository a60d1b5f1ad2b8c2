"""transformers backends: the CPU default generator, a Bradley-Terry reward model, and the
LLM-judge scorer for machines with no reward model.

No method imports here: the judge scorer's prompt is the method's (`avr_core.scorers.judge_frame`)
and is passed in as `frame`."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

from tqdm.auto import tqdm

from avr_core.backends.base import BackendStats, Conversation, SamplingParams, inert_control_tokens
from avr_core.backends.device import input_device, load

log = logging.getLogger(__name__)


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if trust_remote_code:   # every HF model here (generator, reward model, judge scorer) loads through this
        log.warning("trust_remote_code is ON for %s: its repository code will run", path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"  # decoder-only batches: pad on the left so generation continues the text
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def render(tok, conv: Conversation) -> str:
    """Chat template text; a trailing assistant turn is continued, not closed."""
    conv = inert_control_tokens(conv)   # quoted role tags stay text: no injected turns
    if conv and conv[-1]["role"] == "assistant":
        return tok.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    return tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def _by_length(texts: Sequence, size: int) -> list[list[int]]:
    """Index batches of similar length: less padding, same outputs in input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


class HFGenerator:
    """Batched `model.generate` with chat templates, left padding and n samples per conversation.

    `batch_size` counts sequences per forward pass, so a batch holds batch_size // n conversations.
    """

    def __init__(self, path: str, dtype: str = "float32", batch_size: int = 8, trust_remote_code: bool = False,
                 device: str = "auto", gpus: Sequence[int] = ()):
        import torch
        from transformers import AutoModelForCausalLM

        self.tok = _load_tokenizer(path, trust_remote_code)
        self.model, pl = load(AutoModelForCausalLM, path, dtype, device, gpus, "generator.device",
                              trust_remote_code=trust_remote_code,
                              **attention_kwargs(path, dtype, device, gpus, trust_remote_code))
        self.device, self._in = pl.label, input_device(self.model)   # label: the manifest's; _in: input ids
        self.batch_size = batch_size
        self.stats = BackendStats()
        self._torch = torch

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        torch = self._torch
        self.stats.calls += 1
        texts = [render(self.tok, c) for c in conversations]
        out: list[list[str]] = [[] for _ in texts]
        per_batch = max(1, self.batch_size // params.n)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sample = params.temperature > 0
        for batch in tqdm(_by_length(texts, per_batch), desc="generate", unit="batch", leave=False):
            enc = self.tok([texts[i] for i in batch], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(self._in)
            with torch.inference_mode():
                gen = self.model.generate(
                    **enc, do_sample=sample, max_new_tokens=params.max_new_tokens,
                    num_return_sequences=params.n, pad_token_id=self.tok.pad_token_id,
                    **({"temperature": params.temperature, "top_p": params.top_p} if sample else {}),
                )
            new = gen[:, enc["input_ids"].shape[1]:]
            lengths = (new != self.tok.pad_token_id).sum(dim=1)
            self.stats.tokens_generated += int(lengths.sum())
            # every new token a real one: the cap stopped it (one that ended exactly at the cap on
            # its end-of-sequence token counts as finished when that token is the pad token)
            self.stats.cut_at_cap += int((lengths >= params.max_new_tokens).sum())
            decoded = self.tok.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(batch):
                out[i] = [d.strip() if not _continues(conversations[i]) else d
                          for d in decoded[j * params.n:(j + 1) * params.n]]
        self.stats.requests += len(texts)
        self.stats.samples += len(texts) * params.n
        return out


def _continues(conv: Conversation) -> bool:
    return bool(conv) and conv[-1]["role"] == "assistant"


class HFRewardScorer:
    """A Bradley-Terry sequence-classification reward model (e.g. Skywork-Reward): the logit of
    the chat-templated conversation is r(x, y). Inputs longer than `max_length` tokens are cut
    on the right (the answer's end is not scored) or, with `over_long="skip"`, not scored (None):
    counted either way (`rm_inputs`)."""

    def __init__(self, path: str, dtype: str = "bfloat16", batch_size: int = 8, max_length: int = 4096,
                 trust_remote_code: bool = False, device: str = "auto", gpus: Sequence[int] = (),
                 over_long: str = "truncate"):
        import torch
        from transformers import AutoModelForSequenceClassification

        self.tok = _load_tokenizer(path, trust_remote_code)
        self.tok.padding_side = "right"
        self.model, pl = load(AutoModelForSequenceClassification, path, dtype, device, gpus, "scorer.device",
                              num_labels=1, trust_remote_code=trust_remote_code,
                              **attention_kwargs(path, dtype, device, gpus, trust_remote_code))
        if self.model.config.pad_token_id is None:
            # transformers pools the last non-pad token, found through config.pad_token_id, and
            # refuses batches > 1 without one: use the id the tokenizer pads with.
            log.warning("%s: the model config has no pad_token_id; using the tokenizer's (%s)", path,
                        self.tok.pad_token_id)
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.device, self._in = pl.label, input_device(self.model)
        self.batch_size, self.max_length, self._torch = batch_size, max_length, torch
        self.over_long = over_long
        self.stats = BackendStats()

    def score(self, conversations: Sequence[Conversation]) -> list[float | None]:
        torch = self._torch
        self.stats.calls += 1
        ids, keep = rm_inputs(self, conversations)
        out = [0.0] * len(ids)
        for batch in tqdm(_by_length(ids, self.batch_size), desc="rm_score", unit="batch", leave=False):
            x, mask = _pad_right([ids[i] for i in batch], self.model.config.pad_token_id, torch)
            with torch.inference_mode():
                logits = self.model(input_ids=x.to(self._in), attention_mask=mask.to(self._in)).logits[:, 0]
            logits = logits.float().cpu()
            for j, i in enumerate(batch):
                out[i] = float(logits[j])
        self.stats.requests += len(ids)
        return place(out, keep, len(conversations))


def _pad_right(rows: list[list[int]], pad_id: int, torch):
    """(input_ids, attention_mask) of `rows` padded on the right to the longest."""
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        x[j, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, :len(r)] = 1
    return x, mask


def rm_token_ids(tok, conversations: Sequence[Conversation], max_length: int) -> tuple[list[list[int]], int]:
    """(token ids of each chat-templated conversation cut on the right at `max_length`, how many
    were cut): a reward model's input, the same for `HFRewardScorer` and `vllm_rm`. No special
    tokens are added: the template has them."""
    full = rm_full_ids(tok, conversations)
    return [list(x[:max_length]) for x in full], sum(len(x) > max_length for x in full)


def rm_full_ids(tok, conversations: Sequence[Conversation]) -> list[list[int]]:
    """Token ids of each chat-templated conversation, uncut."""
    texts = [tok.apply_chat_template(inert_control_tokens(c), tokenize=False) for c in conversations]
    return tok(texts, add_special_tokens=False)["input_ids"]


def rm_inputs(scorer, conversations: Sequence[Conversation]) -> tuple[list[list[int]], list[int]]:
    """(token ids to score, the position of each in `conversations`) for a reward model with
    `tok`, `max_length`, `over_long` and `stats`. An input over `max_length` tokens is cut on the
    right and scored (`over_long="truncate"`, counted `stats.truncated_inputs`), or left out
    (`"skip"`, counted `stats.skipped_inputs`; the caller's score for it is None): the first
    time either happens, a warning says so."""
    full = rm_full_ids(scorer.tok, conversations)
    over = [i for i, x in enumerate(full) if len(x) > scorer.max_length]
    skip = getattr(scorer, "over_long", "truncate") == "skip"
    if over:
        key = "skipped_inputs" if skip else "truncated_inputs"
        setattr(scorer.stats, key, getattr(scorer.stats, key) + len(over))
        if not getattr(scorer, "_warned_over_long", False):
            scorer._warned_over_long = True
            log.warning("%d reward-model input(s) longer than max_length=%d tokens were %s (scorer.over_long; "
                        "counted in stats.%s; warned once)", len(over), scorer.max_length,
                        "not scored" if skip else "cut on the right", key)
    keep = [i for i in range(len(full)) if not (skip and len(full[i]) > scorer.max_length)]
    return [list(full[i][:scorer.max_length]) for i in keep], keep


def place(scores: Sequence[float], keep: list[int], n: int) -> list[float | None]:
    """`scores` of the inputs at positions `keep` spread over `n` slots; the others None.

    >>> place([1.0, 2.0], [0, 2], 3)
    [1.0, None, 2.0]
    """
    out: list[float | None] = [None] * n
    for i, s in zip(keep, scores):
        out[i] = s
    return out


def attention_kwargs(path: str, dtype: str, device: str, gpus: Sequence[int], trust_remote_code: bool) -> dict:
    """`attn_implementation` for a model whose attention soft-caps its logits (Gemma-2:
    `attn_logit_softcapping`). transformers' default, SDPA, has no soft-cap and would silently
    drop it (the model then scores and generates unlike how it was trained, and unlike vLLM):
    flash_attention_2 (which applies the cap) on CUDA in 16-bit when flash-attn is installed,
    else eager. {} for every other model (the default stays)."""
    import importlib.util

    from transformers import AutoConfig

    from avr_core.backends.device import resolve

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cfg = getattr(cfg, "text_config", None) or cfg
    if getattr(cfg, "attn_logit_softcapping", None) is None:
        return {}
    fa2 = (resolve(device, "device", gpus) != "cpu" and dtype in ("bfloat16", "float16")
           and importlib.util.find_spec("flash_attn") is not None)
    impl = "flash_attention_2" if fa2 else "eager"
    log.info("%s soft-caps attention logits (%s): loading with attn_implementation=%s", path,
             cfg.attn_logit_softcapping, impl)
    return {"attn_implementation": impl}


class JudgeScorer:
    """Expected rating from a causal LM, read off ONE forward pass, no sampling.

    `frame` (the caller's judge prompt; the method passes `avr_core.scorers.judge_frame`) turns
    [x, y] into the conversation the model continues: it ends with an assistant turn that stops
    right before the rating digit (e.g. ``Rating: [[``). The score is sum_k k * p(k) over the
    rating tokens "1".."9" (renormalised; "10" would need a second token and is left out). A
    weak proxy for a trained reward model -- on the 135M embedded model it is nearly flat (~5
    for every answer, see docs/ENVIRONMENT.md "Embedded model") -- for machines that have none.

    >>> JudgeScorer(path, frame=judge_frame).score([[{"role": "user", "content": "2+2?"},
    ...                                              {"role": "assistant", "content": "4"}]])  # doctest: +SKIP
    [5.07]
    """

    def __init__(self, path: str, dtype: str = "float32", batch_size: int = 8, max_length: int = 4096,
                 trust_remote_code: bool = False, frame: Callable[[Conversation], Conversation] | None = None,
                 device: str = "auto", gpus: Sequence[int] = ()):
        import torch
        from transformers import AutoModelForCausalLM

        self.tok = _load_tokenizer(path, trust_remote_code)
        self.model, pl = load(AutoModelForCausalLM, path, dtype, device, gpus, "scorer.device",
                              trust_remote_code=trust_remote_code,
                              **attention_kwargs(path, dtype, device, gpus, trust_remote_code))
        self.device, self._in = pl.label, input_device(self.model)
        self.batch_size, self.max_length, self._torch = batch_size, max_length, torch
        self.rating_ids = [self.tok.convert_tokens_to_ids(str(k)) for k in range(1, 10)]
        self.frame = frame
        self.stats = BackendStats()

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        """One expected rating per conversation [x, ..., y], framed by `frame`."""
        if self.frame is None:
            raise ValueError("JudgeScorer has no judge prompt: build it with avr_core.scorers.make_scorer "
                             "(or pass frame=avr_core.scorers.judge_frame)")
        return self.expected_rating([self.frame(c) for c in conversations])

    def expected_rating(self, conversations: Sequence[Conversation]) -> list[float]:
        """sum_k k * p(next token = "k"), k = 1..9, after each conversation as given (its last
        assistant turn is continued)."""
        torch = self._torch
        self.stats.calls += 1
        texts = [render(self.tok, c) for c in conversations]
        out = [0.0] * len(texts)
        weights = torch.arange(1, 10, dtype=torch.float32)
        for batch in tqdm(_by_length(texts, self.batch_size), desc="judge_score", unit="batch", leave=False):
            # left padding + truncation from the left keeps the rating position at the end
            self.tok.truncation_side = "left"
            enc = self.tok([texts[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                           max_length=self.max_length, add_special_tokens=False).to(self._in)
            with torch.inference_mode():
                last = self.model(**enc).logits[:, -1, :].float().cpu()
            probs = torch.softmax(last[:, self.rating_ids], dim=-1)
            for j, i in enumerate(batch):
                out[i] = float((probs[j] * weights).sum())
        self.stats.requests += len(texts)
        return out
