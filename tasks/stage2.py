"""Stage-2 tasks (docs/DESIGN.md steps 7-9): greedy search, long thoughts, S sampled thoughts per
fresh prompt scored on their final answers, and length-controlled thought pairs.
Training reuses `tasks.training` (train_sft with section cot_sft, train_po with cot_po)."""
from __future__ import annotations

import json

import avr_core.scaling
import avr_core.search
import avr_core.selection
import avr_core.scorers
import avr_core.thought
import avr_core.thought_sampling
from avr_core import synthesis as core
from avr_core.backends import make_generator
from avr_core.scaling import plot_search_gain, search_gain_table
from avr_core.search import SearchConfig, ThoughtRules, greedy_search, long_thought
from avr_core.selection import ThoughtPairRules, thought_pairs as pair_thoughts
from avr_core.scorers import make_scorer
from avr_core.store import ArtifactRef, code_version
from avr_core.thought_sampling import sample_thoughts as sample_thoughts_core
from tasks.common import model_artifacts, policy_identity, publish_plot, run_sharded, stage_task, store_of
from tasks.synthesis import _SYNTH, _Lazy, _records, _ref

_S2 = code_version(avr_core.search, avr_core.thought, avr_core.selection, avr_core.scaling,
                   avr_core.thought_sampling, avr_core.scorers) + _SYNTH


def _search_section(cfg, policy):
    return {"search": cfg["search"], "critique": cfg["critique"], "refine": cfg["refine"], "respond": cfg["respond"],
            "policy": policy_identity(policy), "generator": cfg["generator"], "scorer": cfg["scorer"],
            "shard_size": cfg["shard_size"]}


def search_ref(cfg, policy, prompts):
    return _ref(cfg, "search", _search_section(cfg, policy), [prompts], _S2)


@stage_task(search_ref)
def search(cfg: dict, policy: dict, prompts: ArtifactRef) -> ArtifactRef:
    """Answer each prompt, then greedy critique/refine rounds, all active prompts per call."""
    store, ref = store_of(cfg), search_ref(cfg, policy, prompts)
    gen = _Lazy(lambda: make_generator(policy, cfg["generator"]))
    scorer = _Lazy(lambda: make_scorer(cfg["scorer"]))
    s = cfg["search"]
    scfg = SearchConfig(k=s["k"], m=s["m"], max_rounds=s["max_rounds"], max_tries=cfg["critique"]["max_tries"],
                        force_rating=cfg["critique"]["force_rating"])

    def work(shard, i):
        answered, counts = core.respond(shard, gen.get(), core.Sampling(**cfg["respond"]["sampling"]),
                                        cfg["respond"]["use_dataset_answer"], salt=i)
        traces, c2 = greedy_search(answered, gen.get(), scorer.get(), scfg, core.Sampling(**cfg["critique"]["sampling"]),
                                   core.Sampling(**cfg["refine"]["sampling"]), salt=i)
        return {"records": traces}, counts + c2

    def finish(w):   # the score gain per round, as a table and a plot beside the traces
        rows = search_gain_table(w.committed_records())
        w.write_file("score_gain.json", json.dumps(rows, indent=2).encode())
        w.write_file("score_gain.png", plot_search_gain(rows))
    out = run_sharded(store, ref, _search_section(cfg, policy), [prompts], _S2, lambda: store.read_records(prompts),
                      cfg["shard_size"], work, stats=gen.stats, finish=finish,
                      models=model_artifacts(cfg, policy))
    png = store.path(out, "score_gain.png")
    if store.fs.exists(png):
        rows = json.loads(store.fs.cat_file(store.path(out, "score_gain.json")))
        publish_plot(out, "search-score-gain", store.fs.cat_file(png), rows, "score gain per round")
    return out


def thoughts_ref(cfg, traces):
    return _ref(cfg, "thoughts", {"search": cfg["search"]}, [traces], _S2)


@stage_task(thoughts_ref, retries=0, timeout_s=3600)
def thoughts(cfg: dict, traces: ArtifactRef) -> ArtifactRef:
    """Each search trace as ONE assistant turn (CoT-SFT rows, output `rsft`), drops counted."""
    store, ref = store_of(cfg), thoughts_ref(cfg, traces)
    rules = ThoughtRules(cfg["search"]["drop_no_first_improvement"], cfg["search"]["drop_no_terminating_critique"])

    def work(shard, i):
        rows, counts = long_thought(shard, rules)
        return {"rsft": rows}, counts
    return run_sharded(store, ref, {"search": cfg["search"]}, [traces], _S2, lambda: store.read_records(traces),
                       cfg["shard_size"], work)


def _sample_section(cfg, policy):
    return {"thought": cfg["thought"], "policy": policy_identity(policy), "generator": cfg["generator"],
            "scorer": cfg["scorer"], "shard_size": cfg["shard_size"]}


def sample_thoughts_ref(cfg, policy, prompts):
    return _ref(cfg, "thought_samples", _sample_section(cfg, policy), [prompts], _S2)


@stage_task(sample_thoughts_ref)
def sample_thoughts(cfg: dict, policy: dict, prompts: ArtifactRef) -> ArtifactRef:
    """S thoughts per prompt from the CoT model (one call per shard); the FINAL answers scored."""
    store, ref = store_of(cfg), sample_thoughts_ref(cfg, policy, prompts)
    gen = _Lazy(lambda: make_generator(policy, cfg["generator"]))
    scorer = _Lazy(lambda: make_scorer(cfg["scorer"]))
    sampling = core.Sampling(**cfg["thought"]["sampling"])

    def work(shard, i):
        recs, counts = sample_thoughts_core(shard, gen.get(), _ScoreOnUse(scorer), sampling, cfg["thought"]["s"], i)
        return {"records": recs}, counts
    return run_sharded(store, ref, _sample_section(cfg, policy), [prompts], _S2, lambda: store.read_records(prompts),
                       cfg["shard_size"], work, stats=gen.stats, models=model_artifacts(cfg, policy))


class _ScoreOnUse:
    """The lazy scorer as a Scorer: its model loads only when something is scored."""

    def __init__(self, lazy: _Lazy):
        self.lazy = lazy

    def score(self, conversations):
        return self.lazy.get().score(conversations)


def thought_pairs_ref(cfg, samples):
    return _ref(cfg, "thought_pairs", {"thought": cfg["thought"]}, [samples], _S2)


@stage_task(thought_pairs_ref, retries=0, timeout_s=3600)
def thought_pairs(cfg: dict, samples: ArtifactRef) -> ArtifactRef:
    """Best vs worst thought per prompt, length-controlled on the final answer (output `pairs`)."""
    store, ref = store_of(cfg), thought_pairs_ref(cfg, samples)
    rules = ThoughtPairRules(min_margin=cfg["thought"]["min_margin"], length_rule=cfg["thought"]["length_rule"])

    def work(shard, i):
        pairs, counts = pair_thoughts(shard, rules)
        return {"pairs": pairs}, counts
    return run_sharded(store, ref, {"thought": cfg["thought"]}, [samples], _S2, lambda: store.read_records(samples),
                       cfg["shard_size"], work)
