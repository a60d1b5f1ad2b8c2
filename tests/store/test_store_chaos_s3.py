"""Chaos on S3: a holder frozen (SIGSTOP) past its lease cannot change or mix into the artifact the
process that took over committed (review DL-1 and W-1, docs/RELIABILITY.md "Object stores").

Two child processes run what a stage does on one artifact of a real S3-protocol server (moto,
tests/s3server.py): lock -> exists? -> writer -> commit each pending shard -> finalize, with
`lease_s` 1.5 s. Every record carries its writer's pid and the time it was made, standing in for an
engine whose output is not bit-reproducible. A is frozen inside shard 1; B takes over, resumes from
A's committed shard 0 and commits. A is resumed after B's commit, or while B still works.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.s3server import BUCKET, moto_s3

pytestmark = pytest.mark.slow     # child processes frozen past a lease: about 70 s for the file
ROOT = Path(__file__).resolve().parents[2]
SHARDS = 5
CHILD = r"""
import os, sys, time
from avr_core.store import LeaseLost, Store, sweep
store = Store(sys.argv[1], lease_s=1.5)
ref = store.ref("critique", "k")
try:
    with store.lock(ref):
        print("locked", time.time(), flush=True)
        if store.exists(ref):
            print("exists", flush=True)
            sys.exit(0)
        w = store.writer(ref.stage, ref.key, {}, [], "v1")
        if sys.argv[3] == "model":         # a trained model: its files uploaded, then the manifest
            import pathlib, tempfile
            d = pathlib.Path(tempfile.mkdtemp())
            for n in ("config.json", "model.safetensors"):
                (d / n).write_bytes(os.urandom(4096))
            print("in-shard 1", flush=True)            # frozen here: right before its upload
            time.sleep(float(sys.argv[2]))
            w.upload(str(d), "model")
        for i in range(%(shards)d if sys.argv[3] == "shards" else 0):
            if i in w.committed():
                continue
            recs = [{"pid": os.getpid(), "t": time.time(), "i": i, "j": j} for j in range(3)]
            print("in-shard", i, flush=True)
            time.sleep(float(sys.argv[2]))
            w.commit_shard(i, {"records": recs}, {})
        w.finalize()
        print("committed", w.attempt, flush=True)
except LeaseLost as e:
    print("LEASELOST", e, flush=True)
    if store.exists(ref):
        sweep(store, ref)          # what run_stage does: the committed artifact stands, our files go
