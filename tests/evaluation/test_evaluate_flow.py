"""The evaluate flow under Prefect, judged through a real HTTP round trip to FakeJudgeServer (a
test fixture speaking the OpenAI API with alpaca-eval's AlpacaEval 2 judge format). Answers
come from fake generators (control flow only). Checks: alpaca-eval's own loader reads our
model_outputs.json unchanged; no prompt is dropped whatever the model writes; the package's
parser turns the judge's log-probs into the known win rate; the API key reaches the server
and nothing in the store; the leaderboard grows by one row per model and run."""
import os

import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

import tasks.evaluate as ev  # noqa: E402
from avr_core.config import load_config  # noqa: E402
from avr_core.prompts import THOUGHT_ANSWER, THOUGHT_CRITICIZE, THOUGHT_IMPROVE, THOUGHT_START  # noqa: E402
from avr_core.store import Store  # noqa: E402
from flows.evaluate import evaluate  # noqa: E402
from tests.evaluation.fake_judge import FakeJudgeServer  # noqa: E402
from tests.fakes import FakeGenerator  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_harness")
SECRET = "sk-planted-SECRET-4242"


class VerboseFake(FakeGenerator):
    """Answers every prompt with a long text (longer than any of the first references)."""

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        return [["A very thorough answer. " * 40] for _ in conversations]


class BrokenThinker(FakeGenerator):
    """A Stage-2 fake whose thoughts are malformed: no markers, cut off after an improvement, or empty."""

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        cut = f"{THOUGHT_START}\n{THOUGHT_ANSWER}\ndraft\n{THOUGHT_CRITICIZE}\ntoo short\n{THOUGHT_IMPROVE}\nbetter"
        kinds = ["plain text, no markers", cut, ""]
        return [[kinds[i % 3]] for i in range(len(conversations))]


def cfg_for(tmp_path, *extra):
    return OmegaConf.to_container(load_config("tiny", [
        f"store.root={tmp_path}", "eval.slice=[0,6]", "eval.judge.kind=openai", "eval.judge.model=fake-judge",
        "eval.judge.api_key_env=AVR_TEST_JUDGE_KEY", "eval.position_bias_n=3", "shard_size=4", *extra]), resolve=True)


@pytest.mark.slow
def test_evaluate_judges_through_alpaca_eval_and_appends_the_leaderboard(tmp_path, monkeypatch):
    monkeypatch.setenv("AVR_TEST_JUDGE_KEY", SECRET)
    monkeypatch.setattr(ev, "make_generator",
                        lambda p, b: BrokenThinker() if p.get("fake") == "thinker" else VerboseFake())
    with FakeJudgeServer() as judge:
        cfg = cfg_for(tmp_path, f"eval.judge.base_url={judge.url}")
        models = {"seed": cfg["policy"], "stage2": {**cfg["policy"], "fake": "thinker"}}   # the same seed, told apart
        board = evaluate(cfg, models, run_id="run-1")
    store = Store(str(tmp_path))
    assert judge.requests
    assert all(r["auth"] == f"Bearer {SECRET}" and r["model"] == "fake-judge" for r in judge.requests)

    # alpaca-eval's own loader reads model_outputs.json unchanged
    from alpaca_eval.utils import get_generator_name, load_or_convert_to_dataframe
    seed_ans = [r for r in store.list("eval_answers") if store.manifest(r)["config"]["model"] == "seed"][0]
    df = load_or_convert_to_dataframe(f"{seed_ans.path}/model_outputs.json")
    assert len(df) == 6 and get_generator_name(None, df) == "seed"
    assert list(df.columns) == ["instruction", "output", "generator", "dataset"]

    # the broken thinker: every prompt kept, the extraction path recorded
    s2 = [r for r in store.list("eval_answers") if store.manifest(r)["config"]["model"] == "stage2"][0]
    recs = store.read_records(s2)
    assert len(recs) == 6 and {r["path"] for r in recs} == {"raw", "last_improvement"}
    assert all({"raw", "len_chars", "len_tokens", "rounds"} <= set(r) for r in recs)

    # the judge's rule: the longer output wins with p=0.8 -> the verbose seed's WR is exactly 80
    results = {store.manifest(r)["result"]["model"]: store.manifest(r)["result"] for r in store.list("eval_judge")}
    assert results["seed"]["win_rate"] == pytest.approx(80.0) and results["seed"]["n_total"] == 6
    assert results["seed"]["position_bias"]["agreement"] == 1.0          # the fake judge has no position bias
    assert results["seed"]["lc_kind"] == "unavailable" and results["seed"]["lc_win_rate"] is None
    judge_files = store.manifest(store.list("eval_judge")[0])["files"]
    assert any(f.endswith("configs.yaml") for f in judge_files) and "metrics.json" in judge_files

    # nothing in the store knows the key
    for root, _, files in os.walk(tmp_path):
        for f in files:
            assert SECRET not in open(os.path.join(root, f), errors="ignore").read(), f

    assert "| seed | seed | 0 | 6 | 80.0 ±" in board
    rows = ev.read_leaderboard(str(tmp_path))
    assert [r["model"] for r in rows] == ["seed", "stage2"]
    n_req = len(judge.requests)
    with FakeJudgeServer() as judge2:   # a new run, same models: cached answers and judgements, no row added
        cfg2 = cfg_for(tmp_path, f"eval.judge.base_url={judge.url}")
        board2 = evaluate(cfg2, models, run_id="run-2")
    assert judge2.requests == [] and len(judge.requests) == n_req
    assert [r["run"] for r in ev.read_leaderboard(str(tmp_path))] == ["run-1", "run-1"]   # the rows it reused
    assert board2 == board
