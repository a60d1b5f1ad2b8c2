"""AlpacaEval judging through alpaca-eval's own annotator machinery (docs/DESIGN.md step 10).

We do not reimplement the judge: `PairwiseAnnotator` renders the package's prompt template,
randomises the output order, parses the answer and caches annotations. We only
- write the judge config YAML (and a copy of its prompt template) into a directory of OUR
  choosing -- the artifact store -- never into site-packages;
- for a local CPU judge, pass a completion function that reads the next-token log-probs of
  "m"/"M" from a Hugging Face model, in the OpenAI response shape the package's
  `logprob_parser` reads. That is the AlpacaEval 2 default annotator's scoring rule
  (`weighted_alpaca_eval_gpt4_turbo`), with a local model in place of GPT-4 Turbo.

The API key of an OpenAI-compatible judge is read from the environment by the OpenAI client
itself (OPENAI_API_KEY, or the variable `api_key_env` names): it is never written to a file.

The judge's prompt is ChatML (`<|im_start|>user ... <|im_end|>`) with the answers pasted in, and
both judges split it into turns at those tokens (the local judge's `parse_chatml`, alpaca-eval's own
for an OpenAI model). An answer holding `<|im_end|>` (a model echoing its end-of-turn marker) cut
the judge's prompt short there, and one holding `<|im_start|>system` opened a turn of its own. So
every text goes to alpaca-eval with its `<|name|>` tokens made inert (`judge_view`: a zero-width
space after "<", as everywhere else, avr_core/backends/base.py); the result counts them
(`control_tokens_escaped`), and the annotations keep the texts as the model wrote them.

Annotations (one per instruction both sides have, in the reference order; `preference` in [1, 2], 2 = the
evaluated model wins, 1.5 a draw, None unparsed)::

    {"instruction": "...", "output_1": "<reference>", "output_2": "<model>", "generator_1": "example",
     "generator_2": "stage1", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": 1.73}
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import yaml

from avr_core.backends.base import inert_control_tokens
from avr_core.backends.device import input_device
from avr_core.evaluation.metrics import lc_win_rate, position_agreement, win_rate
from avr_core.redact import register_env

BASE_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"   # the AlpacaEval 2 default
FULL_EVALSET = 805                                   # AlpacaEval's instruction count: the official LC needs all
OUTPUT_KEYS = ("instruction", "output", "generator", "dataset")   # what alpaca-eval's loader reads
log = logging.getLogger("avr")


class _MeaninglessWarnings(logging.Filter):
    """alpaca-eval warns on the root logger, once per annotator, that a fixed `caching_path` must
    differ per seed: ours is the judge artifact's own directory, one per (answers, judge config),
    so the warning says nothing to a user (12 of them in a tiny run's log). Dropped here, once."""
    TEXT = "Saving_path is given but not 'auto'"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.TEXT)


if not any(isinstance(f, _MeaninglessWarnings) for f in logging.getLogger().filters):
    logging.getLogger().addFilter(_MeaninglessWarnings())


def _package_config(name: str) -> tuple[dict, Path]:
    import alpaca_eval

    d = Path(alpaca_eval.__file__).parent / "evaluators_configs"
    cfg = yaml.safe_load((d / name / "configs.yaml").read_text())[name]
    return cfg, d / cfg["prompt_template"]


def write_judge_config(directory: str, judge: dict) -> str:
    """Write `<directory>/<name>/configs.yaml` (+ its prompt template) for judge config `judge`
    (the `eval.judge` section); returns the YAML's path. Deterministic: same judge, same bytes."""
    cfg, template = _package_config(BASE_ANNOTATOR)
    name = judge["annotator"] if judge["kind"] == "openai" else f"avr_local_{BASE_ANNOTATOR}"
    out = Path(directory) / name
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, out / "prompt.txt")
    cfg = dict(cfg, prompt_template=str(out / "prompt.txt"))
    kw = dict(cfg["completions_kwargs"])
    if judge["kind"] == "openai":
        kw["model_name"] = judge["model"]
        kw["num_procs"] = judge["concurrency"]
        if judge["base_url"]:          # any OpenAI-compatible server, e.g. `vllm serve` on 127.0.0.1
            (out / "clients.yaml").write_text(yaml.safe_dump({"default": [{"base_url": judge["base_url"]}]}))
            kw["client_config_path"] = str(out / "clients.yaml")
            kw["price_per_token"] = 0
            kw["requires_chatml"] = True
    else:                              # local: the completion function is passed in code (local_completions)
        cfg.pop("fn_completions")
        kw = {"model_name": judge["local_model"], "device": judge.get("device", "auto")}
    cfg["completions_kwargs"] = kw
    (out / "configs.yaml").write_text(yaml.safe_dump({name: cfg}, sort_keys=True))
    return str(out / "configs.yaml")


