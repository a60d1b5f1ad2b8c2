"""The one training recipe (setup / train / save / resume) for RSFT and preference optimisation.

    summary = train("/models/policy", rows, TrainConfig(loss="dpo", lr=5e-7, step_cap=100),
                    out_dir="/store/po/KEY/model", ckpt_dir="/store/po/KEY/ckpt",
                    ref_logps={"p1": (-12.7, -15.0), ...})

- DeepSpeed everywhere: ZeRO-2/3 and bf16 on GPUs, the same engine on CPU (gloo, one process).
  Optimizer and LR schedule are ours (torch AdamW; linear warmup then cosine decay), handed
  to `deepspeed.initialize`, so nothing is compiled.
- Loss by `cfg.loss`: sft | dpo | ipo | simpo | rm_margin (avr_core.losses). A preference
  micro-batch is ONE forward over chosen and rejected concatenated. The reference model never
  runs here: its log-probs come in `ref_logps` (computed once by `compute_reference_logps`).
- Data order: the example stream is a concatenation of per-epoch permutations seeded by
  (cfg.seed, epoch); optimizer step s of a run with G = micro_batch_size * grad_accum * world
  takes stream positions [s*G, (s+1)*G). So the position is a function of the step, and a
  resumed run sees exactly the batches an uninterrupted one would.
- Steps: planned = max(1, epochs * examples // G) sets the LR schedule. `step_cap > 0` only
  CAPS how far this call goes; it does not reshape the schedule, so stopping at step_cap=3 and
  calling again with step_cap=6 continues the very same run (same losses as 6 in one go).
- Checkpoints every `checkpoint_every` steps, and when step_cap stops a call before the
  planned end (checkpoint.py); a call whose ckpt_dir holds a committed checkpoint resumes from
  it. A finished run writes no extra final checkpoint (at 8B that would be ~130 GB): if it dies
  while exporting, the next call redoes the steps since the last periodic one.
- Output: a Hugging Face directory (safetensors, config, tokenizer + chat template,
  metrics.jsonl, train_summary.json) renamed into `out_dir` when complete.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from avr_core.config import TrainConfig
from avr_core.losses import NEEDS_REFERENCE, PREFERENCE_LOSSES, sft
from avr_core.training import checkpoint, dist
from avr_core.training.data import collate_pairs, collate_sft, pad_id, tokenize_pairs, tokenize_sft
from avr_core.training.logps import pair_logps

log = logging.getLogger(__name__)

LOSSES = ("sft", *PREFERENCE_LOSSES)
# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("loss", "beta", "gamma", "lr", "weight_decay", "warmup_ratio", "epochs",
                "micro_batch_size", "grad_accum", "max_length", "last_turn_only", "zero_stage",
                "bf16", "seed")


def as_train_config(cfg: TrainConfig | dict | Any) -> TrainConfig:
    """TrainConfig, a plain dict of its fields, or an OmegaConf section -> TrainConfig."""
    if isinstance(cfg, TrainConfig):
        cfg = dataclasses.asdict(cfg)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    d = {k: cfg[k] for k in cfg}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown training config keys {unknown}; known: {sorted(fields)}")
    c = TrainConfig(**d)
    for key, ok, need in (("loss", c.loss in LOSSES, f"one of {LOSSES}"),
                          ("micro_batch_size", c.micro_batch_size >= 1, ">= 1"),
                          ("grad_accum", c.grad_accum >= 1, ">= 1"),
                          ("epochs", c.epochs >= 1, ">= 1"),
                          ("max_length", c.max_length > 0, "> 0"),
                          ("zero_stage", c.zero_stage in (0, 1, 2, 3), "0..3")):
        if not ok:
            raise ValueError(f"training config key '{key}': must be {need} (got {getattr(c, key)!r})")
    return c


# ---------------------------------------------------------------- data stream

class Stream:
    """Deterministic order: position p -> example index perm(p // n)[p % n]."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def index(self, p: int) -> int:
        epoch = p // self.n
        if epoch not in self._perms:
            perm = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._perms[epoch] = perm
        return self._perms[epoch][p % self.n]


def micro_positions(step: int, k: int, rank: int, mbs: int, gas: int, world: int) -> range:
    """Stream positions of micro-batch k (0..gas-1) of 0-based optimizer step `step` on `rank`.

    >>> list(micro_positions(step=1, k=0, rank=1, mbs=2, gas=2, world=2))   # G = 8
    [10, 11]
    """
    start = step * mbs * gas * world + (k * world + rank) * mbs
    return range(start, start + mbs)


def lr_lambda(total: int, warmup_ratio: float):
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine decay towards 0.

    >>> f = lr_lambda(total=10, warmup_ratio=0.2)          # 2 warmup steps
    >>> [round(f(s), 3) for s in range(10)]
    [0.333, 0.667, 1.0, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038]
    """
    warmup = math.ceil(warmup_ratio * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# ---------------------------------------------------------------- setup

def ds_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed config: batch shape, ZeRO stage, precision, clipping. Optimizer and
    scheduler are client objects, so no fused Adam is compiled."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if cfg.zero3_persistence_threshold >= 0:    # else DeepSpeed's default (1e5 elements stay resident)
            zero["stage3_param_persistence_threshold"] = cfg.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(cfg.bf16)},
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def zero3_residency(model) -> dict:
    """What ZeRO-3 did to the parameters, read after training: how many there are, how many stay
    resident on every rank (`ds_persist`: below the persistence threshold), and how many are
    released now (their local data empty: gathered for each forward/backward, freed after). A
    ZeRO-3 run that gathered nothing has `released == 0` (review F8: a toy model under the
    default threshold)."""
    params = list(model.parameters())
    return {"params": len(params), "persistent": sum(bool(getattr(p, "ds_persist", False)) for p in params),
            "released": sum(hasattr(p, "ds_numel") and p.data.numel() == 0 for p in params)}


def _load_model(model_path: str, cfg: TrainConfig, dsc: dict):
    import torch
    from transformers import AutoModelForCausalLM

    hf_ds = None
    if cfg.zero_stage == 3:   # parameters are partitioned as they load (deepspeed.zero.Init)
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds = HfDeepSpeedConfig(dsc)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, hf_ds


# Parameters that take no weight decay, by name: biases and normalisation weights (Llama's
# input_layernorm / post_attention_layernorm / model.norm, GPT-2's ln_1 / ln_f, BERT's LayerNorm).
_NO_DECAY_NAMES = ("norm", "ln_", "layernorm")


def no_decay(name: str, p) -> bool:
    """Whether parameter `name` is exempt from weight decay: a bias, a normalisation weight, or
    any other parameter that is 1-D in the MODEL (a scale, a gate).

    Decided by name and by the model's own shape, never by `p.ndim` alone: under ZeRO-3 the
    parameters are partitioned as they load (deepspeed.zero.Init) and every `p` is an empty 1-D
    placeholder, whose real shape DeepSpeed keeps in `p.ds_shape`.

    >>> import torch
    >>> [no_decay(n, torch.empty(0)) for n in ("model.layers.0.input_layernorm.weight", "lm_head.bias")]
    [True, True]
    >>> w = torch.empty(0); w.ds_shape = torch.Size([64, 64])            # a partitioned matrix
    >>> no_decay("model.layers.0.self_attn.q_proj.weight", w)
    False
    """
    lower = name.lower()
    shape = getattr(p, "ds_shape", p.shape)
    return lower.endswith(".bias") or lower == "bias" or any(k in lower for k in _NO_DECAY_NAMES) or len(shape) < 2


def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: `weight_decay` for the weight matrices (embeddings included),
    0 for `no_decay` parameters; trainable parameters only, empty groups left out. The same
    groups come out under ZeRO-0/1/2 and under ZeRO-3 (tests/training/test_decay_groups.py)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _engine(model, cfg: TrainConfig, dsc: dict, total: int):
    import deepspeed
    import torch

    opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(total, cfg.warmup_ratio))  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=dsc)
    return engine


def _tokenize(rows, tok, cfg: TrainConfig, ref_logps):
    if cfg.loss == "sft":
        return tokenize_sft(rows, tok, cfg.max_length, cfg.last_turn_only)
    examples, counts = tokenize_pairs(rows, tok, cfg.max_length)
    if cfg.loss == "rm_margin":
        missing = [e["id"] for e in examples if e["reward_margin"] is None]
        if missing:
            raise ValueError(f"loss rm_margin needs 'reward_margin' on every pair; missing on {missing[:5]}")
    if cfg.loss in NEEDS_REFERENCE:
        if ref_logps is None:
            raise ValueError(f"loss {cfg.loss} needs reference log-probs: compute them once with "
                             "avr_core.training.compute_reference_logps and pass ref_logps")
        missing = [e["id"] for e in examples if e["id"] not in ref_logps]
        if missing:
            raise ValueError(f"ref_logps has no entry for {len(missing)} pair(s), e.g. {missing[:5]}")
        for e in examples:
            ref = ref_logps[e["id"]]
            e["ref"] = (float(ref[0]), float(ref[1]))
            if len(ref) >= 4 and ref[2] is not None:
                n = (sum(l != -100 for l in e["chosen_labels"]), sum(l != -100 for l in e["rejected_labels"]))
                if (ref[2], ref[3]) != n:
                    raise ValueError(f"pair {e['id']!r}: reference log-probs cover {ref[2:4]} completion "
                                     f"tokens, this tokenisation {n} (different max_length or tokenizer?)")
    return examples, counts


def _fingerprint(cfg: TrainConfig, examples: list[dict], world: int, planned: int) -> dict:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e["id"], e.get("input_ids") or e.get("chosen_input_ids"),
                             e.get("rejected_input_ids")]).encode())
    return {**{k: getattr(cfg, k) for k in _RESUME_KEYS}, "world_size": world,
            "planned_steps": planned, "data": h.hexdigest()[:16]}


# ---------------------------------------------------------------- one micro-batch

def _micro(engine, batch: dict, cfg: TrainConfig, device) -> tuple[Any, dict]:
    import torch

    t = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if cfg.loss == "sft":
        logits = engine(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False).logits
        return sft(logits, t["labels"]), {}
    lc, lr, nc, nr = pair_logps(engine, t)
    fn = PREFERENCE_LOSSES[cfg.loss]
    if cfg.loss == "simpo":
        loss, (cr, rr) = fn(lc, lr, nc.float(), nr.float(), beta=cfg.beta, gamma=cfg.gamma)
    else:
        ref = batch["ref"].to(device)
        ref_c, ref_r = ref[:, 0], ref[:, 1]
        if cfg.loss == "rm_margin":
            loss, (cr, rr) = fn(lc, lr, ref_c, ref_r, t["reward_margin"], beta=cfg.beta, gamma=cfg.gamma)
        else:
            loss, (cr, rr) = fn(lc, lr, ref_c, ref_r, beta=cfg.beta)
    stats = {"reward_accuracy": (cr > rr).float().mean(), "reward_margin": (cr - rr).mean(),
             "reward_chosen": cr.mean(), "reward_rejected": rr.mean(),
             "logp_chosen": lc.detach().mean(), "logp_rejected": lr.detach().mean()}
    return loss, stats


def _collate(examples: list[dict], cfg: TrainConfig, pid: int) -> dict:
    import torch

    if cfg.loss == "sft":
        return collate_sft(examples, pid)
    batch = collate_pairs(examples, pid)
    if cfg.loss in NEEDS_REFERENCE:
        batch["ref"] = torch.tensor([e["ref"] for e in examples], dtype=torch.float32)
    return batch


def _mean_over_ranks(values: dict[str, float], world: int, device) -> dict[str, float]:
    if world == 1:
        return values
    import deepspeed.comm as ds_dist
    import torch

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    ds_dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------- train

@dataclasses.dataclass
class Run:
    """What one call of `train` works on, decided before the engine exists."""
    cfg: TrainConfig
    examples: list[dict]
    counts: dict
    out_dir: Path
    ckpt_dir: Path
    rank: int
    world: int
    device: Any
    planned: int            # steps the LR schedule spans (epochs x examples / global batch)
    last: int               # the step this call stops at (step_cap caps, never reshapes)
    fingerprint: dict
    pad_id: int
    t0: float

    @property
    def global_batch(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.grad_accum * self.world


def train(model_path: str, rows: list[dict], cfg: TrainConfig | dict, out_dir: str, ckpt_dir: str,
          ref_logps: dict | None = None, progress: bool = True, keep_last: int = 2) -> dict:
    """Train (or resume training) and write the model directory; returns a summary.

    >>> s = train(tiny_llama, sft_rows, {"loss": "sft", "lr": 1e-3, "step_cap": 3,
    ...           "zero_stage": 0, "checkpoint_every": 2}, "out/model", "out/ckpt")  # doctest: +SKIP
    >>> {k: s[k] for k in ("steps", "planned_steps", "resumed_from", "tokenize")}    # doctest: +SKIP
    {'steps': 3, 'planned_steps': 8, 'resumed_from': None,
     'tokenize': {'kept': 8, 'truncated': 0, 'dropped_too_long': 0}}

    rows: RSFT rows (loss sft) or pair rows (the rest); see avr_core.training.data.
    ref_logps: {pair id: (ref_chosen, ref_rejected[, n_chosen, n_rejected])}, required by
    dpo / ipo / rm_margin (see logps.ref_logps_by_id).
    Summary keys: loss, steps, planned_steps, resumed_from, final_loss, examples, tokenize
    (kept / truncated / dropped_too_long), world_size, zero_stage, bf16, init_s, train_s,
    tokens_per_s, export_s, wall_s, out_dir; with ZeRO-3 also zero3 (`zero3_residency`).
    """
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    t0 = time.time()
    cfg = as_train_config(cfg)
    with dist.session() as (rank, world, local_rank):
        tok = AutoTokenizer.from_pretrained(model_path)
        examples, counts = _tokenize(rows, tok, cfg, ref_logps)
        if not examples:
            raise ValueError(f"no training examples left after tokenisation: {counts}")
        batch = cfg.micro_batch_size * cfg.grad_accum * world
        planned = max(1, cfg.epochs * len(examples) // batch)
        if rank == 0 and len(examples) < batch:       # e.g. 1 example x 4 slots: one step on copies of it
            log.warning("%s: %d examples fill less than one global batch (%d): %d optimizer step(s) over repeats "
                        "of the same examples", cfg.loss, len(examples), batch, planned)
        run = Run(cfg, examples, counts, Path(out_dir), Path(ckpt_dir), rank, world,
                  torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu"),
                  planned, min(planned, cfg.step_cap) if cfg.step_cap > 0 else planned,
                  _fingerprint(cfg, examples, world, planned), pad_id(tok), t0)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        dsc = ds_config(cfg, world)
        model, hf_ds = _load_model(model_path, cfg, dsc)
        try:
            engine = _engine(model, cfg, dsc, planned)
            try:
                summary = _loop(engine, run, progress, keep_last)
                if cfg.zero_stage == 3:
                    summary["zero3"] = zero3_residency(engine.module)
                t_export = time.time()
                engine.module.config.use_cache = True
                checkpoint.export_hf(engine, tok, run.out_dir, rank, files={
                    "metrics.jsonl": "".join(json.dumps(m) + "\n" for m in summary.pop("metrics")),
                    "train_summary.json": json.dumps(summary, indent=1)})
                summary["export_s"] = round(time.time() - t_export, 3)
                summary["wall_s"] = round(time.time() - t0, 3)    # the file's wall_s stops before export
                return summary
            finally:
                engine.destroy()
        finally:
            if hf_ds is not None:
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config
                unset_hf_deepspeed_config()
            del model
            gc.collect()


def _resume(engine, run: Run) -> dict | None:
    state = checkpoint.load(engine, run.ckpt_dir, run.rank)
    if state is not None:
        diff = [k for k in run.fingerprint if state["fingerprint"].get(k) != run.fingerprint[k]]
        if diff:
            raise ValueError(f"{run.ckpt_dir} holds a checkpoint of a different run (differs in {diff}); "
                             "use a fresh ckpt_dir")
    return state


def _note_progress(ckpt_dir: Path, step: int, last: int) -> None:
    """`progress.json` beside the checkpoints: the step reached and the last step of this call, read
    by the process that launched the training (a stage's progress artifact). Replaced atomically."""
    tmp = ckpt_dir / f"progress.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"step": step, "of": last}))
    os.replace(tmp, ckpt_dir / "progress.json")


def _loop(engine, run: Run, progress: bool, keep_last: int) -> dict:
    """Resume if there is a checkpoint, then optimizer steps up to run.last."""
    from tqdm.auto import tqdm

    cfg, n, G = run.cfg, len(run.examples), run.global_batch
    init_s = time.time() - run.t0
    state = _resume(engine, run)
    step, metrics = (state["step"], state["metrics"]) if state else (0, [])
    live = run.ckpt_dir / "metrics.live.jsonl"            # follows the run; rewound on resume
    if run.rank == 0:
        live.parent.mkdir(parents=True, exist_ok=True)
        live.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    stream = Stream(n, cfg.seed)
    bar = tqdm(total=run.last, initial=step, desc=f"train {cfg.loss}", unit="step",
               disable=not progress or run.rank != 0)
    tokens_run, t_train = 0, time.time()
    engine.train()
    while step < run.last:
        t_step = time.time()
        lr = engine.get_lr()[0]                           # the rate this step uses
        sums: dict[str, float] = {"tokens": 0.0}
        for k in range(cfg.grad_accum):
            pos = micro_positions(step, k, run.rank, cfg.micro_batch_size, cfg.grad_accum, run.world)
            batch = _collate([run.examples[stream.index(p)] for p in pos], cfg, run.pad_id)
            loss, stats = _micro(engine, batch, cfg, run.device)
            engine.backward(loss)
            engine.step()                                 # DeepSpeed steps on the accumulation boundary
            sums["tokens"] += float(batch["attention_mask"].sum())
            for name, v in {"loss": loss, **stats}.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach()) / cfg.grad_accum
        step += 1
        row = _mean_over_ranks(sums, run.world, run.device)
        tokens = int(round(row.pop("tokens") * run.world))
        tokens_run += tokens
        elapsed = time.time() - t_step
        row = {"step": step, **row, "lr": lr, "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
               "step_s": elapsed, "epoch": step * G / n}
        metrics.append(row)
        if run.rank == 0:
            with live.open("a") as f:
                f.write(json.dumps(row) + "\n")
            _note_progress(run.ckpt_dir, step, run.last)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        stopped_early = step == run.last < run.planned       # step_cap: a later call continues
        if (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or stopped_early:
            checkpoint.save(engine, run.ckpt_dir, step, {
                "step": step, "examples_seen": step * G, "epoch": step * G // n,
                "position_in_epoch": step * G % n, "micro_batches_seen": step * cfg.grad_accum,
                "shuffle_seed": cfg.seed, "fingerprint": run.fingerprint, "metrics": metrics},
                run.rank, keep_last)
    bar.close()
    train_s = time.time() - t_train
    return {
        "loss": cfg.loss, "steps": step, "planned_steps": run.planned,
        "resumed_from": state["step"] if state else None,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "examples": n, "tokenize": run.counts, "world_size": run.world,
        "zero_stage": cfg.zero_stage, "bf16": cfg.bf16, "init_s": round(init_s, 3),
        "train_s": round(train_s, 3), "tokens_per_s": tokens_run / train_s if tokens_run else None,
        "wall_s": round(time.time() - run.t0, 3), "out_dir": str(run.out_dir), "metrics": metrics,
    }
