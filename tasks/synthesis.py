"""Stage-1 synthesis tasks (docs/DESIGN.md steps 1-5): thin wrappers that move artifact references.

Each stage: a spec (its hashed config section and inputs) and a body that reads the input
artifact and runs the `avr_core` round shard by shard; the skeleton in `tasks/runtime/skeleton.py` does
the rest (cache check, lock, input verification, manifest, publishing).
"""
from __future__ import annotations

from pathlib import Path

from avr_core import synthesis as core
from avr_core.backends import make_generator
from avr_core.config import resolve_max_new_tokens
from avr_core.identity import dataset_identity
from avr_core.inputs import HUB_PREFIX, load_prompts
from avr_core.prompts import CONVERSATION_JUDGES
from avr_core.scorers import make_scorer
from avr_core.selection import SelectRules, rsft_mix, select as select_records
from avr_core.store import ArtifactRef, file_digest
from tasks.runtime import Backend, Lazy, Output, Spec, model_artifacts, policy_identity, scorer_identity, stage

ROOT = Path(__file__).resolve().parent.parent


def resolve_data_path(p: str) -> str:
    """Relative prompt paths: the working directory first, then the project checkout."""
    if Path(p).exists() or "://" in p:
        return p
    alt = ROOT / p
    return str(alt) if alt.exists() else p


# -- prompts ----------------------------------------------------------------------------------
def prompts_spec(cfg: dict, split: str) -> Spec:
    path = resolve_data_path(cfg["data"]["prompts"])
    digest = hub_prompts_identity(path) if path.startswith(HUB_PREFIX) else file_digest(path)[:16]
    return Spec("prompts", {"file_sha256": digest, "split": split, "slice": list(cfg["data"][split])})


def hub_prompts_identity(path: str) -> str:
    """`hf://<dataset>:<split>` keyed by the dataset's name AND its resolved commit: a new
    upstream snapshot is new prompts (avr_core/identity.py)."""
    return f"{path}@{dataset_identity(path[len(HUB_PREFIX):].partition(':')[0])}"


def validate_prompts(cfg: dict) -> int:
    """Read and check the whole prompt file; raises InputError naming file, line and field."""
    return len(load_prompts(resolve_data_path(cfg["data"]["prompts"])))


@stage(prompts_spec, retries=0, timeout_s=600)
def prompts(out: Output, cfg: dict, split: str) -> None:
    """The [start, stop) slice `data.<split>` of the validated prompt file."""
    rows = load_prompts(resolve_data_path(cfg["data"]["prompts"]))
    start, stop = cfg["data"][split]
    chosen = rows[start:stop]
    work = lambda shard, i: ({"records": shard}, {"file_rows": len(rows)} if i == 0 else {})  # noqa: E731
    out.shards(lambda: chosen, max(1, len(chosen)), work)


# -- respond / critique / refine --------------------------------------------------------------
def _gen_spec(cfg: dict, policy: dict, stage_name: str, inp: ArtifactRef) -> Spec:
    section = {stage_name: cfg[stage_name], "policy": policy_identity(policy, cfg["generator"]),
               "generator": cfg["generator"], "shard_size": cfg["shard_size"]}
    return Spec(stage_name, section, (inp,), tuple(model_artifacts(cfg, policy)))


def _sampling(cfg: dict, stage_name: str) -> core.Sampling:
    s = dict(cfg[stage_name]["sampling"])   # max_new_tokens null: up to the context (paper preset)
    return core.Sampling(**{**s, "max_new_tokens": resolve_max_new_tokens(s["max_new_tokens"], cfg["generator"])})


def _generate(out: Output, cfg: dict, policy: dict, inp: ArtifactRef, fn) -> None:
    """Shard by shard: `fn(shard, generator, shard_index)` -> (records, counts)."""
    gen = Backend(lambda: make_generator(policy, cfg["generator"]))  # loaded only on a cache miss
    out.shards(lambda: out.store.read_records(inp), cfg["shard_size"],
               lambda shard, i: _records(fn(shard, gen, i)), stats=gen.stats)


