"""DPO training throughput, measured side by side: our DeepSpeed recipe vs TRL's DPOTrainer.

    .venv/bin/python bench/dpo_step.py                       # ~4 min on 2 CPU cores
    .venv/bin/python bench/dpo_step.py --steps 3 --no-wait   # a quick smoke run (~2 min)
    .venv/bin/python bench/dpo_step.py --pairs pairs.jsonl --json out.json

Needs the `bench` extra (`pip install -c constraints-cpu.txt trl==1.16.0`). Both sides train the
same model (embedded SmolLM2-135M-Instruct, fp32, no gradient checkpointing) on the SAME batches:
B pairs per optimizer step, max_length tokens, torch AdamW at the same lr with a cosine schedule
and no warmup, gradient clipping 1.0, beta 0.1, 1 warm-up step + N timed steps. Our recipe
visits its rows in its own seeded order (`recipe.Stream`); TRL gets the rows in that order with a
sequential sampler, so step k of each side sees the same pairs.

Each side runs in its own subprocess (one after the other; with --wait-quiet the next waits for
the 1-minute load average to drop first), so its peak memory is that process's peak RSS
(`ru_maxrss`: loading, tokenisation and training all included):

- ours: `avr_core.training.train(...)` on DeepSpeed (CPU: gloo, ZeRO 0, fp32, client AdamW),
  loss dpo, reference log-probs handed in. They come from `compute_reference_logps`, run
  beforehand in a third subprocess (the pipeline runs it once per pair dataset and stores it),
  reported on its own line; "incl. ref" pairs/s charges each trained pair its share of that pass
  (model load included).
- trl: `trl.DPOTrainer` with `DPOConfig(per_device_train_batch_size=B, max_length=..., bf16=False,
  gradient_checkpointing=False, beta=0.1, ...)`, the tokenizer passed as `processing_class`, and
  no ref model given, so TRL loads a copy of the policy and runs it on every step.
  `optim="adamw_torch"` (torch AdamW, what our recipe hands DeepSpeed; TRL's own default is the
  fused variant, `--trl-optim adamw_torch_fused`).

Timed: the wall clock from the end of the warm-up step to the end of the last step, as the
training loop runs it (collation, forward, backward, clipping, optimizer, per-step logging), taken
at each side's per-step hook: `tqdm.update` in our loop, `on_step_end` in TRL's. pairs/s = timed
pairs / that time. The ratio column is ours / TRL. `--profile` also runs one extra subprocess that
breaks our step down (forward, loss, backward, DeepSpeed's gradient all-reduce, optimizer step)
with torch.profiler. Results: docs/PERFORMANCE.md ("Training").
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "embedded:smollm2-135m-instruct"
SEED = 0


# ---------------------------------------------------------------- the pairs

def _u(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _a(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# (prompt messages, chosen answer, rejected answer): chosen is correct and to the point, rejected
# is vague, wrong in a detail, or off-topic -- the kind of pair stage-1 synthesis produces.
_PAIRS = [
    (_u("How do I reverse a list in Python without modifying the original?"),
     "Use slicing: `reversed_list = my_list[::-1]` creates a new list with the elements in reverse "
     "order and leaves `my_list` untouched. If you only need to iterate backwards, "
     "`for item in reversed(my_list):` is cheaper because `reversed()` returns an iterator instead "
     "of building a copy. Avoid `my_list.reverse()` here: it reverses the list in place and returns "
     "`None`, which is a common source of bugs.",
     "You can call `my_list.reverse()`, which returns the reversed list. This is the fastest way and "
     "it works for any list in Python."),
    (_u("What causes the seasons on Earth?"),
     "Seasons come from the tilt of Earth's axis, about 23.4 degrees relative to its orbit. As Earth "
     "goes around the Sun, one hemisphere is tipped toward the Sun for part of the year: sunlight "
     "hits it more directly and days are longer, so it gets more energy and has summer. Six months "
     "later the same hemisphere is tipped away, the light arrives at a lower angle and days are "
     "shorter, which gives winter. The distance to the Sun changes only slightly and is not the "
     "cause; Earth is actually closest to the Sun in early January.",
     "The seasons happen because Earth moves closer to the Sun in summer and farther away in winter. "
     "When we are closer it is hotter, and when we are farther it is colder."),
    (_u("Write a short, polite email asking my manager for Friday off."),
     "Subject: Request for a day off on Friday\n\nHi Sarah,\n\nI would like to request this Friday, "
     "the 14th, off for a personal appointment. My current tasks are on track: the quarterly report "
     "draft will be in the shared folder by Thursday afternoon, and Alex has agreed to cover any "
     "urgent client questions. Please let me know if that works or if you would prefer I move "
     "anything around.\n\nThank you,\nJordan",
     "Hey, I need Friday off. Let me know.\n\nThanks"),
    (_u("Explain what a hash table is to a beginner."),
     "A hash table stores key-value pairs so you can find a value by its key very quickly. It keeps "
     "an array of slots, called buckets. To store a pair, it runs the key through a hash function, "
     "which turns the key into a number, and uses that number to pick a bucket. To look the key up "
     "later, it hashes the key again and goes straight to the same bucket instead of searching "
     "everything. Sometimes two keys land in the same bucket, a collision; the table handles that by "
     "keeping a small list in the bucket or by probing the next free slot. Python's `dict` is a hash "
     "table.",
     "A hash table is a table where you store hashes. It is used in cryptography to keep passwords "
     "safe, and it sorts the data so that searching is faster."),
    (_u("I have chicken thighs, rice, an onion and some spinach. What can I cook tonight?"),
     "A one-pan chicken and rice works well. Season the thighs with salt, pepper and paprika, brown "
     "them skin-side down in a deep pan for 5-6 minutes, then set them aside. Soften the chopped "
     "onion in the fat, stir in one cup of rinsed rice, and add two cups of stock or water. Put the "
     "chicken back on top, cover, and simmer on low for about 20 minutes until the rice is tender "
     "and the chicken reaches 74 C inside. Stir the spinach in for the last two minutes so it just "
     "wilts. Finish with lemon juice if you have some.",
     "You could make a salad with the spinach and the onion. Chicken and rice are also good, you can "
     "cook them however you like."),
    (_u("What is the difference between a virus and a bacterium?"),
     "Bacteria are single-celled living organisms: they have their own metabolism, can reproduce on "
     "their own by dividing, and many are harmless or even helpful, like those in your gut. Viruses "
     "are much smaller and are not cells at all; they are genetic material in a protein coat and "
     "can only multiply by hijacking a host cell. That difference matters for treatment: antibiotics "
     "target structures bacteria have, such as cell walls, so they work against bacterial infections "
     "but do nothing against viruses like the flu or a cold.",
     "A virus and a bacterium are basically the same thing, germs that make you sick. Antibiotics "
     "kill both of them, so you should take them whenever you have a cold."),
    (_u("Summarise the plot of Romeo and Juliet in a few sentences."),
     "In Verona, Romeo of the Montague family and Juliet of the rival Capulets fall in love at a "
     "feast and marry in secret with the help of Friar Laurence. After Romeo kills Juliet's cousin "
     "Tybalt in a street fight, he is banished. To avoid an arranged marriage, Juliet takes a potion "
     "that makes her seem dead, but the message explaining the plan never reaches Romeo. Believing "
     "she is dead, he poisons himself at her tomb; Juliet wakes, finds him, and stabs herself. Their "
     "deaths finally reconcile the two families.",
     "Romeo and Juliet are two lovers from rival families. They get married and live happily ever "
     "after once their families make peace."),
    (_u("How can I make my laptop battery last longer?"),
     "A few habits help the most. Lower the screen brightness, since the display is usually the "
     "biggest drain. Close apps and browser tabs you are not using, especially video and heavy web "
     "pages. Turn on your system's battery-saver mode and turn off Bluetooth or keyboard backlight "
     "when you do not need them. For the battery's long-term health, avoid keeping it at 100% and "
     "hot for days: many laptops have a setting to stop charging at about 80%. Finally, keep the "
     "operating system updated, since updates often include power-management fixes.",
     "Just buy a new battery every year, they wear out anyway. Also, fully draining it to 0% every "
     "day keeps it healthy."),
    (_u("Can you check my reasoning? If all bloops are razzies and all razzies are lazzies, are all "
        "bloops lazzies?"),
     "Yes, your conclusion follows. The two statements chain together: every bloop is a razzie, and "
     "every razzie is a lazzie, so any bloop you pick is a razzie and therefore also a lazzie. This "
     "is a valid syllogism of the form 'all A are B, all B are C, so all A are C'. Note that the "
     "reverse does not follow: there may be lazzies that are not bloops.",
     "No, you cannot conclude that, because we do not know what bloops are. Made-up words make the "
     "statement meaningless."),
    (  # a two-turn prompt: the earlier turns come before the last user message
        [{"role": "user", "content": "I'm going to Lisbon for three days in October."},
         {"role": "assistant", "content": "Great choice! October is pleasant there. Would you like ideas "
          "for sights, food, or a day-by-day plan?"},
         {"role": "user", "content": "A day-by-day plan please, I like history and good food."}],
        "Day 1: Explore Alfama and Baixa. Walk up to São Jorge Castle in the morning for the views, wander "
        "down through Alfama's lanes, and have grilled sardines for lunch. In the evening, listen to fado in "
        "a small tavern.\nDay 2: Belém. Visit the Jerónimos Monastery and the Belém Tower, and try the "
        "original pastéis de Belém. Spend the afternoon at the MAAT or the Coaches Museum.\nDay 3: Take the "
        "train to Sintra for Pena Palace and the Moorish Castle, then come back for dinner in Bairro Alto.",
        "Lisbon is the capital of Portugal. It has many museums and restaurants, so you will find plenty "
        "to do. Enjoy your trip!"
    ),
    (_u("What does the HTTP status code 404 mean, and how is it different from 500?"),
     "404 Not Found means the server was reached and understood the request, but there is nothing at "
     "that URL: a mistyped address, a deleted page, or a broken link. It is a client-side error (the "
     "4xx range). 500 Internal Server Error is in the 5xx range: the request may have been fine, but "
     "the server failed while handling it, for example because of an unhandled exception or a "
     "misconfiguration. In short, a 404 usually means fix the link, a 500 means fix the server.",
     "404 means the server is down and 500 means the page was not found. Both mean the website is "
     "broken."),
    (_u("Give me three tips for a job interview."),
     "1. Research the company: know what they do, their recent news, and how the role fits in, so "
     "you can connect your experience to their needs.\n2. Prepare concrete stories: use the STAR "
     "format (situation, task, action, result) for two or three examples that show the skills in "
     "the job description.\n3. Ask good questions at the end, such as what success looks like in "
     "the first six months; it shows genuine interest and helps you judge the job too.",
     "Be yourself, dress well, and don't be late."),
    (_u("Translate 'Where is the train station?' into French and Spanish."),
     "French: « Où est la gare ? »\nSpanish: « ¿Dónde está la estación de tren? »\n\nIn French, "
     "'la gare' alone already means the train station. In Spanish you will also hear simply "
     "'¿Dónde está la estación?' when the context makes it clear.",
     "French: Où est le train ?\nSpanish: ¿Dónde está el tren?"),
    (_u("Why does ice float on water?"),
     "Ice floats because it is less dense than liquid water, by about 9%. When water freezes, its "
     "molecules lock into a hexagonal crystal held together by hydrogen bonds, and that structure "
     "keeps the molecules farther apart than in the liquid, where they tumble closer together. Less "
     "mass in the same volume means lower density, so ice rises. This is unusual: most substances "
     "are denser as solids. It also matters for life, because lakes freeze from the top down and the "
     "ice layer insulates the water below.",
     "Ice floats because it contains air bubbles that make it light. If you froze water without any "
     "air, it would sink."),
    (_u("What's a good way to start learning to play the guitar as an adult?"),
     "Start with a few basics and short, regular practice. Get the guitar set up so the strings are "
     "not too high, which makes pressing them much easier. Learn the open chords G, C, D, E minor "
     "and A minor first; with those you can already play many songs. Practise switching between two "
     "chords slowly with a metronome, 15 to 20 minutes a day rather than two hours on Sunday. Pick "
     "one simple song you love as a goal, and expect sore fingertips for the first couple of weeks.",
     "Guitar is hard to learn as an adult, most people give up. Try watching some videos."),
    (_u("How do I compute compound interest?"),
     "Use A = P(1 + r/n)^(n t), where P is the starting amount, r the annual rate as a decimal, n "
     "how many times per year interest is compounded, and t the number of years. For example, "
     "1,000 at 5% compounded monthly for 3 years gives A = 1000 x (1 + 0.05/12)^36, which is about "
     "1,161.47, so the interest earned is 161.47. With yearly compounding (n = 1) the same deposit "
     "would grow to 1,157.63.",
     "Multiply the amount by the rate and by the number of years: 1,000 x 0.05 x 3 = 150, so you "
     "earn 150 in interest."),
]



def default_pairs() -> list[dict]:
    """The 16 built-in pairs as TRL conversational rows with ids."""
    return [{"id": f"pair-{i:02d}", "prompt": p, "chosen": _a(c), "rejected": _a(r)}
            for i, (p, c, r) in enumerate(_PAIRS)]


def load_pairs(path: str | None, n: int) -> list[dict]:
    """n pair rows: from a JSONL / JSON artifact (cycled if shorter) or the built-in ones."""
    if path:
        text = Path(path).read_text(encoding="utf-8")
        rows = (json.loads(text) if text.lstrip().startswith("[")
                else [json.loads(l) for l in text.splitlines() if l.strip()])
        rows = [{"id": str(r.get("id", f"row-{i}")), "prompt": r["prompt"], "chosen": r["chosen"],
                 "rejected": r["rejected"]} for i, r in enumerate(rows)]
    else:
        rows = default_pairs()
    if not rows:
        raise SystemExit(f"no pairs in {path}")
    out = []
    for i in range(n):
        r = dict(rows[i % len(rows)])
        if i >= len(rows):
            r["id"] = f"{r['id']}~{i // len(rows)}"
        out.append(r)
    return out


# ---------------------------------------------------------------- measuring a child process

class Meter:
    """Peak RSS of this process (ru_maxrss) and of the timed window (psutil polling), CPU used by
    other processes while timed (from /proc/stat minus this process), timestamps of step ends."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.window_peak = 0
        self._in_window = False
        self._stop = threading.Event()
        self.ends: list[float] = []
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        while not self._stop.is_set():
            if self._in_window:
                self.window_peak = max(self.window_peak, self._proc.memory_info().rss)
            time.sleep(0.02)

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # all but idle and iowait

    def _self_s(self) -> float:
        t = os.times()
        return t.user + t.system

    def step_end(self, warmup: int):
        """Call at the end of every optimizer step; the window opens after `warmup` steps."""
        now = time.perf_counter()
        self.ends.append(now)
        if len(self.ends) == warmup:
            self._w0 = (now, self._busy_s(), self._self_s())
            self._in_window = True
            self.window_peak = self._proc.memory_info().rss

    def result(self, warmup: int) -> dict:
        import resource

        self._stop.set()
        out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "window_peak_rss_mib": self.window_peak / 2**20}
        if len(self.ends) > warmup:
            t0, busy0, self0 = self._w0
            wall = self.ends[-1] - t0
            # the closing reading is taken here, a moment after the last step: close enough
            other = (self._busy_s() - busy0) - (self._self_s() - self0)
            out.update(timed_s=wall, step_s=[b - a for a, b in zip(self.ends[warmup - 1:], self.ends[warmup:])],
                       other_cores=max(0.0, other / max(wall, 1e-9)))
        return out


