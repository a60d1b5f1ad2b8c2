"""A real sampling stage (`respond`) under Prefect's test harness against a flaky OpenAI-compatible
server on 127.0.0.1 (issue #7): every failure is retried or dropped AND counted in the manifest,
Retry-After is honoured, and a server down for longer than `generator.down_budget_s` fails the
stage loudly, keeps its committed shards, and a rerun resumes to the records of an uninterrupted run.

Backoff is shortened (it is not a config key: 1 s doubling up to 30 s is the product default) by
a subclass of the real generator, so every retry path below is the product's own code.
Prefect's task retries (stage_task: retries=2) run with AVR_RETRY_DELAY_S=0 here; against a
server still down, each one fails at once in the generator's reachability check.
"""
import json
import os

import pytest
from omegaconf import OmegaConf

os.environ["AVR_RETRY_DELAY_S"] = "0"

import tasks.synthesis as t  # noqa: E402
from avr_core import backends  # noqa: E402
from avr_core.backends import BackendUnavailable, openai_api  # noqa: E402
from avr_core.config import load_config  # noqa: E402
from avr_core.store import Store  # noqa: E402
from tests.backends.flaky_chat_server import MODES, FlakyChatServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_harness")


class QuickBackoff(openai_api.OpenAIGenerator):
    def __init__(self, *a, **kw):
        super().__init__(*a, **{**kw, "backoff_s": 0.01, "max_backoff_s": 0.05, "progress": False})


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(openai_api, "OpenAIGenerator", QuickBackoff)   # what make_generator builds
    backends.clear_cache()
    yield
    backends.clear_cache()


def cfg_for(root, server, n_prompts, shard_size, *overrides):
    cfg = load_config("tiny", [f"store.root={root}", f"data.stage1_sft=[0,{n_prompts}]", f"shard_size={shard_size}",
                               "generator.kind=openai", f"generator.base_url={server.base_url}",
                               "generator.served_model=fake", "respond.use_dataset_answer=false", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def respond(cfg):
    return t.respond(cfg, cfg["policy"], t.prompts(cfg, "stage1_sft"))


@pytest.mark.slow
def test_thirty_percent_failures_are_retried_dropped_and_counted(tmp_path):
    """~30% of chat requests fail (500, 429 + Retry-After 0.2 s, timeout, truncated JSON, empty
    content); one retry each (max_retries=1), so some requests fail for good. The client's timeout
    (3 s) leaves room for a loaded CI machine: a slow but healthy answer must not count as a timeout."""
    with FlakyChatServer(failure_rate=0.3, modes=MODES, seed=7, retry_after="0.2", timeout_sleep_s=4.0) as server:
        cfg = cfg_for(tmp_path, server, 40, 10, "generator.max_retries=1", "generator.timeout_s=3.0",
                      "generator.concurrency=8", "generator.down_budget_s=30")
        store = Store(str(tmp_path))
        ref = respond(cfg)
        m = store.manifest(ref)
        c, rows = m["counts"], m["rows"]["records"]
        injected = sum(server.injected.values())
        attempts = len(server.requests)

        assert set(server.injected) == set(MODES)                        # every mode happened
        assert 0.2 < injected / attempts < 0.4, (injected, attempts)     # ~30% of all attempts
        # every failed attempt shows: it was retried, or it was the last try of a dropped request
        assert c["backend_retries"] + c["backend_failed_requests"] == injected
        assert c["backend_failed_requests"] > 0
        # a request that failed for good drops its record, counted: nothing silently lost
        assert c["backend_failed_requests"] == c["dropped_failed_answer"]
        assert c["input_records"] == 40 == rows + c["dropped_failed_answer"]
        records = store.read_records(ref)
        assert len(records) == rows and len({r["id"] for r in records}) == rows
        prompts = {p["id"]: p for p in store.read_records(store.list("prompts")[0])}
        for r in records:   # the server's deterministic text for that prompt, never an empty answer
            assert r["answer"].startswith(prompts[r["id"]]["messages"][-1]["content"] + " #")

        # Retry-After: the retry of a 429'd request came at least 0.2 s after the 429
        by_key: dict[str, list[dict]] = {}
        for e in server.requests:
            by_key.setdefault(json.dumps([e["body"]["messages"], e["body"]["seed"]]), []).append(e)
        waits = [b["t"] - a["t"] for es in by_key.values() for a, b in zip(es, es[1:]) if a["outcome"] == "429"]
        assert waits and min(waits) >= 0.2, waits

        print(f"\nattempts={attempts} injected={dict(server.injected)} share={injected / attempts:.2f} "
              f"retries={c['backend_retries']} failed_for_good={c['backend_failed_requests']} "
              f"kept={rows}/40 min_429_wait={min(waits):.3f}s")


@pytest.mark.slow
def test_server_down_mid_stage_fails_loudly_then_resumes_to_the_same_records(tmp_path, caplog):
    """10 prompts in shards of 4, 4, 2: the server goes down (connection refused) right after
    shard 0's answers and stays down longer than the budget."""
    with FlakyChatServer(seed=3) as reference:   # an uninterrupted run, for comparison
        ref_cfg = cfg_for(tmp_path / "reference", reference, 10, 4, "generator.down_budget_s=0.5")
        ref_store = Store(ref_cfg["store"]["root"])
        expected = ref_store.read_records(respond(ref_cfg))
    assert len(expected) == 10

    with FlakyChatServer(seed=3) as server:
        cfg = cfg_for(tmp_path / "run", server, 10, 4, "generator.down_budget_s=0.5")
        store = Store(cfg["store"]["root"])
        server.down_after(4)   # shard 0 is answered, then connection refused
        with pytest.raises(BackendUnavailable) as e:
            respond(cfg)
        assert server.base_url in str(e.value)                  # names the server to fix
        # the first try waited out the budget, then abandoned the round (its retries find no server)
        assert any("longer than down_budget_s=0.5" in r.getMessage() for r in caplog.records)
        key_dir = tmp_path / "run" / "respond" / t.respond.ref(cfg, cfg["policy"], t.prompts(cfg, "stage1_sft")).key
        assert not (key_dir / "manifest.json").exists()          # no artifact ...
        assert sorted(p.name for p in (key_dir / "shards").iterdir()) == ["00000.json"]   # ... but shard 0 kept
        marker = json.loads((key_dir / "shards" / "00000.json").read_text())
        assert marker["rows"]["records"] == 4 and marker["counts"]["backend_failed_requests"] == 0

        server.up()
        before = len(server.requests)
        ref = respond(cfg)
        asked = {e["body"]["messages"][-1]["content"] for e in server.requests[before:]}
        shard0 = {r["messages"][-1]["content"] for r in expected[:4]}
        assert asked and not asked & shard0                      # no committed shard redone
        assert len(server.requests) - before == 6                # shards 1 and 2, once each
        assert store.read_records(ref) == expected               # = the uninterrupted run
        m = store.manifest(ref)
        assert m["counts"]["input_records"] == 10 and m["counts"].get("backend_failed_requests", 0) == 0
