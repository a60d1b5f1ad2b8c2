"""Stage-1 synthesis tasks (DESIGN.md steps 1-5): thin wrappers that move artifact references.

Each task: compute its artifact key -> return at once if the store has it -> else read the
input artifact, run the `avr_core` round shard by shard, commit, write the manifest.
"""
from __future__ import annotations

from pathlib import Path

import avr_core.backends.hf
import avr_core.inputs
import avr_core.parsing
import avr_core.selection
import avr_core.synthesis
from avr_core import synthesis as core
from avr_core.backends import make_generator, make_scorer
from avr_core.inputs import load_prompts
from avr_core.selection import SelectRules, select as select_records
from avr_core.store import ArtifactRef, cache_key, code_version, file_digest
from tasks.common import model_artifacts, policy_identity, run_sharded, stage_task, store_of

ROOT = Path(__file__).resolve().parent.parent
_SYNTH = code_version(avr_core.synthesis, avr_core.backends.hf)


def resolve_data_path(p: str) -> str:
    """Relative prompt paths: the working directory first, then the project checkout."""
    if Path(p).exists() or "://" in p:
        return p
    alt = ROOT / p
    return str(alt) if alt.exists() else p


def _ref(cfg: dict, stage: str, section: dict, inputs: list[ArtifactRef], code: str) -> ArtifactRef:
    return store_of(cfg).ref(stage, cache_key(stage, section, [str(r) for r in inputs], code))


# -- prompts ----------------------------------------------------------------------------------
def _prompts_section(cfg: dict, split: str) -> dict:
    path = resolve_data_path(cfg["data"]["prompts"])
    return {"file_sha256": file_digest(path)[:16], "split": split, "slice": list(cfg["data"][split])}


def prompts_ref(cfg: dict, split: str) -> ArtifactRef:
    return _ref(cfg, "prompts", _prompts_section(cfg, split), [], code_version(avr_core.inputs))


def validate_prompts(cfg: dict) -> int:
    """Read and check the whole prompt file; raises InputError naming file, line and field."""
    return len(load_prompts(resolve_data_path(cfg["data"]["prompts"])))


@stage_task(prompts_ref, retries=0, timeout_s=600)
def prompts(cfg: dict, split: str) -> ArtifactRef:
    """The [start, stop) slice `data.<split>` of the validated prompt file."""
    ref = prompts_ref(cfg, split)
    rows = load_prompts(resolve_data_path(cfg["data"]["prompts"]))
    start, stop = cfg["data"][split]
    chosen = rows[start:stop]
    work = lambda shard, i: ({"records": shard}, {"file_rows": len(rows)} if i == 0 else {})  # noqa: E731
    return run_sharded(store_of(cfg), ref, _prompts_section(cfg, split), [], code_version(avr_core.inputs),
                       lambda: chosen, max(1, len(chosen)), work)


# -- respond / critique / refine --------------------------------------------------------------
def _gen_section(cfg: dict, policy: dict, stage: str) -> dict:
    return {stage: cfg[stage], "policy": policy_identity(policy), "generator": cfg["generator"], "shard_size": cfg["shard_size"]}


def _sampling(cfg: dict, stage: str) -> core.Sampling:
    return core.Sampling(**cfg[stage]["sampling"])


def _generation_stage(cfg, stage, policy, inp, fn):
    section = _gen_section(cfg, policy, stage)
    ref, store = _ref(cfg, stage, section, [inp], _SYNTH), store_of(cfg)
    gen = _Lazy(lambda: make_generator(policy, cfg["generator"]))  # loaded only on a cache miss
    return run_sharded(store, ref, section, [inp], _SYNTH, lambda: store.read_records(inp), cfg["shard_size"],
                       lambda shard, i: _records(fn(shard, gen.get(), i)), stats=gen.stats,
                       models=model_artifacts(cfg, policy))


