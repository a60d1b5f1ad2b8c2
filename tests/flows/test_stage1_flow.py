"""The stage-1 synthesis flow under Prefect's test harness, on fake backends (control flow only):
caching, what a config change recomputes, and resume after a failure."""
import os

import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

import tasks.synthesis as t  # noqa: E402
from avr_core.config import load_config  # noqa: E402
from avr_core.store import Store, cache_key  # noqa: E402
from flows.stage1 import synthesis  # noqa: E402
from tests.fakes import FakeGenerator, FakeScorer  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_harness")


def cfg_for(tmp_path, *overrides):
    cfg = load_config("tiny", [f"store.root={tmp_path}", "data.stage1_sft=[0,10]", "shard_size=4", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def backends(monkeypatch):
    made = {"gen": [], "scorer": []}

    def gen(policy, backend):
        made["gen"].append(g := FakeGenerator(critiques=["Needs work. Rating: [[4]]", "Fine. Rating: [[7]]"]))
        return g

    def scorer(cfg):
        made["scorer"].append(s := FakeScorer())
        return s
    monkeypatch.setattr(t, "make_generator", gen)
    monkeypatch.setattr(t, "make_scorer", scorer)
    return made


def stage_keys(root):
    store = Store(str(root))
    stages = ("prompts", "respond", "critique", "refine", "rm_score", "select")
    return {s: sorted(r.key for r in store.list(s)) for s in stages}


def test_synthesis_flow_writes_artifacts_then_hits_cache(tmp_path, backends):
    cfg = cfg_for(tmp_path)
    ref = synthesis(cfg, cfg["policy"], "stage1_sft")
    store = Store(str(tmp_path))
    m = store.manifest(ref)
    assert m["rows"]["pairs"] > 0 and m["rows"]["rsft"] > 0 and m["counts"]["input_records"] == 10
    assert len(store.read_records(ref, "pairs")) == m["rows"]["pairs"]
    crit = store.manifest(store.list("critique")[0])
    assert crit["counts"]["backend_calls"] == 3                     # one round call per shard
    calls_first = sum(len(g.calls) for g in backends["gen"])
    assert calls_first > 0

    for a in store.list():   # the key hashes exactly what the manifest records (one Spec builds both)
        am = store.manifest(a)
        assert cache_key(am["stage"], am["config"], am["inputs"], am["code_version"]) == a.key, a
        assert am["code_files"] and all(f.endswith(".py") for f in am["code_files"])

    ref2 = synthesis(cfg, cfg["policy"], "stage1_sft")                # same config: all cached
    assert ref2 == ref
    assert sum(len(g.calls) for g in backends["gen"]) == calls_first   # no generation happened
    assert sum(s.calls for s in backends["scorer"]) == 3               # scored once, never again


@pytest.mark.slow
def test_changing_critique_k_recomputes_critique_and_after_only(tmp_path, backends):
    synthesis(cfg_for(tmp_path), cfg_for(tmp_path)["policy"], "stage1_sft")
    before = stage_keys(tmp_path)
    n_gen = len(backends["gen"])
    cfg3 = cfg_for(tmp_path, "critique.k=3")
    synthesis(cfg3, cfg3["policy"], "stage1_sft")
    after = stage_keys(tmp_path)
    assert after["prompts"] == before["prompts"] and after["respond"] == before["respond"]
    for stage in ("critique", "refine", "rm_score", "select"):
        assert len(after[stage]) == 2, stage
    # nothing before critique generated again: every new call is a critique (n=3), a forced
    # rating (n=1, greedy) or a refinement (n=2) -- never a respond call (n=1, sampled)
    new_calls = [p for g in backends["gen"][n_gen:] for _, p in g.calls]
    assert new_calls and not [p for p in new_calls if p.n == 1 and p.temperature > 0]


def test_failed_stage_resumes_from_its_last_committed_shard(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "critique.force_rating=false")
    healthy = FakeGenerator(critiques=["Rating: [[5]]"])
    monkeypatch.setattr(t, "make_scorer", lambda c: FakeScorer())
    # respond: 3 calls (3 shards); critique shard 0 ok, shard 1 fails for good (call 5, and its retries)
    broken = FakeGenerator(critiques=["Rating: [[5]]"])
    orig = broken.generate

    def dies_on_second_critique_shard(convs, params):
        if params.n == 2 and len([c for c in broken.calls if c[1].n == 2]) >= 1:
            broken.calls.append((len(convs), params))
            raise RuntimeError("injected: worker lost")
        return orig(convs, params)
    broken.generate = dies_on_second_critique_shard
    monkeypatch.setattr(t, "make_generator", lambda p, b: broken)
    with pytest.raises(RuntimeError, match="injected"):
        synthesis(cfg, cfg["policy"], "stage1_sft")
    store = Store(str(tmp_path))
    assert store.list("critique") == [] and len(store.list("respond")) == 1   # no manifest, no artifact

    monkeypatch.setattr(t, "make_generator", lambda p, b: healthy)
    ref = synthesis(cfg, cfg["policy"], "stage1_sft")
    crit_calls = [n for n, p in healthy.calls if p.n == 2 and n > 0]
    # shards 1 and 2 only (4 + 2 prompts) -- shard 0 was committed before the failure
    assert crit_calls[:2] == [4, 2]
    records = store.read_records(store.list("critique")[0])
    ids = [r["id"] for r in records]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert store.exists(ref)


def test_run_records_resolved_config_and_summary(tmp_path, backends):
    import json
    import os

    import yaml

    from flows.params import as_params
    from run_records.lifecycle import finish_run, start_run
    run, cfg = start_run(as_params(preset="tiny", overrides=[f"store.root={tmp_path}", "critique.k=3"]))
    ref = synthesis(cfg, cfg["policy"], "stage1_sft")
    summary = finish_run(run, cfg, {"stage1_synthesis": ref})
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    saved = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert saved["critique"]["k"] == 3 and saved["store"]["root"] == str(tmp_path)
    record = json.loads((runs[0] / "run.json").read_text())
    assert record["stage"]["name"] == "select" and record["pid"] == os.getpid()   # the last stage it computed
    on_disk = json.loads((runs[0] / "summary.json").read_text())
    assert on_disk["outputs"]["stage1_synthesis"]["ref"] == summary["outputs"]["stage1_synthesis"]["ref"] == str(ref)


def test_a_stage_refuses_a_damaged_input(tmp_path, backends):
    """Store integrity: an input whose file no longer matches its manifest stops the next stage
    before any work, naming the artifact and file; nothing of the stage is written."""
    from tasks.runtime.skeleton import InputIntegrityError
    cfg = cfg_for(tmp_path)
    answers = t.respond(cfg, cfg["policy"], t.prompts(cfg, "stage1_sft"))
    data = next((tmp_path / "respond" / answers.key / "data").iterdir())
    data.write_text(data.read_text().replace("An answer.", "An answEr."))      # same size, other bytes
    with pytest.raises(InputIntegrityError, match=rf"respond/{answers.key}: data/.*sha256 differs"):
        t.critique.fn(cfg, cfg["policy"], answers)
    assert not (tmp_path / "critique").exists()


def test_a_run_loads_its_config_once(tmp_path, backends, monkeypatch):
    """The params' validator loads the config; the flow, `start_run` and preflight use that one
    (issue 33). Every module's `load_config` is counted, so a new second load anywhere fails here."""
    import sys

    import avr_core.config
    from flows.deploy import synthesis_run
    from flows.params import RunParams

    real, loads = avr_core.config.load_config, []

    def counted(*args, **kw):
        loads.append(args)
        return real(*args, **kw)
    ours = ("avr_core", "tasks", "flows", "run_records", "avr_cli")   # a getattr on transformers' lazy modules imports
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in ours and getattr(mod, "load_config", None) is real:
            monkeypatch.setattr(mod, "load_config", counted)
    params = RunParams(preset="tiny", overrides=[f"store.root={tmp_path}", "critique.k=3"])
    synthesis_run(params=params)
    assert len(loads) == 1 and (tmp_path / "runs").is_dir()