def _records(result):
    records, counts = result
    return {"records": records}, counts


def respond_spec(cfg, policy, prompts):
    return _gen_spec(cfg, policy, "respond", prompts)


@stage(respond_spec)
def respond(out: Output, cfg: dict, policy: dict, prompts: ArtifactRef) -> None:
    """y0 for every prompt (step 1)."""
    s = _sampling(cfg, "respond")
    _generate(out, cfg, policy, prompts, lambda shard, gen, i: core.respond(
        shard, gen, s, cfg["respond"]["use_dataset_answer"], salt=i, keep_empty=cfg["respond"]["keep_empty"]))


def critique_spec(cfg, policy, answers):
    return _gen_spec(cfg, policy, "critique", answers)


@stage(critique_spec)
def critique(out: Output, cfg: dict, policy: dict, answers: ArtifactRef) -> None:
    """K critiques per answer, retried until a rating parses, then dropped or forced (step 2)."""
    c, s = cfg["critique"], _sampling(cfg, "critique")
    _generate(out, cfg, policy, answers, lambda shard, gen, i: core.critique(
        shard, gen, c["k"], s, c["max_tries"], c["force_rating"], salt=i))


def refine_spec(cfg, policy, critiques):
    return _gen_spec(cfg, policy, "refine", critiques)


@stage(refine_spec)
def refine(out: Output, cfg: dict, policy: dict, critiques: ArtifactRef) -> None:
    """M refinements per critique (step 3)."""
    s = _sampling(cfg, "refine")
    judge = CONVERSATION_JUDGES[cfg["refine"]["conversation_judge"]]
    _generate(out, cfg, policy, critiques, lambda shard, gen, i: core.refine(
        shard, gen, cfg["refine"]["m"], s, salt=i, judge=judge, keep_empty=cfg["refine"]["keep_empty"]))


# -- rm_score / select ------------------------------------------------------------------------
def rm_score_spec(cfg, refinements):
    section = {"scorer": scorer_identity(cfg["scorer"]), "shard_size": cfg["shard_size"]}
    return Spec("rm_score", section, (refinements,))


@stage(rm_score_spec)
def rm_score(out: Output, cfg: dict, refinements: ArtifactRef) -> None:
    """r(x, y0) and r(x, y') for every refinement (step 4)."""
    scorer = Backend(lambda: make_scorer(cfg["scorer"]))
    out.shards(lambda: out.store.read_records(refinements), cfg["shard_size"],
               lambda shard, i: _records(core.rm_score(shard, scorer)), stats=scorer.stats)


def select_spec(cfg, scored, prompts=None):
    mix = prompts is not None and cfg["select"]["rsft_mix_chosen"]
    return Spec("select", {"select": cfg["select"]}, (scored, prompts) if mix else (scored,))


@stage(select_spec, retries=0, timeout_s=3600)
def select(out: Output, cfg: dict, scored: ArtifactRef, prompts: ArtifactRef | None = None) -> None:
    """RSFT examples and the three pair kinds, every filter counted (step 5). With
    `select.rsft_mix_chosen` and the synthesis's `prompts`, the RSFT data also gets every unused
    dataset `chosen` conversation of that slice (the authors' prepare_sft_data.py), prompts that
    were dropped before scoring included."""
    rules = SelectRules(**cfg["select"])
    mix = prompts is not None and rules.rsft_mix_chosen
    source = Lazy(lambda: {p["id"]: p for p in out.store.read_records(prompts)})

    def rows():
        recs = out.store.read_records(scored)
        if not mix:
            return recs
        have = {r["id"] for r in recs}
        return recs + [{"id": i, "mix_only": True} for i in source.get() if i not in have]

    def work(shard, i):
        rsft, pairs, counts = select_records([r for r in shard if not r.get("mix_only")], rules)
        if mix:
            extra, more = rsft_mix([source.get()[r["id"]] for r in shard], rsft)
            rsft, counts = rsft + extra, counts + more
        return {"rsft": rsft, "pairs": pairs}, counts
    out.shards(rows, cfg["shard_size"], work)