def _torch_env() -> dict:
    import torch

    return {"torch_threads": torch.get_num_threads()}


def child_ref(spec: dict) -> dict:
    """Our reference pass, as the pipeline runs it: tokenise, then compute_reference_logps."""
    from transformers import AutoTokenizer

    from avr_core.training import compute_reference_logps, tokenize_pairs

    meter = Meter()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    pairs, counts = tokenize_pairs(spec["rows"], tok, spec["max_length"])
    t0 = time.perf_counter()
    refs = compute_reference_logps(spec["model"], pairs, batch_size=spec["batch_size"], dtype="float32")
    seconds = time.perf_counter() - t0
    Path(spec["ref_path"]).write_text("".join(json.dumps(r) + "\n" for r in refs))
    res = meter.result(0)
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()          # what the model load inside that pass costs (files now cached)
    AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    return {**res, "ref_s": seconds, "load_s": time.perf_counter() - t0, "pairs": len(refs),
            "tokenize": counts, **_torch_env()}


def child_ours(spec: dict) -> dict:
    """avr_core.training.train on DeepSpeed, reference log-probs from the ref child."""
    import tqdm.auto

    from avr_core.training import ref_logps_by_id, train

    meter = Meter()
    warm = spec["warmup"]

    class StepClock(tqdm.auto.tqdm):            # _loop calls bar.update(1) once per finished step
        def update(self, n=1):
            meter.step_end(warm)
            return super().update(n)

    tqdm.auto.tqdm = StepClock
    refs = [json.loads(l) for l in Path(spec["ref_path"]).read_text().splitlines() if l.strip()]
    out = Path(spec["workdir"]) / spec.get("out_name", "ours")
    cfg = {"loss": "dpo", "beta": spec["beta"], "lr": spec["lr"], "weight_decay": 0.0, "warmup_ratio": 0.0,
           "epochs": 1, "step_cap": -1, "micro_batch_size": spec["batch_size"], "grad_accum": 1,
           "max_length": spec["max_length"], "zero_stage": 0, "bf16": False, "gradient_checkpointing": False,
           "checkpoint_every": 0, "seed": SEED}
    summary = train(spec["model"], spec["rows"], cfg, str(out / "model"), str(out / "ckpt"),
                    ref_logps=ref_logps_by_id(refs), progress=False)
    res = meter.result(warm)
    metrics = [json.loads(l) for l in (out / "model" / "metrics.jsonl").read_text().splitlines()]
    return {**res, "losses": [m["loss"] for m in metrics], "tokens": [m["tokens"] for m in metrics],
            "loop_step_s": [m["step_s"] for m in metrics], "steps": summary["steps"],
            "init_s": summary["init_s"], "export_s": summary.get("export_s"),
            "tokenize": summary["tokenize"], **_torch_env()}


