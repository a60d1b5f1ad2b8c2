"""A stage that alternates policy and reward model on one accelerator (issue 20, review A1).

Building the scorer closes the generator (they share the accelerator: no disjoint `gpus`), so
the next critique must get a live generator, not the closed one. Here everything is real but
the models' size: the stage code, the backend factory, the `openai` generator whose `close()`
really closes its HTTP client (against a local chat server), and a `judge` scorer on a tiny
random Llama. Before the fix the first critique after the first scoring raised
"client has been closed".
"""
import os

import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

import tasks.scaling as sc  # noqa: E402
import tasks.stage2 as s2  # noqa: E402
import tasks.synthesis as t  # noqa: E402
from avr_core import backends  # noqa: E402
from avr_core.config import load_config  # noqa: E402
from avr_core.store import Store  # noqa: E402
from tests.backends.flaky_chat_server import FlakyChatServer  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def cfg_for(tmp_path, model, url, *more):
    over = [f"store.root={tmp_path}", f"policy.path={model}", "generator.kind=openai", f"generator.base_url={url}",
            "generator.served_model=fake", "generator.timeout_s=10", f"scorer.model.path={model}",
            "data.stage2=[0,4]", "search.max_rounds=2", "tts.rounds=2",
            # engines released after each use: the layout where every switch closes the other role
            "generator.keep_engine=false", "scorer.keep_engine=false", *more]
    return OmegaConf.to_container(load_config("tiny", over), resolve=True)


def test_search_gets_a_live_generator_after_the_scorer_closed_it(tmp_path, model):
    backends.clear_cache()
    with FlakyChatServer() as server:
        cfg = cfg_for(tmp_path, model, server.base_url)
        ref = s2.search(cfg, cfg["policy"], t.prompts(cfg, "stage2"))
        m = Store(str(tmp_path)).manifest(ref)
        assert m["rows"]["records"] == 4
        # respond (4 requests) -> score y0 (the scorer closes the generator) -> critique (generator again)
        assert len(server.requests) > 4, "no request after the first switch: the critiques never ran"
        assert all(r["outcome"] == "ok" for r in server.requests)
    assert not backends._CACHE, "the stage's end released every backend"


def test_test_time_scaling_switches_every_round(tmp_path, model):
    backends.clear_cache()
    with FlakyChatServer() as server:
        cfg = cfg_for(tmp_path, model, server.base_url, "data.heldout=[0,6]")      # 2 shards of 4 and 2
        ref = sc.tts_answers(cfg, cfg["policy"], t.prompts(cfg, "heldout"))
        recs = Store(str(tmp_path)).read_records(ref)
        assert len(recs) == 6
        # shard 1 ends on the scorer, shard 2 starts on the generator: an answer + 2 rounds per prompt
        assert len(server.requests) >= 6 * 3 and all(r["outcome"] == "ok" for r in server.requests)
