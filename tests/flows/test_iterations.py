"""Iterative AvR (flows/pipeline.py over flows/iterations.py), control flow only: the stages are
fakes that write small artifacts, so this checks what the loop does -- iteration t+1 starts from
iteration t's model on fresh prompt slices, a later run continues the chain, the leaderboard has
an iteration column, the per-iteration table and plot are written, lineage goes back to the
seed, and every run is compared with the previous one -- not what the stages compute."""
import json

import pytest

import flows.pipeline as fp
from avr_cli.main import main
from avr_core import catalog, compare
from avr_core.config import ConfigError
from avr_core.evaluation import leaderboard as lb
from avr_core.store import Store
from flows import iterations as it
from flows.params import RunParams
from tasks.runtime import policy_identity
from tasks.training import policy_of

SLICES = ("stage1_sft", "stage1_po", "stage2", "stage2_po")


@pytest.fixture
def fake_stages(monkeypatch):
    """Each fake writes one artifact whose config names the model it started from (as the real
    stages do), and records (iteration slices, starting model) per call."""
    calls = []

    def art(cfg, stage, config, result=None):
        store = Store(cfg["store"]["root"])
        key = f"{abs(hash(json.dumps(config, sort_keys=True))):016x}"[:16]
        w = store.writer(stage, key, config, [], "v")
        w.commit_shard(0, {"records": [{"id": "x"}]}, {"n": 1})
        return w.finalize({"result": result} if result else None)

    def stage1(cfg, seed):
        calls.append({"slices": {s: cfg["data"][s] for s in SLICES}, "seed": seed.get("artifact") or seed["path"]})
        ref = art(cfg, "po", {"policy": policy_identity(seed), "slices": [cfg["data"][s] for s in SLICES]})
        return {"rsft_data": ref, "rsft": seed, "pairs": ref, "model_ref": ref, "model": policy_of(cfg, ref)}

    def stage2(cfg, s1_model):
        ref = art(cfg, "cot_po", {"policy": policy_identity(s1_model)})
        return {"thoughts": ref, "pairs": ref, "model_ref": ref, "model": policy_of(cfg, ref)}

    def signal(cfg, base, trained):
        n = len(calls)
        return art(cfg, "signal", {"a": policy_identity(base), "b": policy_identity(trained)},
                   {"mean_a": 5.0 + n, "mean_b": 5.5 + n, "mean_diff": 0.5, "se": 0.1})

    def evaluate(cfg, models, run_id, iteration):
        rows = [{"date": "d", "run": run_id, "iteration": iteration, "model": m, "stage": m, "R": 0, "n": 2,
                 "win_rate": 40.0 + 10 * iteration, "se": 1.0, "lc": None, "lc_kind": "unavailable", "avg_len": 10.0,
                 "judge": "j", "evalset": "e", "artifact": f"eval_judge/{run_id}-{iteration}-{m}"} for m in models]
        return lb.append(Store(cfg["store"]["root"]), rows)

    monkeypatch.setattr(fp, "stage1", stage1)
    monkeypatch.setattr(fp, "stage2", stage2)
    monkeypatch.setattr(fp, "learning_signal", signal)
    monkeypatch.setattr(fp, "test_time_scaling", lambda cfg, model: art(cfg, "tts_curve", {"m": model["path"]}))
    monkeypatch.setattr(fp, "evaluate", evaluate)
    import run_records.lifecycle as lifecycle
    published = []   # no Prefect API here (the UI test shows the artifacts): collect what would be published
    for mod, name in ((lifecycle, "publish"), (lifecycle, "publish_plot"), (it, "publish_plot")):
        monkeypatch.setattr(mod, name, lambda ref, key, *a, **k: published.append(key))
    return calls


def run(tmp_path, **fields):
    return fp.pipeline.fn(RunParams(preset="tiny", store_root=str(tmp_path), **fields))


@pytest.mark.slow
def test_iterations_continue_from_the_last_model_on_fresh_prompts(tmp_path, fake_stages):
    first = run(tmp_path, iterations=2, overrides=["iterate.prompt_stride=2"])
    store = Store(str(tmp_path))
    s0, s1 = fake_stages
    assert s0["seed"] == "embedded:smollm2-135m-instruct"
    assert s0["slices"] == {"stage1_sft": [0, 4], "stage1_po": [6, 10], "stage2": [12, 16], "stage2_po": [20, 24]}
    assert s1["slices"] == {"stage1_sft": [2, 6], "stage1_po": [8, 12], "stage2": [14, 18], "stage2_po": [22, 26]}
    chain = it.completed(store, _chain(store))
    assert [r["iteration"] for r in chain] == [0, 1]
    assert s1["seed"] == chain[0]["stage1_model"] == chain[0]["next_model"]     # t+1 starts from t's Stage-1 model
    assert {(r["iteration"], r["model"]) for r in lb.read(store)} == \
        {(t, m) for t in (0, 1) for m in ("seed", "rsft", "stage1", "stage2")}
    table = json.loads(_read(store, f"iterations/{_chain(store)}/iterations.json"))
    assert [(r["iteration"], r["wr_stage1"], r["score_stage1"]) for r in table] == [(0, 40.0, 6.5), (1, 50.0, 7.5)]
    assert _read(store, f"iterations/{_chain(store)}/iterations.png", binary=True)[:4] == b"\x89PNG"

    # the nightly: continue the chain, one more iteration, from iteration 1's model, on the next slices
    second = run(tmp_path, iterations=1, continue_from="last", overrides=["iterate.prompt_stride=2"])
    s2 = fake_stages[2]
    assert s2["seed"] == it.completed(store, _chain(store))[1]["stage1_model"]
    assert s2["slices"]["stage1_sft"] == [4, 8]
    assert [r["iteration"] for r in it.completed(store, _chain(store))] == [0, 1, 2]

    # lineage of the newest model goes back through every iteration to the seed
    newest = store.ref(*it.completed(store, _chain(store))[2]["stage1_model"].split("/", 1))
    lines = catalog.lineage(store, newest)
    assert sum(line.strip().startswith("po/") for line in lines) == 3
    assert "policy=embedded:smollm2-135m-instruct" in lines[-1]

    # every run is compared with the previous run of the same flow
    assert first["compare"] is None and second["compare"] == first["id"]
    md = _read(store, f"runs/{second['id']}/compare.md")
    assert f"Run {second['id']} compared with {first['id']}" in md and "| 2 | stage1 | — | 60 |" in md
    c = compare.compare(store, first["id"], second["id"])
    assert {(r["iteration"], r["model"]) for r in c["leaderboard"]} >= {(2, "stage1"), (0, "stage1")}
    assert c["config"]["iterate.count"] == (2, 1)          # the form's iterations, as the resolved config has them