def child_trl(spec: dict) -> dict:
    """trl.DPOTrainer with a reference copy of the policy, rows in our recipe's order."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    meter = Meter()
    warm = spec["warmup"]
    losses: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.step_end(warm)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in spec["trl_rows"]])
    cfg = DPOConfig(output_dir=str(Path(spec["workdir"]) / "trl"), per_device_train_batch_size=spec["batch_size"],
                    gradient_accumulation_steps=1, max_length=spec["max_length"], bf16=False,
                    gradient_checkpointing=False, beta=spec["beta"], learning_rate=spec["lr"],
                    max_steps=spec["steps"] + warm, lr_scheduler_type="cosine", warmup_steps=0,
                    weight_decay=0.0, max_grad_norm=1.0, optim=spec["trl_optim"],
                    train_sampling_strategy="sequential", report_to=[], save_strategy="no",
                    logging_steps=1, disable_tqdm=True, seed=SEED, dataloader_num_workers=0,
                    use_cpu=not torch.cuda.is_available())
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    t0 = time.perf_counter()
    trainer.train()
    res = meter.result(warm)
    return {**res, "losses": losses, "tokens": tokens, "steps": trainer.state.global_step,
            "train_call_s": time.perf_counter() - t0, "ref_model": type(trainer.ref_model).__name__,
            "kept": len(trainer.train_dataset), **_torch_env()}


# ---------------------------------------------------------------- prototype fixes (bench-only)
# What docs/PERFORMANCE.md ("Training") proposes for avr_core.training, applied here by
# monkeypatching at run time: avr_core itself is not changed by this benchmark.
FIXES = ("no_allreduce", "fused_adamw", "compact_head", "split_forward")


def apply_engine_fixes(engine, fixes) -> None:
    """no_allreduce: one process has nothing to all-reduce, yet DeepSpeed ZeRO-0 flattens every
    gradient into one buffer, scales it by 1/world and copies it back after each backward.
    fused_adamw: torch's fused AdamW kernel instead of its per-parameter loop."""
    import deepspeed.comm as dcomm

    if "no_allreduce" in fixes and dcomm.get_world_size() == 1:
        engine.enable_backward_allreduce = False
    if "fused_adamw" in fixes:
        for g in engine.optimizer.param_groups:
            g["fused"] = True