class _Lazy:
    """A backend built on first use, so a cache hit never loads a model."""

    def __init__(self, build):
        self.build, self.obj = build, None

    def get(self):
        if self.obj is None:
            self.obj = self.build()
        return self.obj

    def stats(self) -> dict:
        return self.get().stats.as_dict()


def _records(result):
    records, counts = result
    return {"records": records}, counts


def respond_ref(cfg, policy, prompts):
    return _ref(cfg, "respond", _gen_section(cfg, policy, "respond"), [prompts], _SYNTH)


@stage_task(respond_ref)
def respond(cfg: dict, policy: dict, prompts: ArtifactRef) -> ArtifactRef:
    """y0 for every prompt (step 1)."""
    s = _sampling(cfg, "respond")
    return _generation_stage(cfg, "respond", policy, prompts, lambda shard, gen, i: core.respond(
        shard, gen, s, cfg["respond"]["use_dataset_answer"], salt=i))


def critique_ref(cfg, policy, answers):
    return _ref(cfg, "critique", _gen_section(cfg, policy, "critique"), [answers], _SYNTH)


@stage_task(critique_ref)
def critique(cfg: dict, policy: dict, answers: ArtifactRef) -> ArtifactRef:
    """K critiques per answer, retried until a rating parses, then dropped or forced (step 2)."""
    c, s = cfg["critique"], _sampling(cfg, "critique")
    return _generation_stage(cfg, "critique", policy, answers, lambda shard, gen, i: core.critique(
        shard, gen, c["k"], s, c["max_tries"], c["force_rating"], salt=i))


def refine_ref(cfg, policy, critiques):
    return _ref(cfg, "refine", _gen_section(cfg, policy, "refine"), [critiques], _SYNTH)


@stage_task(refine_ref)
def refine(cfg: dict, policy: dict, critiques: ArtifactRef) -> ArtifactRef:
    """M refinements per critique (step 3)."""
    s = _sampling(cfg, "refine")
    return _generation_stage(cfg, "refine", policy, critiques, lambda shard, gen, i: core.refine(
        shard, gen, cfg["refine"]["m"], s, salt=i))


# -- rm_score / select ------------------------------------------------------------------------
def _score_section(cfg):
    return {"scorer": cfg["scorer"], "shard_size": cfg["shard_size"]}


def rm_score_ref(cfg, refinements):
    return _ref(cfg, "rm_score", _score_section(cfg), [refinements], _SYNTH)


@stage_task(rm_score_ref)
def rm_score(cfg: dict, refinements: ArtifactRef) -> ArtifactRef:
    """r(x, y0) and r(x, y') for every refinement (step 4)."""
    ref, store = rm_score_ref(cfg, refinements), store_of(cfg)
    scorer = _Lazy(lambda: make_scorer(cfg["scorer"]))
    return run_sharded(store, ref, _score_section(cfg), [refinements], _SYNTH, lambda: store.read_records(refinements),
                       cfg["shard_size"], lambda shard, i: _records(core.rm_score(shard, scorer.get())),
                       stats=scorer.stats)


_SELECT = code_version(avr_core.selection, avr_core.parsing)


def select_ref(cfg, scored):
    return _ref(cfg, "select", {"select": cfg["select"]}, [scored], _SELECT)


@stage_task(select_ref, retries=0, timeout_s=3600)
def select(cfg: dict, scored: ArtifactRef) -> ArtifactRef:
    """RSFT examples and the three pair kinds, every filter counted (step 5)."""
    ref, store = select_ref(cfg, scored), store_of(cfg)
    rules = SelectRules(**cfg["select"])

    def work(shard, i):
        rsft, pairs, counts = select_records(shard, rules)
        return {"rsft": rsft, "pairs": pairs}, counts
    return run_sharded(store, ref, {"select": cfg["select"]}, [scored], _SELECT, lambda: store.read_records(scored),
                       cfg["shard_size"], work)
