"""The artifact store on S3-compatible object storage, against a real S3-protocol server started
on 127.0.0.1 (moto's standalone server, tests/s3server.py): shards and manifest, the manifest's
conditional commit (of two writers exactly one commits), the lease lock (a live holder keeps it
past its lease by renewing it; a killed holder's lease is taken over), the local cache of fetched
artifacts, and `avr artifacts list/show/lineage/verify`."""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _artifact(store, stage="respond", key="k1", n=3):
    w = store.writer(stage, key, {"x": 1}, [], "v1")
    for i in range(n):
        w.commit_shard(i, {"records": [{"id": f"{i}-{j}"} for j in range(2)]}, {"dropped": i})
    return w


def test_shards_manifest_and_readback_on_s3(store):
    from avr_core.catalog import verify

    ref = _artifact(store).finalize()
    assert store.remote and store.exists(ref)
    assert [r["id"] for r in store.read_records(ref)][:3] == ["0-0", "0-1", "1-0"]
    m = store.manifest(ref)
    assert m["rows"] == {"records": 6} and m["counts"] == {"dropped": 3}
    assert sorted(m["files"]) == [f"data/records-{i:05d}.jsonl" for i in range(3)]
    assert verify(store) == [] and [str(r) for r in store.list()] == ["respond/k1"]
    assert not [p for p in store.fs.find(store.path(ref)) if ".tmp-" in p]    # one PUT per file, no renames


def test_of_two_writers_racing_on_one_manifest_exactly_one_commits(store):
    from avr_core.catalog import verify
    from avr_core.store import LeaseLost, put_exclusive

    a, b = _artifact(store), _artifact(store)
    a.finalize(extra={"writer": "a"})
    with pytest.raises(LeaseLost, match="another attempt committed this artifact first"):
        b.finalize(extra={"writer": "b"})
    ref = store.ref("respond", "k1")
    m = store.manifest(ref)
    assert m["writer"] == "a" and m["attempt"] == a.attempt
    assert {meta["object"].split("/")[1] for meta in m["files"].values()} == {a.attempt}   # one attempt's files
    assert store.fs.ls(store.path(ref, "attempts"), detail=False)[0].endswith(a.attempt)   # b's files swept
    assert verify(store, ref) == []
    path = store.path("x", "once.json")
    assert [put_exclusive(store.fs, path, b"1"), put_exclusive(store.fs, path, b"2")] == [True, False]
    assert store.fs.cat_file(path) == b"1"


def _holder(store, ref, hold_s: float) -> subprocess.Popen:
    code = ("import sys, time; from avr_core.store import Store\n"
            "s = Store(sys.argv[1], lease_s=1.0)\n"
            "with s.lock(s.ref(sys.argv[2], sys.argv[3])):\n"
            "    print('held', flush=True); time.sleep(float(sys.argv[4]))\n"
            "    print('releasing', flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code, store.root, ref.stage, ref.key, str(hold_s)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.slow
def test_a_live_holder_keeps_its_lease_past_the_lease_time_by_renewing_it(store, caplog):
    ref = store.ref("critique", "k1")
    holder = _holder(store, ref, hold_s=4.0)                 # 4 lease times
    try:
        with caplog.at_level(logging.INFO, logger="avr"):
            with store.lock(ref):
                # we got it only after the holder released it: never taken over while renewed
                assert holder.stdout.readline().strip() == "releasing"
        assert "waiting for another process computing critique/k1" in caplog.text
        assert "taking it over" not in caplog.text
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_killed_holders_lease_expires_and_is_taken_over_once(store, caplog):
    from avr_core.store import LOCKS

    ref = store.ref("critique", "k2")
    holder = _holder(store, ref, hold_s=600)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.INFO, logger="avr"):
        with store.lock(ref):
            leases = store.fs.ls(store.path(LOCKS, "critique.k2"), detail=False)
            assert [p.rsplit("/", 1)[-1] for p in leases] == ["lease-00000001.json"]   # the next generation
            assert json.loads(store.fs.cat_file(leases[0]))["holder"].split()[0].endswith(f":{os.getpid()}")
    assert "not renewed for" in caplog.text and "taking it over" in caplog.text
    with store.lock(ref, timeout=0.5):     # released: the next taker does not wait
        pass


