"""The store's fences, one rule per test, on a local filesystem standing in for an object store
where the rule is about the protocol (no server needed): checked reads, the conditional-create
probe, 409 and lost-response handling, the lease's deadline, lease_s in the lease, stall_s, and
per-thread re-entrancy. The same rules against a real S3-protocol server: test_store_s3.py and
test_store_chaos_s3.py."""
from __future__ import annotations

import json
import logging
import threading
import time

import fsspec
import pytest

from avr_core.store import IntegrityError, LeaseLost, Store, leases, put_exclusive
from avr_core.store.objects import check_conditional_create


def _artifact(store, key="k"):
    w = store.writer("respond", key, {}, [], "v1")
    w.commit_shard(0, {"records": [{"id": "a"}]}, {})
    w.commit_shard(1, {"records": [{"id": "b"}]}, {})
    return w.finalize()


def test_a_modified_record_file_is_refused_in_one_line_naming_it(tmp_path):
    store = Store(str(tmp_path))
    ref = _artifact(store)
    assert [r["id"] for r in store.read_records(ref)] == ["a", "b"]
    (tmp_path / "respond" / "k" / "data" / "records-00001.jsonl").write_text('{"id": "forged"}\n')
    with pytest.raises(IntegrityError) as e:
        store.read_records(ref)
    assert str(e.value).startswith("respond/k: data/records-00001.jsonl: sha256 differs from its manifest")
    assert "\n" not in str(e.value)


def test_a_shard_marker_records_the_digests_finalize_commits(tmp_path):
    store = Store(str(tmp_path))
    ref = _artifact(store)
    marker = json.loads((tmp_path / "respond" / "k" / "shards" / "00001.json").read_text())
    assert marker["files"]["data/records-00001.jsonl"] == store.manifest(ref)["files"]["data/records-00001.jsonl"]


class _IgnoresIfNoneMatch:
    """A fake object store (for this test only) that, like some gateways, accepts every create."""

    protocol = ("s3",)

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def open(self, path, mode):
        fs = self

        class W:
            def __enter__(self):
                return self

            def write(self, data):
                fs.objects[path] = data

            def __exit__(self, *exc):
                return False
        return W()

    def cat_file(self, path):
        return self.objects[path]

    def rm_file(self, path):
        self.objects.pop(path, None)


def test_a_server_that_ignores_conditional_create_is_refused_in_one_line():
    with pytest.raises(RuntimeError, match="does not honour conditional create") as e:
        check_conditional_create(_IgnoresIfNoneMatch(), "bucket/avr")
    assert "\n" not in str(e.value)
    check_conditional_create(fsspec.filesystem("memory"), "/probe-ok")   # an honest one passes


class _Answers409:
    """A fake object store whose conditional create answers AWS's 409 ConditionalRequestConflict."""

    def __init__(self, stored: bytes | None):
        self.stored = stored

    def open(self, path, mode):
        raise OSError("An error occurred (ConditionalRequestConflict) when calling the PutObject operation: 409")

    def cat_file(self, path):
        if self.stored is None:
            raise FileNotFoundError(path)
        return self.stored


def test_409_means_someone_else_won_and_a_lost_response_of_our_own_create_is_ours():
    assert put_exclusive(_Answers409(None), "x", b"mine") is False        # the racing write is theirs
    assert put_exclusive(_Answers409(b"theirs"), "x", b"mine") is False
    assert put_exclusive(_Answers409(b"mine"), "x", b"mine") is True       # our retried create had landed


@pytest.fixture
def memstore(monkeypatch):
    """A Store on fsspec's in-memory filesystem: `remote` (no flock), so it takes leases."""
    store = Store(f"memory://fencing-{time.monotonic_ns()}", lease_s=0.6)
    assert store.remote
    return store


def test_the_lease_records_its_lease_s_and_a_waiter_honours_the_holders(memstore):
    ref = memstore.ref("critique", "k")
    d = memstore.path(".locks", "critique.k")
    with memstore.lock(ref):
        lease = json.loads(memstore.fs.cat_file(f"{d}/lease-00000000.json"))
        assert lease["lease_s"] == 0.6 and lease["renew_every_s"] == pytest.approx(0.2)
    # a holder with lease_s 30 that stopped renewing: a waiter with lease_s 0.6 must wait its 30 s
    memstore.fs.pipe_file(f"{d}/lease-00000005.json", json.dumps(
        {"holder": "other:1", "seq": 3, "lease_s": 30.0}).encode())
    with pytest.raises(leases.ArtifactLockTimeout):
        with memstore.lock(ref, timeout=2.0):
            pass