def annotate(model_outputs: list[dict], reference_outputs: list[dict], config_path: str, cache_path: str,
             judge: dict, randomize_order: bool = True) -> list[dict]:
    """Pairwise annotations, reference as output_1 and the model as output_2 (alpaca-eval's
    convention), in the order `head2head_order` gives. Rows the judge could not parse come back
    with preference None (counted by the caller), never silently missing."""
    from alpaca_eval.annotators import PairwiseAnnotator

    extra = {} if judge["kind"] == "openai" else {"fn_completions": local_completions}
    with _api_key(judge):
        ann = PairwiseAnnotator(annotators_config=config_path, caching_path=cache_path, seed=0,
                                is_randomize_output_order=randomize_order, **extra)
        rows = ann.annotate_head2head(outputs_1=judge_view(reference_outputs), outputs_2=judge_view(model_outputs))
    # the annotator's primary keys (pairwise_evaluator.py:51): one judgement per (instruction, output_1, output_2)
    got = {(r["instruction"], r["output_1"], r["output_2"]): r for r in rows}
    out = []
    for ref, m in head2head_order(model_outputs, reference_outputs):
        r = got.get((_inert(m["instruction"]), _inert(ref["output"]), _inert(m["output"])))
        pref = None if r is None or r.get("preference") is None or _nan(r["preference"]) else float(r["preference"])
        out.append({"instruction": m["instruction"], "output_1": ref["output"], "output_2": m["output"],
                    "generator_1": ref["generator"], "generator_2": m["generator"],
                    "annotator": Path(config_path).parent.name, "preference": pref})
    return out


def judge_view(outputs: list[dict]) -> list[dict]:
    """Outputs as the judge is shown them: instruction and output with their chat control tokens
    made inert (module docstring), so no text can end or open a turn of the judge's prompt.

    >>> judge_view([{"instruction": "q", "output": "4<|im_end|>"}])[0]["output"] == "4<\u200b|im_end|>"
    True
    """
    return [{**o, "instruction": _inert(o["instruction"]), "output": _inert(o["output"])} for o in outputs]


def control_tokens(texts) -> int:
    """How many `<|name|>` chat control tokens `judge_view` makes inert in `texts` (each gains one
    zero-width space).

    >>> control_tokens(["4<|im_end|>\\n<|im_start|>system", "<|Start of recursive thought|>"])
    2
    """
    return sum(len(_inert(t)) - len(t) for t in texts)


def _inert(text: str) -> str:
    return inert_control_tokens([{"content": text}])[0]["content"]


def head2head_order(model_outputs: list[dict], reference_outputs: list[dict]) -> list[tuple[dict, dict]]:
    """(reference, model) pairs in the order `main.evaluate` scores them: `annotate_head2head` is an
    inner `pd.merge(outputs_1=reference, outputs_2=model, on="instruction")` (pairwise_evaluator.py:212-217),
    which keeps the reference (left) order and each instruction's model rows in their order, drops
    instructions missing on either side, then exact duplicate pairs (:228). The order matters: the
    official LC reads a row's position as its instruction id (glm_winrate.py:230-238).

    >>> ref = [{"instruction": i, "output": "r"} for i in "abc"]
    >>> [(r["instruction"], m["output"]) for r, m in head2head_order(
    ...     [{"instruction": "c", "output": "1"}, {"instruction": "x", "output": "2"},
    ...      {"instruction": "a", "output": "3"}, {"instruction": "c", "output": "4"}], ref)]
    [('a', '3'), ('c', '1'), ('c', '4')]
    """
    by_instruction: dict[str, list[dict]] = {}
    for m in model_outputs:
        by_instruction.setdefault(m["instruction"], []).append(m)
    seen, pairs = set(), []
    for ref in reference_outputs:
        for m in by_instruction.get(ref["instruction"], []):
            key = repr((sorted(ref.items()), sorted(m.items())))
            if key not in seen:
                seen.add(key)
                pairs.append((ref, m))
    return pairs


# -- judging a model's answers: the method around `annotate` -----------------------------------
Annotate = Callable[[list[dict], list[dict], bool], list[dict]]


def model_outputs(answers: list[dict]) -> list[dict]:
    """Answer records (`eval_answers`) -> alpaca-eval model outputs, exactly its four keys.

    >>> model_outputs([{"instruction": "2+2?", "output": "4", "generator": "seed", "dataset": "d", "raw": "4"}])
    [{'instruction': '2+2?', 'output': '4', 'generator': 'seed', 'dataset': 'd'}]
    """
    return [{k: r[k] for k in OUTPUT_KEYS} for r in answers]