def test_lock_timeout_names_the_artifact_and_the_holder(store):
    from avr_core.store import ArtifactLockTimeout

    ref = store.ref("critique", "k3")
    holder = _holder(store, ref, hold_s=60)
    try:
        with pytest.raises(ArtifactLockTimeout, match=rf"critique/k3: another process \(.*:{holder.pid} "):
            with store.lock(ref, timeout=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_fetch_caches_by_key_and_checksum_and_refuses_a_damaged_copy(store, tmp_path):
    w = store.writer("rsft", "m1", {}, [], "v1")
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(os.urandom(2048))
    assert w.upload(str(model), "model") == 2
    ref = w.finalize()
    cache = tmp_path / "cache"
    local = Path(store.fetch(ref, cache_dir=str(cache)))
    assert local.parent == cache / "rsft" and local.name.startswith("m1-")
    assert (local / "model" / "sub" / "w.bin").read_bytes() == (model / "sub" / "w.bin").read_bytes()
    assert store.fetch(ref, cache_dir=str(cache)) == str(local)        # second time: the cache
    store.fs.pipe_file(store.object_path(ref, "model/config.json"), b"{ }")   # damaged in the store
    with pytest.raises(OSError, match="does not match its manifest"):
        store.fetch(ref, cache_dir=str(tmp_path / "other"))
    assert not list((tmp_path / "other" / "rsft").iterdir())            # nothing half-cached


def test_a_multipart_upload_is_one_object_in_the_manifest_and_fetched_whole(store, tmp_path):
    """A file of at least twice the part size goes up as a multipart upload (s3fs `put_file`, what
    `Store.upload` uses: from 2 x 50 MiB by default, e.g. model weights): 12 MiB in 5 MiB parts
    (S3's minimum) -- three parts, sent concurrently -- is one object, hashed into the manifest and
    fetched back byte for byte."""
    w = store.writer("rsft", "mp", {}, [], "v1")
    blob = os.urandom(12 * 2**20 + 123)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(blob)
    store.fs.put_file = functools.partial(store.fs.put_file, chunksize=5 * 2**20)   # what w.upload calls
    w.upload(str(tmp_path / "model"), "model")
    del store.fs.put_file
    ref = w.finalize()
    assert store.manifest(ref)["files"]["model/w.bin"]["bytes"] == len(blob)
    assert (Path(store.fetch(ref, cache_dir=str(tmp_path / "cache"))) / "model" / "w.bin").read_bytes() == blob


@pytest.mark.slow
def test_avr_artifacts_commands_read_an_s3_store(store):
    root = store.root
    a = _artifact(store, "respond", "a1").finalize()
    w = store.writer("critique", "c1", {}, [a], "v1")
    w.commit_shard(0, {"records": [{"id": "x"}]}, {})
    w.finalize()
    env = {**os.environ}

    def avr(*args):
        return subprocess.run([sys.executable, "-m", "avr_cli", "artifacts", *args, "--store", root], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
    out = avr("list")
    assert out.returncode == 0 and "critique/c1" in out.stdout and "respond/a1" in out.stdout, out.stderr
    assert avr("show", "c1").returncode == 0
    lin = avr("lineage", "c1")
    assert lin.returncode == 0 and "respond/a1" in lin.stdout
    assert avr("verify").returncode == 0
    store.fs.pipe_file(store.object_path(a, "data/records-00000.jsonl"), b'{"id": "forged"}\n')
    bad = avr("verify")
    assert bad.returncode != 0 and "respond/a1" in bad.stdout + bad.stderr