""" % {"shards": SHARDS}


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as env:
        yield env


def _start(root: str, shard_s: float, what: str = "shards") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, root, str(shard_s), what], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _until(p: subprocess.Popen, prefix: str) -> str:
    while True:
        line = p.stdout.readline()
        assert line, f"child ended before printing {prefix!r}"
        if line.startswith(prefix):
            return line.strip()


def _snapshot(store, ref) -> dict:
    m = store.manifest(ref)
    return {rel: store.read_file(ref, rel, m) for rel in m["files"]} | {"manifest": store.fs.cat_file(
        store.path(ref, "manifest.json"))}


@pytest.mark.parametrize("resume", ["after_commit", "during_takeover"])
def test_a_frozen_holder_cannot_change_or_mix_into_the_committed_artifact(s3, resume, request):
    from avr_core.catalog import verify
    from avr_core.store import Store

    root = f"s3://{BUCKET}/{request.node.name}"
    store = Store(root, lease_s=1.5)
    ref = store.ref("critique", "k")
    a = _start(root, shard_s=0.3)
    _until(a, "in-shard 1")                   # shard 0 committed, shard 1 being computed
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b = _start(root, shard_s=0.3)
        taken = float(_until(b, "locked").split()[1])    # after A's lease expired, on B's clock
        if resume == "during_takeover":
            _until(b, "in-shard")
            os.kill(a.pid, signal.SIGCONT)    # A wakes while B holds the lease and writes
        committed = _until(b, "committed").split()[1]
        assert b.wait(30) == 0
        before = _snapshot(store, ref)
        if resume == "after_commit":
            os.kill(a.pid, signal.SIGCONT)    # A wakes after B committed and released
        out_a = a.communicate(timeout=30)[0]
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
    assert "LEASELOST" in out_a, out_a        # the stale holder knows it lost the lease
    assert "committed" not in out_a
    assert _snapshot(store, ref) == before    # byte-identical after the stale holder ran on
    assert verify(store, ref) == []
    m = store.manifest(ref)
    assert m["attempt"] == committed
    assert {meta["object"].split("/")[1] for meta in m["files"].values()} == {committed}   # one attempt
    records = store.read_records(ref)
    assert sorted(r["i"] for r in records) == sorted(i for i in range(SHARDS) for _ in range(3))
    # nothing A made after B took over is in the artifact: only A's shard 0, committed before
    assert not [r for r in records if r["pid"] == a.pid and r["t"] > taken]
    assert {r["i"] for r in records if r["pid"] == a.pid} == {0}
    time.sleep(0.2)
    assert [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path(ref, "attempts"), detail=False)] == [committed]


def test_a_model_upload_frozen_past_its_lease_cannot_change_the_committed_model(s3, request):
    from avr_core.catalog import verify
    from avr_core.store import Store

    root = f"s3://{BUCKET}/model-upload"
    store = Store(root, lease_s=1.5)
    ref = store.ref("critique", "k")
    a = _start(root, shard_s=0.5, what="model")
    _until(a, "in-shard 1")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b = _start(root, shard_s=0.1, what="model")
        committed = _until(b, "committed").split()[1]
        assert b.wait(30) == 0
        before = _snapshot(store, ref)
        os.kill(a.pid, signal.SIGCONT)
        out_a = a.communicate(timeout=30)[0]
    finally:
        if a.poll() is None:
            a.kill()
    assert "LEASELOST" in out_a and "committed" not in out_a, out_a
    assert _snapshot(store, ref) == before and verify(store, ref) == []
    assert sorted(store.manifest(ref)["files"]) == ["model/config.json", "model/model.safetensors"]
    assert store.manifest(ref)["attempt"] == committed


RESTORE = r"""
import sys, time
from pathlib import Path
from avr_core.store import Store
import tasks.runtime.supervision as t
store = Store(sys.argv[1])
real = store.fs.get_file
def slow_get(src, dst, **kw):          # the test's pause point: a slow network, one file at a time
    real(src, dst, **kw)
    print("got", src.rsplit("/", 1)[-1], flush=True)
    time.sleep(float(sys.argv[3]))
store.fs.get_file = slow_get
class Out:
    ref = store.ref("po", "k")
    class writer:
        attempt = "restorer"
t.logger = lambda: __import__("logging").getLogger("avr")
print("restored", t._CkptSync(store, Out, "po-k", Path(sys.argv[2])).restore(), flush=True)
"""


def test_a_checkpoint_restore_killed_midway_is_redone_not_trusted(s3, tmp_path):
    """Review S-1: a restore killed after its first file left `LATEST` and a partial step, trusted
    forever. Now the step goes into a temporary directory, LATEST last, renamed into place whole."""
    from avr_core.store import Store

    root = f"s3://{BUCKET}/ckpt-restore"
    store = Store(root)
    step = tmp_path / "synced" / "step-000004"
    step.mkdir(parents=True)
    for n in ("a.pt", "b.pt", "c.pt", "trainer_state.json"):
        (step / n).write_bytes(os.urandom(1024))
    store.upload(str(step), ".work", "po-k", "earlier", "ckpt", "step-000004")
    store.fs.pipe_file(store.path(".work", "po-k", "earlier", "ckpt", "LATEST"), b"step-000004")
    local = tmp_path / "work" / "ckpt"
    args = [sys.executable, "-c", RESTORE, root, str(local)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([*args, "5"], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    _until(p, "got")                          # one file down, three to go
    p.kill()                                  # kill -9 mid-restore
    p.wait()
    assert not (local / "LATEST").exists()    # nothing a later run would trust
    done = subprocess.run([*args, "0"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert "restored 5" in done.stdout, done.stdout + done.stderr
    assert (local / "LATEST").read_text() == "step-000004"
    for n in ("a.pt", "b.pt", "c.pt", "trainer_state.json"):
        assert (local / "step-000004" / n).read_bytes() == (step / n).read_bytes()