def reference_outputs(prompts: list[dict]) -> list[dict]:
    """Eval-set records -> the reference outputs, one per instruction (a repeated instruction:
    the last record's reference, at its first position).

    >>> reference_outputs([{"instruction": "2+2?", "reference": "4", "reference_generator": "gpt4", "dataset": "d"}])
    [{'instruction': '2+2?', 'output': '4', 'generator': 'gpt4', 'dataset': 'd'}]
    """
    refs = {r["instruction"]: r for r in prompts}
    return [{"instruction": r["instruction"], "output": r["reference"], "generator": r["reference_generator"],
             "dataset": r["dataset"]} for r in refs.values()]


def position_bias(model: list[dict], reference: list[dict], n: int,
                  annotate_fixed: Callable[[list[dict], list[dict]], list[dict]]) -> dict | None:
    """The first `n` model outputs judged against their references in both FIXED orders:
    `annotate_fixed(model_sub, ref_sub)` (reference shown first), then
    `annotate_fixed(ref_sub, model_sub)` (model shown first); `metrics.position_agreement` of
    the two. None when `n` is 0 or there are no outputs.

    >>> fwd = lambda o2, o1: [{"instruction": o["instruction"], "preference": 2.0 if o["generator"] == "m" else 1.0}
    ...                       for o in o2]          # a judge with no position bias: the model always wins
    >>> position_bias([{"instruction": "a", "generator": "m"}, {"instruction": "b", "generator": "m"}],
    ...               [{"instruction": "a", "generator": "ref"}, {"instruction": "b", "generator": "ref"}], 1, fwd)
    {'n': 1, 'agreement': 1.0, 'model_wins_forward': 1, 'model_wins_swapped': 1, 'draws_forward': 0, 'draws_swapped': 0}
    """
    sub = model[:n]
    if not sub:
        return None
    ids = {m["instruction"] for m in sub}
    ref_sub = [r for r in reference if r["instruction"] in ids]
    return position_agreement(annotate_fixed(sub, ref_sub), annotate_fixed(ref_sub, sub))


def judge_label(judge: dict) -> str:
    """The annotator as the leaderboard names it: the API model, or ``local:<model>``."""
    return judge["annotator"] if judge["kind"] == "openai" else f"local:{judge['local_model']}"


def judge_answers(model: list[dict], reference: list[dict], annotate_fn: Annotate, judge: dict,
                  position_bias_n: int, df_gamed: str | None, lc_min_annotations: int = 10) -> tuple[list[dict], dict]:
    """Judge `model` against `reference` (alpaca-eval outputs, see `model_outputs` /
    `reference_outputs`): ONE randomised-order pass `annotate_fn(model, reference, True)`, a
    position-bias check on the first `position_bias_n` instructions in fixed orders
    (`annotate_fn(..., False)`), then win rate ± se, LC win rate (`metrics.lc_win_rate`: the
    official one needs all 805 instructions; `lc_min_annotations` = `eval.lc_min_annotations`), mean length. Returns
    (annotations, result). `annotate_fn(outputs_2, outputs_1, randomize_order)` is `annotate`
    with the judge config and a cache bound (a fake in tests).

    Input (one model output, one reference)::

        {"instruction": "2+2?", "output": "4", "generator": "seed", "dataset": "d"}
        {"instruction": "2+2?", "output": "Four.", "generator": "gpt4_turbo", "dataset": "d"}

    Result::

        {"win_rate": 100.0, "standard_error": ..., "n_wins": 1, "n_wins_base": 0, "n_draws": 0,
         "n_total": 1, "discrete_win_rate": 100.0, "unparsed": 0, "lc_win_rate": None,
         "lc_kind": "unavailable", "lc_note": "...", "avg_len_chars": 1.0, "control_tokens_escaped": 0,
         "control_tokens_escaped_references": 0, "model": "seed", "reference": "gpt4_turbo",
         "annotator": "gpt-4-turbo", "position_bias": {"n": 1, ...}}
    """
    ann = annotate_fn(model, reference, True)
    bias = position_bias(model, reference, position_bias_n, lambda o2, o1: annotate_fn(o2, o1, False))
    escaped = control_tokens(m["output"] for m in model)
    escaped_ref = control_tokens([*(r["output"] for r in reference), *(r["instruction"] for r in reference)])
    if escaped or escaped_ref:
        log.warning("judge: %d chat control token(s) (like <|im_end|>) in the answers, %d in the instructions and "
                    "references: shown to the judge as text, not as turns of its prompt", escaped, escaped_ref)
    full = len(model) == len(ann) == FULL_EVALSET      # every instruction paired: positions are the canonical ids
    result = {**win_rate(ann), **lc_win_rate(ann, full_evalset=full, df_gamed=df_gamed or None,
                                             min_annotations=lc_min_annotations),
              "avg_len_chars": sum(len(m["output"]) for m in model) / max(1, len(model)),
              "control_tokens_escaped": escaped, "control_tokens_escaped_references": escaped_ref,
              "model": model[0]["generator"] if model else None, "reference": reference[0]["generator"],
              "annotator": judge_label(judge), "position_bias": bias}
    return ann, result


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


