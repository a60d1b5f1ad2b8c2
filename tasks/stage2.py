"""Stage-2 tasks (docs/DESIGN.md steps 7-9): greedy search, long thoughts, S sampled thoughts per
fresh prompt scored on their final answers, and length-controlled thought pairs.
Training reuses `tasks.training` (train_sft with section cot_sft, train_po with cot_po)."""
from __future__ import annotations

import json

from avr_core import synthesis as core
from avr_core.backends import make_generator
from avr_core.config import resolve_max_new_tokens
from avr_core.prompts import CONVERSATION_JUDGES
from avr_core.scaling import plot_search_gain, search_gain_table
from avr_core.scorers import make_scorer
from avr_core.search import SearchConfig, ThoughtRules, greedy_search, long_thought, search_starts_from_dataset
from avr_core.selection import ThoughtPairRules, thought_pairs as pair_thoughts
from avr_core.store import ArtifactRef, Store
from avr_core.thought_sampling import sample_thoughts as sample_thoughts_core
from tasks.runtime import Backend, Output, Spec, model_artifacts, plot_markdown, policy_identity, scorer_identity, stage


def search_spec(cfg, policy, prompts) -> Spec:
    section = {"search": cfg["search"], "critique": cfg["critique"], "refine": cfg["refine"],
               "respond": cfg["respond"], "policy": policy_identity(policy, cfg["generator"]),
               "generator": cfg["generator"], "scorer": scorer_identity(cfg["scorer"]), "shard_size": cfg["shard_size"]}
    return Spec("search", section, (prompts,), tuple(model_artifacts(cfg, policy)))


def _gain_view(store: Store, ref: ArtifactRef, m: dict) -> str:
    """The score gain per round (written beside the traces) as a plot on the stage's report (m: its manifest)."""
    if "score_gain.png" not in m["files"]:
        return ""
    return plot_markdown(store.read_file(ref, "score_gain.png", m), "score gain per round")


@stage(search_spec, view=_gain_view)
def search(out: Output, cfg: dict, policy: dict, prompts: ArtifactRef) -> None:
    """Answer each prompt, then greedy critique/refine rounds, all active prompts per call."""
    gen = Backend(lambda: make_generator(policy, cfg["generator"]))
    scorer = Backend(lambda: make_scorer(cfg["scorer"]))
    s = cfg["search"]
    scfg = SearchConfig(k=s["k"], m=s["m"], max_rounds=s["max_rounds"], max_tries=cfg["critique"]["max_tries"],
                        force_rating=cfg["critique"]["force_rating"], keep_empty=cfg["refine"]["keep_empty"],
                        refine_judge=CONVERSATION_JUDGES[cfg["refine"]["conversation_judge"]])

    use_dataset = search_starts_from_dataset(s["start"], cfg["respond"]["use_dataset_answer"])

    def work(shard, i):
        answered, counts = core.respond(shard, gen, _sampling(cfg, "respond"), use_dataset, salt=i,
                                        keep_empty=cfg["respond"]["keep_empty"])
        traces, c2 = greedy_search(answered, gen, scorer, scfg, _sampling(cfg, "critique"),
                                   _sampling(cfg, "refine"), salt=i)
        return {"records": traces}, counts + c2
    out.shards(lambda: out.store.read_records(prompts), cfg["shard_size"], work, stats=gen.stats)
    rows = search_gain_table(out.committed_records())     # the score gain per round, beside the traces
    out.write_file("score_gain.json", json.dumps(rows, indent=2).encode())
    out.write_file("score_gain.png", plot_search_gain(rows))


def thoughts_spec(cfg, traces) -> Spec:
    return Spec("thoughts", {"search": cfg["search"], "redundancy_threshold": cfg["select"]["redundancy_threshold"]},
                (traces,))


@stage(thoughts_spec, retries=0, timeout_s=3600)
def thoughts(out: Output, cfg: dict, traces: ArtifactRef) -> None:
    """Each search trace as ONE assistant turn (CoT-SFT rows, output `rsft`), drops counted."""
    s = cfg["search"]
    rules = ThoughtRules(s["drop_no_first_improvement"], s["drop_no_terminating_critique"],
                         s["drop_redundant_answer"], s["drop_marker_in_text"], cfg["select"]["redundancy_threshold"])

    def work(shard, i):
        rows, counts = long_thought(shard, rules)
        return {"rsft": rows}, counts
    out.shards(lambda: out.store.read_records(traces), cfg["shard_size"], work)


def sample_thoughts_spec(cfg, policy, prompts) -> Spec:
    section = {"thought": cfg["thought"], "policy": policy_identity(policy, cfg["generator"]),
               "generator": cfg["generator"], "scorer": scorer_identity(cfg["scorer"]), "shard_size": cfg["shard_size"]}
    return Spec("thought_samples", section, (prompts,), tuple(model_artifacts(cfg, policy)))


@stage(sample_thoughts_spec)
def sample_thoughts(out: Output, cfg: dict, policy: dict, prompts: ArtifactRef) -> None:
    """S thoughts per prompt from the CoT model (one call per shard); the FINAL answers scored."""
    gen = Backend(lambda: make_generator(policy, cfg["generator"]))
    scorer = Backend(lambda: make_scorer(cfg["scorer"]))
    sampling, t = _sampling(cfg, "thought"), cfg["thought"]

    def work(shard, i):
        recs, counts = sample_thoughts_core(shard, gen, scorer, sampling, t["s"], i,
                                            extract=t["extract"], final_answer_tries=t["final_answer_tries"],
                                            drop_no_final=t["drop_no_final"], score_answer=t["beat_answer"])
        return {"records": recs}, counts
    out.shards(lambda: out.store.read_records(prompts), cfg["shard_size"], work, stats=gen.stats)


def _sampling(cfg: dict, section: str) -> core.Sampling:
    s = dict(cfg[section]["sampling"])    # max_new_tokens null: up to the context (paper preset)
    return core.Sampling(**{**s, "max_new_tokens": resolve_max_new_tokens(s["max_new_tokens"], cfg["generator"])})


def thought_pairs_spec(cfg, samples) -> Spec:
    return Spec("thought_pairs", {"thought": cfg["thought"]}, (samples,))


@stage(thought_pairs_spec, retries=0, timeout_s=3600)
def thought_pairs(out: Output, cfg: dict, samples: ArtifactRef) -> None:
    """Best vs worst thought per prompt, length-controlled on the final answer (output `pairs`)."""
    t = cfg["thought"]
    rules = ThoughtPairRules(min_margin=t["min_margin"], length_rule=t["length_rule"], beat_answer=t["beat_answer"])

    def work(shard, i):
        pairs, counts = pair_thoughts(shard, rules)
        return {"pairs": pairs}, counts
    out.shards(lambda: out.store.read_records(samples), cfg["shard_size"], work)