def test_a_holder_whose_renewals_fail_stops_writing_before_anyone_may_take_over(memstore, monkeypatch):
    ref = memstore.ref("critique", "k2")
    with memstore.lock(ref):
        w = memstore.writer(ref.stage, ref.key, {}, [], "v1")
        w.commit_shard(0, {"records": [{"id": 1}]}, {})
        monkeypatch.setattr(memstore.fs, "pipe_file", _fail)     # the network to the store is down
        time.sleep(0.6 * 2 / 3 + 0.3)
        with pytest.raises(LeaseLost, match="not renewed for"):
            w.commit_shard(1, {"records": [{"id": 2}]}, {})


def _fail(*a, **k):
    raise OSError("connection reset")


def test_a_taken_over_holder_learns_it_from_the_generation_not_from_a_file_the_protocol_deletes(memstore):
    ref = memstore.ref("critique", "k3")
    d = memstore.path(".locks", "critique.k3")
    with memstore.lock(ref):
        # a taker created gen 1, committed, released (gen 2) and removed gen 1: only gen 2 is left
        memstore.fs.pipe_file(f"{d}/lease-00000002.json", json.dumps({"released": True}).encode())
        time.sleep(0.6)
        with pytest.raises(LeaseLost, match="taken over"):
            leases.assert_lease(memstore, ref)


def test_a_holder_making_no_progress_gives_the_lease_up_and_says_so(caplog):
    store = Store(f"memory://stall-{time.monotonic_ns()}", lease_s=0.3, stall_s=0.5)
    ref = store.ref("critique", "k4")
    with caplog.at_level(logging.ERROR, logger="avr"):
        with store.lock(ref):
            time.sleep(1.2)                      # wedged: no write, no checkpoint
            with pytest.raises(LeaseLost, match="no progress"):
                leases.assert_lease(store, ref)
            got = []

            def other():                         # another thread (or machine) takes it at once
                with store.lock(ref, timeout=1.0):
                    got.append(True)
            t = threading.Thread(target=other)
            t.start()
            t.join(5)
            assert got == [True]
    assert "no progress for" in caplog.text and "giving up the lease" in caplog.text


def test_reentry_is_per_thread_another_thread_waits(tmp_path):
    store = Store(str(tmp_path))
    ref = store.ref("critique", "k5")
    order = []
    with store.lock(ref):
        with store.lock(ref):                    # the same thread: re-entrant
            order.append("nested")
        def other():
            with store.lock(ref):
                order.append("thread")
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.5)
        order.append("released")
    t.join(5)
    assert order == ["nested", "released", "thread"]


def test_a_commit_whose_generation_a_taker_created_is_refused_and_writes_no_manifest(memstore, monkeypatch):
    """The commit fence in one process (the frozen-holder version: test_store_takeover_s3.py): a
    taker's generation lands after our last lease check, right before our commit's create."""
    ref = memstore.ref("critique", "k6")
    real = leases.put_exclusive

    def takeover_first(fs, path, data):
        if b'"commit"' in data:
            assert real(fs, path, json.dumps({"holder": "taker:1", "seq": 0}).encode())
        return real(fs, path, data)
    monkeypatch.setattr(leases, "put_exclusive", takeover_first)
    with pytest.raises(LeaseLost, match="taken over before this process committed"):
        with memstore.lock(ref):
            w = memstore.writer(ref.stage, ref.key, {}, [], "v1")
            w.commit_shard(0, {"records": [{"id": 1}]}, {})
            w.finalize()
    assert not memstore.exists(ref)


def test_a_committed_record_becomes_a_release_so_a_deleted_manifest_stays_deleted(memstore):
    ref = _artifact_locked(memstore, "k7")
    d = memstore.path(".locks", "critique.k7")
    top = json.loads(memstore.fs.cat_file(f"{d}/lease-00000001.json"))
    assert top["released"] and "commit" not in top                     # no manifest left in the lease
    memstore.fs.rm_file(memstore.path(ref, "manifest.json"))            # by hand: compute it again
    with memstore.lock(ref, timeout=1.0):
        assert not memstore.exists(ref)


def _artifact_locked(store, key):
    ref = store.ref("critique", key)
    with store.lock(ref):
        w = store.writer(ref.stage, ref.key, {}, [], "v1")
        w.commit_shard(0, {"records": [{"id": 1}]}, {})
        return w.finalize()
