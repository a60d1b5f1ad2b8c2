import json

import pytest

from avr_core.store import Store, cache_key


def test_cache_key_covers_stage_config_inputs_and_code():
    base = cache_key("critique", {"k": 2}, ["respond/a"], "v1")
    assert base == cache_key("critique", {"k": 2}, ["respond/a"], "v1")
    assert base != cache_key("refine", {"k": 2}, ["respond/a"], "v1")
    assert base != cache_key("critique", {"k": 3}, ["respond/a"], "v1")
    assert base != cache_key("critique", {"k": 2}, ["respond/b"], "v1")
    assert base != cache_key("critique", {"k": 2}, ["respond/a"], "v2")


def test_artifact_without_manifest_does_not_exist(tmp_path):
    store = Store(str(tmp_path))
    w = store.writer("critique", "k1", {"k": 2}, [], "v1")
    w.commit_shard(0, {"records": [{"id": "a"}]}, {"dropped": 1})
    ref = store.ref("critique", "k1")
    assert not store.exists(ref)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        store.read_records(ref)
    assert store.list() == []
    w.finalize()
    assert store.exists(ref) and store.list() == [ref]


def test_resume_skips_committed_shards_and_never_duplicates(tmp_path):
    store = Store(str(tmp_path))
    w = store.writer("s", "k", {}, [], "v")
    w.commit_shard(0, {"records": [{"id": 0}, {"id": 1}]}, {"x": 1})
    # a kill mid-shard 1: its data file landed, its marker did not
    store.write_atomic(f"{w.dir}/data/records-00001.jsonl", b'{"id": 99}\n')
    w2 = store.writer("s", "k", {}, [], "v")            # the restarted stage
    assert w2.committed() == {0}
    w2.commit_shard(1, {"records": [{"id": 2}]}, {"x": 2})
    ref = w2.finalize()
    assert [r["id"] for r in store.read_records(ref)] == [0, 1, 2]
    m = store.manifest(ref)
    assert m["counts"] == {"x": 3} and m["rows"] == {"records": 3}
    assert set(m["files"]) == {"data/records-00000.jsonl", "data/records-00001.jsonl"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())


def test_an_uncommitted_data_file_is_left_out_of_the_manifest(tmp_path):
    store = Store(str(tmp_path))
    w = store.writer("s", "k", {}, [], "v")
    w.commit_shard(0, {"records": [{"id": 0}]}, {})
    store.write_atomic(f"{w.dir}/data/records-00007.jsonl", b'{"id": 7}\n')   # orphan
    ref = w.finalize()
    assert [r["id"] for r in store.read_records(ref)] == [0]


def test_manifest_is_written_atomically_and_last(tmp_path):
    store = Store(str(tmp_path))
    w = store.writer("s", "k", {"a": 1}, [store.ref("p", "x")], "v9")
    w.commit_shard(0, {"records": []}, {})
    w.finalize(extra={"note": "n"})
    m = json.loads((tmp_path / "s" / "k" / "manifest.json").read_text())
    assert m["inputs"] == ["p/x"] and m["code_version"] == "v9" and m["config"] == {"a": 1}
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_fsspec_memory_store():
    store = Store("memory://avr-test")
    w = store.writer("s", "k", {}, [], "v")
    w.commit_shard(0, {"records": [{"id": "m"}]}, {})
    ref = w.finalize()
    assert store.read_records(ref) == [{"id": "m"}]