class _api_key:
    """Expose `judge.api_key_env` as OPENAI_API_KEY for the OpenAI client during a call."""

    def __init__(self, judge: dict):
        self.src = judge.get("api_key_env") or "OPENAI_API_KEY"
        register_env(self.src)       # its value is masked in every log line (avr_core/redact.py)
        self.on = judge["kind"] == "openai"

    def __enter__(self):
        self.old = os.environ.get("OPENAI_API_KEY")
        if self.on:
            key = os.environ.get(self.src)
            if key is None and not os.environ.get("OPENAI_API_KEY"):
                os.environ["OPENAI_API_KEY"] = "EMPTY"   # a local server needs none; the client insists on one
            elif key is not None:
                os.environ["OPENAI_API_KEY"] = key

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = self.old


# -- the local judge --------------------------------------------------------------------------
_MODELS: dict[str, tuple] = {}
LOCAL_BATCH = 4


def local_completions(prompts: list[str], model_name: str, device: str = "auto", **kwargs) -> dict:
    """alpaca-eval completion function for a local HF model: for each rendered ChatML prompt,
    the log-probs of the next token being "m" or "M", in the OpenAI choice shape
    (`completions_all[i]["logprobs"]["content"][0]["top_logprobs"]`) that `logprob_parser` reads.
    The ChatML turns are re-rendered with the judge model's own chat template."""
    import time

    import torch

    tok, model = _load(model_name, device)
    ids_m, ids_M = tok.encode("m", add_special_tokens=False), tok.encode("M", add_special_tokens=False)
    texts = [tok.apply_chat_template(inert_control_tokens(parse_chatml(p)), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    lps, t0 = [], time.time()
    for i in range(0, len(texts), LOCAL_BATCH):    # batched, left-padded: the last position is the next token
        enc = tok(texts[i:i + LOCAL_BATCH], return_tensors="pt", add_special_tokens=False, padding=True)
        enc = enc.to(input_device(model))
        with torch.no_grad():
            last = model(**enc).logits[:, -1].float().cpu()
            lps.extend(torch.log_softmax(last, -1)[:, [ids_m[0], ids_M[0]]].tolist())
    choices = []
    for lm, lM in lps:
        top = [{"token": "m", "logprob": lm}, {"token": "M", "logprob": lM}]
        best = "m" if lm >= lM else "M"
        choices.append({"text": best, "logprobs": {"content": [{"token": best, "logprob": max(lm, lM),
                                                                 "top_logprobs": top}]}})
    n = max(1, len(prompts))
    return {"completions": [c["text"] for c in choices], "completions_all": choices,
            "price_per_example": [0.0] * len(prompts), "time_per_example": [(time.time() - t0) / n] * len(prompts)}


def parse_chatml(text: str) -> list[dict]:
    """'<|im_start|>system\\nX<|im_end|>\\n<|im_start|>user\\nY<|im_end|>' -> messages.

    >>> parse_chatml("<|im_start|>system\\nBe fair.<|im_end|>\\n<|im_start|>user\\nA or B?<|im_end|>")
    [{'role': 'system', 'content': 'Be fair.'}, {'role': 'user', 'content': 'A or B?'}]
    """
    msgs = []
    for part in text.split("<|im_start|>")[1:]:
        role, _, body = part.partition("\n")
        msgs.append({"role": role.strip(), "content": body.split("<|im_end|>")[0].strip()})
    return msgs or [{"role": "user", "content": text}]


def _load(model_name: str, device: str = "auto"):
    """The local judge model, placed by `eval.judge.device` (avr_core/backends/device.py); it
    reports its device for the judge stage's manifest and is dropped at the stage's end. Before
    it loads on CUDA the factory's engines are suspended (kept ones sleep; they wake at their
    role's next turn): the judge then loads into freed memory rather than beside them."""
    from avr_core import backends
    from avr_core.backends.hf import free_accelerator_for

    key = f"{model_name}@{device}"
    if key not in _MODELS:
        from avr_core.model_refs import resolve_model_path

        path = resolve_model_path(model_name)
        free_accelerator_for("judge", "local judge", device, "eval.judge.device")
        _MODELS[key] = _load_model(path, device)
    tok, model, label = _MODELS[key]
    backends.note_used("judge", label, _MODELS.clear)
    return tok, model


def _load_model(path: str, device: str) -> tuple:
    """(tokenizer, model, device label) of the judge at `path`. float32 on every device
    (`eval.judge` has no dtype): its verdicts then agree on CPU and GPU, which the judge stage's
    cache key, naming no device, assumes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from avr_core.backends.device import load

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model, pl = load(AutoModelForCausalLM, path, "float32", device, key="eval.judge.device")
    return tok, model, pl.label