def make_pair_logps(fixes):
    """`pair_logps` with compact_head (LM head and log-softmax on completion positions only,
    instead of [2B, T, V] logits over prompt and padding too) and/or split_forward (chosen rows
    and rejected rows in two forwards, each padded only to its own longest row)."""
    import torch
    import torch.nn.functional as F

    from avr_core.training.data import IGNORE
    from avr_core.training.logps import pair_logps, sequence_logps

    compact, split = "compact_head" in fixes, "split_forward" in fixes
    if not (compact or split):
        return pair_logps

    def fixed_pair_logps(model, batch):
        hf = getattr(model, "module", model)            # DeepSpeed engine -> the HF model
        ids, att, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
        b = ids.shape[0] // 2
        logps, counts = [], []
        for g in ((slice(0, b), slice(b, 2 * b)) if split else (slice(0, 2 * b),)):
            width = int(att[g].sum(-1).max())           # right padding: trim to the longest row
            i, a, l = ids[g, :width], att[g, :width], lab[g, :width]
            if compact:
                h = hf.get_decoder()(input_ids=i, attention_mask=a, use_cache=False).last_hidden_state[:, :-1]
                y = l[:, 1:]
                mask = y != IGNORE
                logits = hf.get_output_embeddings()(h[mask])                 # [n_completion, V]
                nll = F.cross_entropy(logits.float(), y[mask], reduction="none")
                lp = torch.zeros(mask.shape[0], dtype=nll.dtype, device=nll.device).index_add(
                    0, mask.nonzero()[:, 0], -nll)
                n = mask.sum(-1)
            else:
                lp, n = sequence_logps(model(input_ids=i, attention_mask=a, use_cache=False).logits, l)
            logps.append(lp)
            counts.append(n)
        lp, n = torch.cat(logps), torch.cat(counts)
        return lp[:b], lp[b:], n[:b], n[b:]
    return fixed_pair_logps