def test_a_cached_rerun_leaves_each_iteration_to_the_run_that_computed_it(tmp_path, fake_stages):
    """Issue 37: iterations.md names the run that computed an iteration, not the latest cache hit."""
    first = run(tmp_path)
    again = run(tmp_path)
    table = json.loads(_read(Store(str(tmp_path)), f"iterations/{_chain(Store(str(tmp_path)))}/iterations.json"))
    assert again["id"] != first["id"] and [r["run"] for r in table] == [first["id"]]
    assert table[0]["wr_stage1"] == 40.0                    # that run's leaderboard row


def test_stage2_model_starts_the_next_iteration(tmp_path, fake_stages):
    run(tmp_path, iterations=2, iterate_model="stage2", overrides=["iterate.prompt_stride=2"])
    rec = it.completed(Store(str(tmp_path)), _chain(Store(str(tmp_path))))[0]
    assert rec["next_model"] == rec["stage2_model"] == fake_stages[1]["seed"]


@pytest.mark.parametrize("smoke", [True, False])
def test_the_iterations_table_of_a_smoke_run_says_so(tmp_path, fake_stages, smoke):
    run(tmp_path, overrides=[f"eval.smoke={smoke}"])        # tiny: eval.smoke, as the leaderboard
    md = _read(Store(str(tmp_path)), f"iterations/{_chain(Store(str(tmp_path)))}/iterations.md")
    assert md.startswith("SMOKE RUN") == smoke and ("NOT a benchmark result" in md) == smoke


def test_iterations_that_run_out_of_fresh_prompts_are_refused_before_any_work(tmp_path, fake_stages):
    with pytest.raises(ConfigError, match="iterate.count"):                   # tiny: 48 prompts, span 24
        run(tmp_path, iterations=3)
    with pytest.raises(ConfigError, match="iterate.prompt_stride.*heldout"):
        run(tmp_path, iterations=2, overrides=["iterate.prompt_stride=20"])
    assert fake_stages == []


def test_avr_compare_prints_stages_and_leaderboard(tmp_path, fake_stages, capsys, monkeypatch):
    a = run(tmp_path)
    b = run(tmp_path, overrides=["critique.k=3"])
    # A prefix of A's id that B's id does not share: unambiguous by construction, even when both
    # runs started in the same second (their ids then share the whole timestamp).
    common = next(i for i, (x, y) in enumerate(zip(a["id"], b["id"])) if x != y)
    assert main(["compare", a["id"][:common + 1], b["id"], "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"Run {b['id']} compared with {a['id']}" in out and "**Leaderboard**" in out
    assert "parameters: critique.k: 2 → 3" in out          # the resolved configs, key by key, nothing else
    assert main(["compare", b["id"], "--store", str(tmp_path)]) == 0           # B alone: against its previous run
    # issue 37: the same config given another way (the store root as an override, relative; a
    # resume gives the saved config.yaml) is no change
    monkeypatch.chdir(tmp_path)
    c = fp.pipeline.fn(RunParams(preset="tiny", overrides=["critique.k=3", "store.root=."]))
    assert main(["compare", b["id"], c["id"], "--store", str(tmp_path)]) == 0
    assert "same parameters" in capsys.readouterr().out
    assert main(["compare", "nope", "--store", str(tmp_path)]) == 2


def _chain(store):
    [d] = store._ls(store.path("iterations"))
    return d.rsplit("/", 1)[-1]


def _read(store, rel, binary=False):
    data = store.fs.cat_file(store.path(*rel.split("/")))
    return data if binary else data.decode()


def test_runs_started_in_the_same_second_are_ordered_by_their_start(tmp_path):
    # The id's timestamp has whole seconds and a random suffix: here the later run's suffix sorts
    # first. "Previous run" must still be the one that started earlier.
    import json

    from avr_core import compare
    store = Store(str(tmp_path))
    runs = {"20261203-103634-ffffff": 1000.25, "20261203-103634-000000": 1000.75, "20261203-103633-aaaaaa": 999.0}
    for rid, t in runs.items():
        store.write_atomic(f"{store.path('runs', rid)}/summary.json",
                           json.dumps({"id": rid, "started": t, "flow": "avr-pipeline"}).encode())
    load = lambda rid: compare.load_run(store, rid)  # noqa: E731
    assert compare.previous_run(store, load("20261203-103634-000000")) == "20261203-103634-ffffff"
    assert compare.previous_run(store, load("20261203-103634-ffffff")) == "20261203-103633-aaaaaa"
    assert compare.previous_run(store, load("20261203-103633-aaaaaa")) is None
