"""Test-time-scaling tasks (docs/DESIGN.md step 11): a Stage-1 model refines held-out prompts for
R = 0..tts.rounds rounds, every intermediate answer is scored, and the curve (table + PNG)
goes into the store and onto the Prefect run as artifacts."""
from __future__ import annotations

import json

from avr_core.backends import make_generator
from avr_core.backends.base import SamplingParams
from avr_core.config import resolve_max_new_tokens
from avr_core.scaling import plot_scaling, scaling_table, scored_rounds, to_csv, to_markdown
from avr_core.scorers import make_scorer
from avr_core.store import ArtifactRef, Store
from tasks.evaluate import SMOKE_LABEL, smoke_title
from tasks.runtime import (
    Backend,
    Output,
    Spec,
    logger,
    model_artifacts,
    plot_markdown,
    policy_identity,
    scorer_identity,
    stage,
)


def tts_answers_spec(cfg, policy, prompts) -> Spec:
    section = {"tts": cfg["tts"], "policy": policy_identity(policy, cfg["generator"]),
               "generator": cfg["generator"], "scorer": scorer_identity(cfg["scorer"]), "shard_size": cfg["shard_size"]}
    return Spec("tts_answers", section, (prompts,), tuple(model_artifacts(cfg, policy)))


@stage(tts_answers_spec)
def tts_answers(out: Output, cfg: dict, policy: dict, prompts: ArtifactRef) -> None:
    """Per shard: answer, then R rounds (one generator call per step for the whole shard), then
    ONE scorer call over the answer after every round of every prompt."""
    gen = Backend(lambda: make_generator(policy, cfg["generator"]))
    scorer = Backend(lambda: make_scorer(cfg["scorer"]))
    s = cfg["tts"]["sampling"]
    cap = resolve_max_new_tokens(s["max_new_tokens"], cfg["generator"])    # null: up to the context (paper)
    params = SamplingParams(n=1, temperature=s["temperature"], top_p=s["top_p"], max_new_tokens=cap, seed=s["seed"])

    def work(shard, i):
        records, counts = scored_rounds(shard, gen, scorer, cfg["tts"]["rounds"], params)
        return {"records": records}, counts
    out.shards(lambda: out.store.read_records(prompts), cfg["shard_size"], work, stats=gen.stats)


def tts_curve_spec(cfg, answers, label="stage-1 model") -> Spec:
    return Spec("tts_curve", {"label": label, "smoke": cfg["eval"]["smoke"]}, (answers,))   # smoke: the banner


def _curve_view(store: Store, ref: ArtifactRef, m: dict) -> str:
    """The curve on the stage's report (`tts-curve-report`): the plot and its table (m: its manifest)."""
    md = store.read_file(ref, "scaling.md", m).decode()    # with its smoke-run banner, if any
    logger().info("test-time scaling:\n%s", md)
    return f"{plot_markdown(store.read_file(ref, 'scaling.png', m), 'test-time scaling')}\n\n{md}"


@stage(tts_curve_spec, retries=0, timeout_s=600, view=_curve_view)
def tts_curve(out: Output, cfg: dict, answers: ArtifactRef, label: str = "stage-1 model") -> None:
    """Mean score ± spread and answer length per R: scaling.csv/.md/.json and scaling.png."""
    rows = scaling_table(out.store.read_records(answers))
    out.write_file("scaling.json", json.dumps(rows, indent=2).encode())
    out.write_file("scaling.csv", to_csv(rows).encode())
    out.write_file("scaling.md", to_markdown(rows, smoke_title(cfg)).encode())   # tiny: labelled a smoke run
    title = f"test-time scaling, {label}, scorer={cfg['scorer']['kind']}"
    out.write_file("scaling.png", plot_scaling(rows, f"{SMOKE_LABEL}\n{title}" if smoke_title(cfg) else title))
    out.extra["result"] = rows