def patch_recipe(fixes) -> None:
    from avr_core.training import recipe

    make_engine = recipe._engine

    def _engine(*a, **k):
        engine = make_engine(*a, **k)
        apply_engine_fixes(engine, fixes)
        return engine
    recipe._engine = _engine
    recipe.pair_logps = make_pair_logps(fixes)


def child_ours_fixed(spec: dict) -> dict:
    """The same `train` call as child_ours, with every prototype fix patched in."""
    patch_recipe(set(spec["fixes"]))
    return child_ours({**spec, "out_name": "ours_fixed"})


def child_profile(spec: dict) -> dict:
    """Where our step's time goes: the recipe's own pieces (`recipe._engine`, `_collate`,
    `pair_logps`, the dpo loss, engine.backward / step) timed phase by phase on the same batches,
    first as the recipe runs them, then adding the prototype fixes one at a time."""
    import torch
    from transformers import AutoTokenizer

    from avr_core.losses import PREFERENCE_LOSSES
    from avr_core.training import dist, recipe
    from avr_core.training.data import IGNORE, pad_id, tokenize_pairs

    torch.manual_seed(SEED)
    cfg = recipe.as_train_config({"loss": "dpo", "beta": spec["beta"], "lr": spec["lr"], "warmup_ratio": 0.0,
                                  "micro_batch_size": spec["batch_size"], "max_length": spec["max_length"],
                                  "zero_stage": 0, "bf16": False, "checkpoint_every": 0, "seed": SEED})
    refs = {r["id"]: r for r in map(json.loads, Path(spec["ref_path"]).read_text().splitlines())}
    rep: dict = {"variants": {}}
    with dist.session() as (rank, world, _):
        tok = AutoTokenizer.from_pretrained(spec["model"])
        ex, _ = tokenize_pairs(spec["rows"], tok, cfg.max_length)
        for e in ex:
            e["ref"] = (refs[e["id"]]["ref_chosen"], refs[e["id"]]["ref_rejected"])
        stream = recipe.Stream(len(ex), SEED)
        B = cfg.micro_batch_size
        batches = [recipe._collate([ex[stream.index(p)] for p in range(s * B, (s + 1) * B)], cfg, pad_id(tok))
                   for s in range(len(ex) // B)]
        dsc = recipe.ds_config(cfg, world)
        model, _ = recipe._load_model(spec["model"], cfg, dsc)
        engine = recipe._engine(model, cfg, dsc, 10**6)
        engine.train()
        t_ar: list[float] = []
        allreduce = engine.allreduce_gradients

        def timed_allreduce(*a, **k):
            t = time.perf_counter()
            r = allreduce(*a, **k)
            t_ar.append(time.perf_counter() - t)
            return r
        engine.allreduce_gradients = timed_allreduce
        dpo = PREFERENCE_LOSSES["dpo"]
        n = min(len(batches), spec["profile_steps"] + 1)
        fixes: set[str] = set()
        busy0, self0, wall0 = Meter._busy_s(), sum(os.times()[:2]), time.perf_counter()
        for name in (None, *FIXES):
            if name:
                fixes.add(name)
            apply_engine_fixes(engine, fixes)
            logps_fn = make_pair_logps(fixes)
            rows = []
            for batch in batches[:n]:
                t0 = time.perf_counter()
                lc, lr, _, _ = logps_fn(engine, batch)
                loss = dpo(lc, lr, batch["ref"][:, 0], batch["ref"][:, 1], beta=cfg.beta)[0]
                t1 = time.perf_counter()
                k = len(t_ar)
                engine.backward(loss)
                t2 = time.perf_counter()
                engine.step()
                t3 = time.perf_counter()
                rows.append({"fwd_loss": t1 - t0, "backward": t2 - t1 - sum(t_ar[k:]), "allreduce": sum(t_ar[k:]),
                             "opt_step": t3 - t2, "total": t3 - t0})
            timed = rows[1:]            # the first step of each variant warms up
            label = "as the recipe runs" if name is None else f"+ {name}"
            rep["variants"][label] = {key: sum(r[key] for r in timed) / len(timed) for key in rows[0]}
        wall = time.perf_counter() - wall0
        rep["other_cores"] = max(0.0, (Meter._busy_s() - busy0 - (sum(os.times()[:2]) - self0)) / wall)
        T = max(b["input_ids"].shape[1] for b in batches)
        rep["logits_mib_longest_batch"] = 2 * B * T * engine.module.config.vocab_size * 4 / 2**20
        rep["params_mib"] = sum(p.numel() for p in engine.module.parameters()) * 4 / 2**20
        rep["positions"] = {"padded": sum(b["input_ids"].numel() for b in batches),
                            "real_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
                            "completion_tokens": sum(int((b["labels"] != IGNORE).sum()) for b in batches)}
        engine.destroy()
    return rep


CHILDREN = {"ref": child_ref, "ours": child_ours, "ours_fixed": child_ours_fixed, "trl": child_trl,
            "profile": child_profile}


# ---------------------------------------------------------------- the parent

def load1() -> float:
    return os.getloadavg()[0]


def busy_cores(seconds: float = 5.0) -> float:
    """Cores busy (all processes) over the next few seconds, from /proc/stat."""
    b0, t0 = Meter._busy_s(), time.perf_counter()
    time.sleep(seconds)
    return (Meter._busy_s() - b0) / (time.perf_counter() - t0)


def wait_quiet(threshold: float, max_wait: float, label: str) -> dict:
    """Wait until the 1-minute load average is below threshold and, as the load average lags
    behind a job that has just started, fewer than 0.3 cores are busy over 5 s (polling every 20 s)."""
    t0 = time.time()
    start = load1()
    while True:
        busy = busy_cores()
        quiet = load1() < threshold and busy < 0.3
        if quiet or time.time() - t0 >= max_wait:
            break
        print(f"  [{label}] load {load1():.2f}, {busy:.2f} cores busy: waiting", file=sys.stderr, flush=True)
        time.sleep(15)
    return {"waited_s": round(time.time() - t0), "load_before": start, "load_at_start": load1(),
            "busy_cores_at_start": busy, "gave_up": not quiet}


def run_child(role: str, spec: dict, args, timeout: float) -> dict:
    spec_path = Path(spec["workdir"]) / f"{role}.spec.json"
    out_path = Path(spec["workdir"]) / f"{role}.result.json"
    spec_path.write_text(json.dumps(spec))
    wait = wait_quiet(args.load_threshold, args.max_wait, role) if args.wait_quiet else None
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", role, str(spec_path), str(out_path)],
                       env=env, cwd=REPO, timeout=timeout, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
        raise SystemExit(f"{role} child failed (rc {p.returncode})")
    res = json.loads(out_path.read_text())
    res["process_s"] = time.time() - t0
    res["wait"] = wait
    return res


def build_spec(args, workdir: Path) -> dict:
    from avr_core.model_refs import resolve_model_path
    from avr_core.training.recipe import Stream

    n = (args.steps + 1) * args.batch_size          # one epoch: warm-up step + timed steps
    rows = load_pairs(args.pairs, n)
    stream = Stream(len(rows), SEED)                 # the order our recipe visits them in
    return {"model": resolve_model_path(MODEL), "rows": rows, "trl_rows": [rows[stream.index(p)] for p in range(n)],
            "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr, "beta": args.beta,
            "steps": args.steps, "warmup": 1, "trl_optim": args.trl_optim, "workdir": str(workdir),
            "ref_path": str(workdir / "ref_logps.jsonl"), "profile_steps": args.profile_steps,
            "fixes": args.fixes}


def _environment(threads) -> str:
    import deepspeed
    import torch
    import transformers
    import trl

    return (f"# {dt.datetime.now().isoformat(timespec='minutes')}  {os.cpu_count()} CPU cores, "
            f"{'GPU' if torch.cuda.is_available() else 'no GPU'}, torch threads {threads}  |  "
            f"torch {torch.__version__}  "
            f"transformers {transformers.__version__}  trl {trl.__version__}  deepspeed {deepspeed.__version__}  "
            f"python {platform.python_version()}")


def report(args, ref: dict, ours: dict, trl: dict, fixed: dict | None) -> dict:
    pairs = args.steps * args.batch_size
    pps = {k: pairs / r["timed_s"] for k, r in (("ours", ours), ("trl", trl), ("fixed", fixed)) if r}
    ref_per_pair = ref["ref_s"] / ref["pairs"]
    incl = {k: 1.0 / (1.0 / pps[k] + ref_per_pair) for k in ("ours", "fixed") if k in pps}
    t_pps, t_rss = pps["trl"], trl["peak_rss_mib"]
    rows = [("ours: avr_core.training (DeepSpeed)", ours, pps["ours"], ours["peak_rss_mib"]),
            ("  + its share of the reference pass", ours, incl["ours"], max(ours["peak_rss_mib"], ref["peak_rss_mib"]))]
    if fixed:
        rows += [("ours + prototype fixes (bench patch)" if set(args.fixes) == set(FIXES)
                  else "ours + " + "+".join(args.fixes), fixed, pps["fixed"], fixed["peak_rss_mib"]),
                 ("  + its share of the reference pass", fixed, incl["fixed"],
                  max(fixed["peak_rss_mib"], ref["peak_rss_mib"]))]
    rows.append(("trl: DPOTrainer (ref model per step)", trl, t_pps, t_rss))
    print(_environment(ours.get("torch_threads")))
    print(f"# SmolLM2-135M-Instruct fp32, {args.batch_size} pairs/step, max_length {args.max_length}, "
          f"AdamW lr {args.lr} (trl optim={args.trl_optim}), beta {args.beta}; 1 warm-up + {args.steps} timed "
          f"steps, the same batches on both sides; each side in its own process")
    print(f"{'impl':38} {'steps':>5} {'pairs/s':>8} {'s/step':>7} {'peak RSS MiB':>12} {'first loss':>10} "
          f"{'last loss':>9} {'ratio vs TRL':>12} {'RSS vs TRL':>10}")
    for name, r, p, rss in rows:
        print(f"{name:38} {args.steps:5d} {p:8.3f} {args.batch_size / p:7.2f} {rss:12.0f} {r['losses'][0]:10.4f} "
              f"{r['losses'][-1]:9.4f} {p / t_pps:11.2f}x {rss / t_rss:9.2f}x")
    print(f"{'ours: reference pass (once per dataset)':38} {'':5} {ref['pairs'] / ref['ref_s']:8.3f} {'':7} "
          f"{ref['peak_rss_mib']:12.0f}   {ref['pairs']} pairs in {ref['ref_s']:.1f} s, model load "
          f"(~{ref['load_s']:.1f} s) included")
    ratio = {"pairs_per_s": pps["ours"] / t_pps, "pairs_per_s_incl_ref": incl["ours"] / t_pps,
             "peak_rss": ours["peak_rss_mib"] / t_rss}
    print(f"ratio ours/TRL: pairs/s {ratio['pairs_per_s']:.2f}x (incl. the reference pass "
          f"{ratio['pairs_per_s_incl_ref']:.2f}x), peak RSS {ratio['peak_rss']:.2f}x "
          f"(peak RSS while timed: ours {ours['window_peak_rss_mib']:.0f}, TRL {trl['window_peak_rss_mib']:.0f} MiB)")
    met = {"pairs_per_s >= 1.2x": ratio["pairs_per_s"] >= 1.2, "peak RSS <= TRL": ratio["peak_rss"] <= 1.0}
    print("targets: " + "; ".join(f"{k}: {'MET' if v else 'MISSED'}" for k, v in met.items()))
    for name, r in (("ours", ours), ("fixed", fixed), ("trl", trl)):
        if r:
            ok = abs(r["losses"][0] - math.log(2)) < 1e-3
            print(f"first loss {name}: {r['losses'][0]:.5f} ({'= ln 2' if ok else 'NOT ln 2'}); "
                  f"per step: {' '.join(f'{x:.4f}' for x in r['losses'])}")
    print(f"real tokens in the timed steps: ours {sum(ours['tokens'][1:])}, trl {sum(trl['tokens'][1:])} "
          f"(TRL's completions keep the newline after <|im_end|>: +1 token per sequence)")
    print("other processes used " + ", ".join(f"~{r['other_cores']:.2f} cores while {n} was timed"
                                             for n, r in (("ours", ours), ("fixed", fixed), ("trl", trl)) if r))
    for name, r in (("ours", ours), ("fixed", fixed), ("trl", trl)):
        if r and r["other_cores"] > 0.2:
            print(f"  WARNING: {name} shared the cores with other work (~{r['other_cores']:.2f} cores): "
                  "its figures are not a clean measurement")
    for name, r in (("ref", ref), ("ours", ours), ("fixed", fixed), ("trl", trl)):
        w = r and r.get("wait")
        if w and (w["waited_s"] or w["gave_up"]):
            print(f"  {name}: waited {w['waited_s']} s for a quiet machine (load < {args.load_threshold})"
                  + (f", gave up at load {w['load_at_start']:.2f}" if w["gave_up"] else ""))
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "pairs_per_s": pps,
            "pairs_per_s_incl_ref": incl, "ratio": ratio, "targets_met": met,
            "ref": ref, "ours": ours, "trl": trl, "ours_fixed": fixed, "settings": vars(args)}


def report_profile(prof: dict) -> None:
    print(_environment(None))
    print(f"our step, phase by phase (seconds, mean of {prof['steps']} steps after one warm-up step per variant; "
          "fixes added cumulatively):")
    print(f"{'variant':28} {'fwd+loss':>8} {'backward':>8} {'allreduce':>9} {'opt step':>8} {'total':>7}")
    for name, r in prof["variants"].items():
        print(f"{name:28} {r['fwd_loss']:8.2f} {r['backward']:8.2f} {r['allreduce']:9.2f} {r['opt_step']:8.2f} "
              f"{r['total']:7.2f}")
    pos = prof["positions"]
    print(f"positions scored: {pos['padded']} padded, {pos['real_tokens']} real tokens "
          f"({pos['real_tokens'] / pos['padded']:.0%}), {pos['completion_tokens']} completion tokens "
          f"({pos['completion_tokens'] / pos['padded']:.0%}); logits of the longest batch "
          f"{prof['logits_mib_longest_batch']:.0f} MiB per [2B, T, V] fp32 copy; "
          f"parameters {prof['params_mib']:.0f} MiB")
    print(f"other processes used ~{prof['other_cores']:.2f} cores meanwhile")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", help="pair rows (JSONL or JSON array, TRL conversational format); "
                                    "default: 16 built-in conversational pairs")
    ap.add_argument("--steps", type=int, default=7, help="timed optimizer steps after 1 warm-up step (default 7: "
                                                         "one epoch over the 16 built-in pairs)")
    ap.add_argument("--batch-size", type=int, default=2, help="pairs per optimizer step")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--trl-optim", default="adamw_torch", help="TRL's optim (adamw_torch = our torch AdamW)")
    ap.add_argument("--with-fixes", action="store_true",
                    help="also time our recipe with the prototype fixes patched in (one more process)")
    ap.add_argument("--fixes", type=lambda v: [f for f in v.split(",") if f], default=list(FIXES),
                    help=f"prototype fixes for --with-fixes, comma-separated (default: all of {','.join(FIXES)})")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the side by side: our step phase by phase, fixes added one at a time")
    ap.add_argument("--profile-steps", type=int, default=2, help="timed steps per variant with --profile")
    ap.add_argument("--no-wait", dest="wait_quiet", action="store_false",
                    help="do not wait for a quiet machine before each process")
    ap.add_argument("--load-threshold", type=float, default=1.3, help="1-minute load average to wait for")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for it at most")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per process")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        role, spec_path, out_path = args.child
        res = CHILDREN[role](json.loads(Path(spec_path).read_text()))
        Path(out_path).write_text(json.dumps(res))
        return 0

    with tempfile.TemporaryDirectory(prefix="dpo_bench_") as tmp:
        spec = build_spec(args, Path(tmp))
        ref = run_child("ref", spec, args, args.timeout)
        if args.profile:
            prof = run_child("profile", spec, args, args.timeout)
            prof["steps"] = min(args.profile_steps, args.steps)
            report_profile(prof)
            out = {"date": dt.datetime.now().isoformat(timespec="seconds"), "profile": prof, "settings": vars(args)}
        else:
            ours = run_child("ours", spec, args, args.timeout)
            trl = run_child("trl", spec, args, args.timeout)
            fixed = run_child("ours_fixed", spec, args, args.timeout) if args.with_fixes else None
            out = report(args, ref, ours, trl, fixed)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
