"""transformers backends: the CPU default generator, a Bradley-Terry reward model, and the
LLM-judge scorer for machines with no reward model.

No method imports here: the judge scorer's prompt is the method's (`avr_core.scorers.judge_frame`)
and is passed in as `frame`."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

from tqdm.auto import tqdm

from avr_core.backends.base import (
    BackendKind,
    BackendStats,
    Conversation,
    SamplingParams,
    ScorerKind,
    device_args,
    inert_control_tokens,
)
from avr_core.backends.device import DTYPE_BYTES, input_device, load, resolve

log = logging.getLogger(__name__)


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_dtype(dtype: str, device: str = "auto", gpus: Sequence[int] = (), key: str = "scorer.device") -> str:
    """`dtype` as the model will load: "auto" follows the accelerator the device setting resolves
    to -- bfloat16 on a GPU (half float32's memory: a 27B reward model is 54 GB, not 108 GB, and
    the dtype such models are trained and served in), float32 on the CPU (16-bit matmuls are
    slow on most processors, and the CPU runs and tests are float32). Resolved here, at load,
    so the config keeps the string "auto": the same config runs on either machine.

    >>> resolve_dtype("float16", "cpu"), resolve_dtype("auto", "cpu")
    ('float16', 'float32')
    """
    if dtype != "auto":
        return dtype
    return "float32" if resolve(device, key, gpus) == "cpu" else "bfloat16"


def free_accelerator_for(role: str, what: str, device: str, key: str, gpus: Sequence[int] = ()) -> str:
    """Before a model loads in this process outside the backend factory (the local alpaca-eval
    judge): on CUDA the factory's engines are suspended first (`backends.suspend`: kept ones
    sleep, the rest close), so the model loads into memory known to be free instead of
    squeezing beside kept engines or failing with DeviceError. On the CPU nothing is needed: host
    memory is not an accelerator. One log line says what was done. Returns the resolved device."""
    where = resolve(device, key, gpus)
    if where == "cpu":
        return where
    from avr_core import backends

    done = backends.suspend()
    log.info("%s: engines for the %s (loads on %s into freed memory): %s", role, what, where,
             ", ".join(done) or "none were held")
    return where


def _placed(role: str, kind: str, path: str, label: str, dtype: str, asked: str) -> None:
    """One line saying where an HF model of the factory went and in which dtype (the factory's
    `_make_room` freed that device of other roles' engines before the load)."""
    how = f"{dtype} (dtype auto: follows the device)" if asked == "auto" else dtype
    log.info("%s (%s): %s loaded on %s in %s", role, kind, path, label, how)


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


class HFGenerator(BackendKind):
    """Batched `model.generate` with chat templates, left padding and n samples per conversation.

    `batch_size` counts sequences per forward pass, so a batch holds batch_size // n conversations.
    """

    needs_token_cap = True      # `generate` takes a number: max_new_tokens null is the context length

    @classmethod
    def from_config(cls, path, model, backend, frame=None):
        return cls(path, model["dtype"], backend["batch_size"], model["trust_remote_code"], **device_args(backend))

    def __init__(self, path: str, dtype: str = "float32", batch_size: int = 8, trust_remote_code: bool = False,
                 device: str = "auto", gpus: Sequence[int] = ()):
        import torch
        from transformers import AutoModelForCausalLM

        self.tok = _load_tokenizer(path, trust_remote_code)
        dtype = resolve_dtype(dtype, device, gpus, "generator.device")
        self.model, pl = load(AutoModelForCausalLM, path, dtype, device, gpus, "generator.device",
                              trust_remote_code=trust_remote_code,
                              **attention_kwargs(path, dtype, device, gpus, trust_remote_code))
        self.device, self._in = pl.label, input_device(self.model)   # label: the manifest's; _in: input ids
        self.batch_size = batch_size
        self.stats = BackendStats()
        self.streamer = None    # a transformers streamer for one-conversation, n=1 calls (`avr chat` streams)
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
                    streamer=self.streamer if len(texts) == 1 and params.n == 1 else None,
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


class HFRewardScorer(ScorerKind):
    """A Bradley-Terry sequence-classification reward model (e.g. Skywork-Reward): the logit of
    the chat-templated conversation is r(x, y). Inputs longer than `max_length` tokens are cut
    on the right (the answer's end is not scored) or, with `over_long="skip"`, not scored (None):
    counted either way (`rm_inputs`)."""

    takes_over_long = True

    def __init__(self, path: str, dtype: str = "auto", batch_size: int = 8, max_length: int = 4096,
                 trust_remote_code: bool = False, device: str = "auto", gpus: Sequence[int] = (),
                 over_long: str = "truncate"):
        import torch
        from transformers import AutoModelForSequenceClassification

        self.tok = _load_tokenizer(path, trust_remote_code)
        self.tok.padding_side = "right"
        self.dtype = resolve_dtype(dtype, device, gpus)
        attn = attention_kwargs(path, self.dtype, device, gpus, trust_remote_code, max_length, batch_size)
        self.model, pl = load(AutoModelForSequenceClassification, path, self.dtype, device, gpus, "scorer.device",
                              num_labels=1, trust_remote_code=trust_remote_code, **attn)
        _placed("scorer", "hf_rm", path, pl.label, self.dtype, dtype)
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


def attention_kwargs(path: str, dtype: str, device: str, gpus: Sequence[int], trust_remote_code: bool,
                     max_length: int | None = None, batch_size: int = 1) -> dict:
    """`attn_implementation` for a model whose attention soft-caps its logits (Gemma-2:
    `attn_logit_softcapping`); {} for every other model (the default stays). See
    `softcap_attention`."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    on_gpu = resolve(device, "device", gpus) != "cpu"
    return softcap_attention(cfg, path, dtype, on_gpu, max_length, batch_size)


def softcap_attention(cfg, path: str, dtype: str, on_gpu: bool, max_length: int | None = None,
                      batch_size: int = 1) -> dict:
    """transformers' default attention, SDPA, has no soft-cap and would silently drop it (the
    model then scores and generates unlike how it was trained, and unlike vLLM): a soft-capped
    model loads with flash_attention_2 (which applies the cap) on CUDA in 16-bit when flash-attn
    is installed, else eager. Eager materialises every T x T attention matrix, so one line says
    which it is and, at `max_length`, what that costs (`eager_attention_line`): the 3 a.m. OOM
    at 8192 tokens is then explained before it happens."""
    import importlib.util

    cfg = getattr(cfg, "text_config", None) or cfg
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap is None:
        return {}
    why = _why_eager(on_gpu, dtype, importlib.util.find_spec("flash_attn") is not None)
    if why is None:
        log.info("%s soft-caps attention logits (%s): attn_implementation=flash_attention_2 "
                 "(no T x T matrix is held)", path, cap)
        return {"attn_implementation": "flash_attention_2"}
    cost = "" if max_length is None else "; " + eager_attention_line(cfg, dtype, max_length, batch_size)
    if on_gpu:     # where it can run out of memory: what to change
        cost += " -- install flash-attn, or lower batch_size / max_length"
    (log.warning if on_gpu else log.info)("%s soft-caps attention logits (%s): attn_implementation=eager (%s)%s",
                                          path, cap, why, cost)
    return {"attn_implementation": "eager"}


def _why_eager(on_gpu: bool, dtype: str, flash_attn: bool) -> str | None:
    """Why a soft-capped model cannot use flash_attention_2 here, or None when it can."""
    if not on_gpu:
        return "the CPU"
    if dtype not in ("bfloat16", "float16"):
        return f"{dtype}: flash-attn needs 16-bit"
    return None if flash_attn else "flash-attn is not installed"


def eager_attention_line(cfg, dtype: str, tokens: int, batch: int = 1) -> str:
    """Transient memory of eager attention's T x T scores in ONE layer at `tokens`: batch x heads
    x T^2 x bytes per element (layers run one after another, so it is not multiplied by the
    layer count). The softmax upcasts to float32 and casts back while its input is still held,
    so the peak is about 8 B per element: bytes + 4 (+ bytes for the cast back from 16-bit), 4x
    the scores in bfloat16, 2x in float32 (transformers' Gemma-2 `eager_attention_forward`).

    >>> from types import SimpleNamespace
    >>> line = eager_attention_line(SimpleNamespace(num_attention_heads=32), "bfloat16", 8192)  # Gemma-2-27B
    >>> line[:line.index(" per layer")]
    'eager at max_length 8192: 1 x 32 heads x 8192^2 x 2 B = 4.3 GB'
    """
    heads, b = int(cfg.num_attention_heads), DTYPE_BYTES.get(dtype, 4)
    per_seq = heads * tokens * tokens * b
    peak_per_elem = b + 4 + (b if b < 4 else 0)
    return (f"eager at max_length {tokens}: {batch} x {heads} heads x {tokens}^2 x {b} B = "
            f"{batch * per_seq / 1e9:.1f} GB per layer, transient ({per_seq / 1e9:.1f} GB per sequence; "
            f"~{batch * per_seq * peak_per_elem / b / 1e9:.1f} GB at the float32 softmax)")


class JudgeScorer(ScorerKind):
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

    takes_frame = True

    def __init__(self, path: str, dtype: str = "auto", batch_size: int = 8, max_length: int = 4096,
                 trust_remote_code: bool = False, frame: Callable[[Conversation], Conversation] | None = None,
                 device: str = "auto", gpus: Sequence[int] = ()):
        import torch
        from transformers import AutoModelForCausalLM

        self.tok = _load_tokenizer(path, trust_remote_code)
        self.dtype = resolve_dtype(dtype, device, gpus)
        attn = attention_kwargs(path, self.dtype, device, gpus, trust_remote_code, max_length, batch_size)
        self.model, pl = load(AutoModelForCausalLM, path, self.dtype, device, gpus, "scorer.device",
                              trust_remote_code=trust_remote_code, **attn)
        _placed("scorer", "judge", path, pl.label, self.dtype, dtype)
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
