"""What the store checks before it trusts a byte (issue 34): a shard an attempt adopts is hashed
against its marker first (a damaged one is computed again, not committed), and the manifest checks
itself (its own digest; an unparsable one is one line naming the file, from reads, `verify` and
`avr artifacts verify`). On a local store and on fsspec's in-memory filesystem, which the store
treats as an object store (attempts, leases): no server needed."""
from __future__ import annotations

import json
import logging
import time

import pytest

from avr_core import catalog
from avr_core.store import IntegrityError, Store


@pytest.fixture(params=["local", "object"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "st"))
    s = Store(f"memory://checks-{time.monotonic_ns()}", lease_s=5)
    assert s.remote
    return s


def _flip(store, path: str) -> None:
    data = bytearray(store.fs.cat_file(path))
    data[2] ^= 0x01                          # one bit, same size
    store.fs.pipe_file(path, bytes(data))


def _killed_attempt(store, shards=3):
    """An attempt that committed `shards` shards and was killed before its manifest."""
    w = store.writer("critique", "k", {}, [], "v1")
    for i in range(shards):
        w.commit_shard(i, {"records": [{"id": f"first-{i}"}]}, {"n": 1})
    return w


def test_a_damaged_shard_of_an_earlier_attempt_is_computed_again_not_adopted(store, caplog):
    first = _killed_attempt(store)
    _flip(store, f"{first.dir}/{first.markers[1]['files']['data/records-00001.jsonl']['object']}")
    with caplog.at_level(logging.WARNING, logger="avr"):
        taker = store.writer("critique", "k", {}, [], "v1")
    assert taker.committed() == {0, 2}                       # shard 1 is not adopted
    if store.remote:                                          # nor is a copy of it left under the taker's name
        assert not store.fs.exists(f"{taker.base}/data/records-00001.jsonl")
        assert store.fs.exists(f"{taker.base}/data/records-00002.jsonl")
    assert "data/records-00001.jsonl: sha256 differs from its shard marker" in caplog.text
    assert "not adopted, computed again" in caplog.text and "committed" not in caplog.text.split("marker")[1]
    taker.commit_shard(1, {"records": [{"id": "again-1"}]}, {"n": 1})
    ref = taker.finalize()
    assert catalog.verify(store, ref) == []                   # verifies from birth
    assert [r["id"] for r in store.read_records(ref)] == ["first-0", "again-1", "first-2"]
    assert store.manifest(ref)["counts"] == {"n": 3}


def test_a_missing_shard_file_of_an_earlier_attempt_is_computed_again(store):
    first = _killed_attempt(store, shards=2)
    store.fs.rm_file(f"{first.dir}/{first.markers[0]['files']['data/records-00000.jsonl']['object']}")
    assert store.writer("critique", "k", {}, [], "v1").committed() == {1}


def test_an_uncommitted_shard_read_back_damaged_is_not_called_committed(store):
    w = _killed_attempt(store, shards=1)
    _flip(store, f"{w.dir}/{w.markers[0]['files']['data/records-00000.jsonl']['object']}")
    with pytest.raises(IntegrityError) as e:
        w.committed_records()
    assert "differs from its shard marker" in str(e.value) and "after it was committed" not in str(e.value)


# -- the manifest's own check ----------------------------------------------------------------------
def _committed(store):
    w = store.writer("respond", "r", {"x": 1}, [], "v1")
    w.commit_shard(0, {"records": [{"id": "a"}, {"id": "b"}]}, {})
    return w.finalize()


def test_a_flipped_rows_count_in_the_manifest_is_caught_by_reads_and_verify(store):
    ref = _committed(store)
    path = store.path(ref, "manifest.json")
    text = store.fs.cat_file(path).decode()
    assert json.loads(text)["manifest_sha256"]
    store.fs.pipe_file(path, text.replace('"records": 2', '"records": 3').encode())
    for read in (store.manifest, store.read_records, lambda r: store.read_file(r, "data/records-00000.jsonl")):
        with pytest.raises(IntegrityError) as e:
            read(ref)
        assert str(e.value).startswith(f"{store.url(ref, 'manifest.json')}: its content does not match its "
                                       "manifest_sha256") and "\n" not in str(e.value)
    assert catalog.verify(store, ref) == [str(e.value)]
    assert catalog.verify(store) == [str(e.value)]


def test_an_unparsable_manifest_is_one_line_naming_the_file(store):
    ref = _committed(store)
    store.fs.pipe_file(store.path(ref, "manifest.json"), b'{"stage": "respond", "files": {')
    with pytest.raises(IntegrityError) as e:
        store.read_records(ref)
    want = f"{store.url(ref, 'manifest.json')}: not valid JSON ("
    assert str(e.value).startswith(want) and "\n" not in str(e.value)
    assert [p[:len(want)] for p in catalog.verify(store)] == [want]
    assert catalog.list_rows(store)[0]["rows"].startswith("DAMAGED")
    assert "DAMAGED" in catalog.lineage(store, ref)[0]


def test_a_manifest_from_before_the_digest_still_reads_and_verify_says_so(store, caplog):
    ref = _committed(store)
    path = store.path(ref, "manifest.json")
    m = json.loads(store.fs.cat_file(path))
    del m["manifest_sha256"]
    store.fs.pipe_file(path, json.dumps(m, indent=2).encode())
    assert [r["id"] for r in store.read_records(ref)] == ["a", "b"]
    with caplog.at_level(logging.WARNING, logger="avr"):
        assert catalog.verify(store) == []
    assert "1 manifest(s) carry no digest of their own" in caplog.text


def test_avr_artifacts_verify_names_a_damaged_manifest_in_one_line(tmp_path, capsys):
    from avr_cli.main import main

    store = Store(str(tmp_path / "st"))
    ref = _committed(store)
    (tmp_path / "st" / "respond" / "r" / "manifest.json").write_text("{oops")
    assert main(["artifacts", "verify", "--store", store.root]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{store.path(ref, 'manifest.json')}: not valid JSON (Expecting property name "
                                "enclosed in double quotes: line 1 column 2 (char 1)); the manifest is damaged: "
                                "restore it, or delete it to have the artifact computed again"]
    assert "1 problem(s)" in err and "Traceback" not in out + err
    assert main(["artifacts", "list", "--store", store.root]) == 0
    assert "DAMAGED" in capsys.readouterr().out
