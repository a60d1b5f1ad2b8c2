"""A holder frozen at an exact point of its write path, its lease taken over meanwhile, then resumed
(issue 34, docs/RELIABILITY.md "Object stores"): the commit is fenced by the lease generation, and
only a shard's marker, never its data, can land after a takeover.

Two child processes on a real S3-protocol server (moto, tests/s3server.py), `lease_s` 1 s. A child
stops at its pause point (hooks in this harness only: `leases.put_exclusive` and the store's
`write_atomic` wrapped), prints `paused <point>` and waits for a line on stdin; the test then
freezes it whole with SIGSTOP (its heartbeat too, so its lease expires), lets the other child take
over, and resumes it with SIGCONT and a line. Nothing waits on a sleep: each step waits for a line
the children print.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow     # each case waits out one lease time (1 s) in a child process
ROOT = Path(__file__).resolve().parents[2]
CHILD = r"""
import os, sys
from avr_core.store import LeaseLost, Store, leases
root, pause, shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store(root, lease_s=1.0)
ref = store.ref("critique", "k")

held = set()
def hold(point):                      # once per point
    if point not in held:
        held.add(point)
        print("paused", point, flush=True)
        sys.stdin.readline()

real_put, real_write = leases.put_exclusive, store.write_atomic
def put(fs, path, data):
    if pause == "commit" and (b'"commit"' in data or path.endswith("/manifest.json")):
        hold("commit")                # passed assert_lease; the commit's first conditional create is next
    if pause == "manifest" and path.endswith("/manifest.json"):
        hold("manifest")              # its commit record created; the manifest's create is next
    return real_put(fs, path, data)
def write(path, data):
    if pause == "data-1" and path.endswith("/data/records-00001.jsonl"):
        hold("data-1")                # shard 1's data passed its lease check; its PUT is next
    if pause == "marker-1" and path.endswith("/shards/00001.json"):
        hold("marker-1")              # shard 1's data landed, its marker passed its check; its PUT is next
    return real_write(path, data)
leases.put_exclusive, store.write_atomic = put, write
try:
    with store.lock(ref):
        print("locked", flush=True)
        if store.exists(ref):
            print("exists", flush=True)
            sys.exit(0)
        if pause == "writer":
            hold("writer")            # took over; it has not listed the earlier markers yet
        w = store.writer(ref.stage, ref.key, {}, [], "v1")
        print("attempt", w.attempt, *sorted(w.committed()), flush=True)
        for i in range(shards):
            if i not in w.committed():
                w.commit_shard(i, {"records": [{"pid": os.getpid(), "i": i}]}, {})
        w.finalize()
        print("committed", w.attempt, flush=True)
except LeaseLost as e:
    print("LEASELOST", e, flush=True)
"""


class Child:
    def __init__(self, store, pause: str, shards: int = 3):
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, store.root, pause, str(shards)], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: list[str] = []

    def until(self, prefix: str) -> list[str]:
        while True:
            line = self.p.stdout.readline()
            assert line, f"child ended before printing {prefix!r}: {self.lines}"
            self.lines.append(line.strip())
            if line.startswith(prefix):
                return line.split()

    def freeze(self) -> None:
        os.kill(self.p.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.p.pid, signal.SIGCONT)
        self.go()

    def go(self) -> None:
        self.p.stdin.write("\n")
        self.p.stdin.flush()

    def finish(self) -> str:
        out = self.p.communicate(timeout=60)[0]
        self.lines += out.split("\n")
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGCONT)
            self.p.kill()
            self.p.wait()


@pytest.fixture
def children():
    made: list[Child] = []
    yield lambda *a, **k: made.append(Child(*a, **k)) or made[-1]
    for c in made:
        c.kill()


def _check_committed_by(store, attempt: str) -> list[dict]:
    from avr_core.catalog import verify

    ref = store.ref("critique", "k")
    m = store.manifest(ref)
    assert m["attempt"] == attempt and verify(store, ref) == []
    assert {meta["object"].split("/")[1] for meta in m["files"].values()} == {attempt}
    assert [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path(ref, "attempts"), detail=False)] == [attempt]
    return store.read_records(ref)


def test_a_holder_frozen_before_its_commit_cannot_commit_after_a_takeover(store, children):
    """Issue 34 item 1: A passed its lease check and froze right before its commit; B took over and
    is about to commit. A resumes first: its commit is refused (the taker holds the generation A's
    commit needed), and B, the live holder, commits."""
    a = children(store, "commit", shards=2)
    a.until("paused commit")
    a.freeze()
    b = children(store, "commit", shards=2)
    b.until("locked")                          # A's lease expired: B took over
    b.until("paused commit")                   # B is about to commit too
    a.resume()
    out_a = a.finish()
    assert "LEASELOST" in out_a and "taken over before this process committed" in out_a, out_a
    assert not [line for line in a.lines if line.startswith("committed ")]
    assert not store.exists(store.ref("critique", "k"))
    b.go()
    attempt = b.until("committed")[1]
    assert b.p.wait(30) == 0
    assert sorted(r["i"] for r in _check_committed_by(store, attempt)) == [0, 1]


def test_a_commit_that_won_is_finished_by_the_next_taker_and_the_holder_agrees(store, children):
    """A created its commit record (the generation after its own) and froze before its manifest's
    create: the next process finishes the commit from the record (the same bytes) and uses it;
    A, resumed, finds its own manifest there and reports its commit."""
    a = children(store, "manifest", shards=2)
    attempt = a.until("attempt")[1]
    a.until("paused manifest")
    a.freeze()
    b = children(store, "none")
    b.until("exists")                          # at once: a commit record counts as released
    assert b.p.wait(30) == 0
    ref = store.ref("critique", "k")
    before = store.fs.cat_file(store.path(ref, "manifest.json"))
    a.resume()
    assert a.until("committed")[1] == attempt
    assert a.p.wait(30) == 0
    assert store.fs.cat_file(store.path(ref, "manifest.json")) == before
    records = _check_committed_by(store, attempt)
    assert {r["pid"] for r in records} == {a.p.pid}


def test_a_shards_data_landing_after_a_takeover_is_never_adopted(store, children):
    """Item 5: A froze between shard 1's lease check and its data PUT. B took over; A's data PUT
    then lands after the takeover, but A's marker never does (its lease check fails: A's last
    renewal is over a lease time old), so B does not adopt shard 1: it computes it."""
    a = children(store, "data-1")
    a.until("paused data-1")
    a.freeze()
    b = children(store, "writer")
    b.until("paused writer")                   # took over; B has not listed the markers yet
    a.resume()
    out_a = a.finish()
    assert "LEASELOST" in out_a, out_a
    ref = store.ref("critique", "k")
    landed = [p.split("/attempts/", 1)[1].split("/", 1)[1] for p in store.fs.find(store.path(ref, "attempts"))]
    assert "data/records-00001.jsonl" in landed and "shards/00001.json" not in landed   # data late, no marker
    b.go()
    line = b.until("attempt")
    assert line[2:] == ["0"]                   # shard 0 adopted, shard 1 not
    attempt = b.until("committed")[1]
    records = _check_committed_by(store, attempt)
    assert {r["i"]: r["pid"] for r in records} == {0: a.p.pid, 1: b.p.pid, 2: b.p.pid}


def test_only_a_marker_lands_after_a_takeover_and_its_data_is_checked_when_adopted(store, children):
    """Item 5: A froze after shard 1's data PUT, between its marker's lease check and the marker's
    PUT. B took over; A's marker lands after the takeover, before B lists the markers, so B adopts
    shard 1 -- whose data had landed before A froze, hence before the takeover -- after hashing its
    copy against the marker. A's next write fails its lease check."""
    a = children(store, "marker-1")
    a.until("paused marker-1")                 # shard 1's data is in the store now
    a.freeze()
    b = children(store, "writer")
    b.until("paused writer")
    a.resume()
    out_a = a.finish()
    assert "LEASELOST" in out_a and not [line for line in a.lines if line.startswith("committed ")], out_a
    b.go()
    assert b.until("attempt")[2:] == ["0", "1"]   # the late marker's shard adopted
    attempt = b.until("committed")[1]
    records = _check_committed_by(store, attempt)
    assert {r["i"]: r["pid"] for r in records} == {0: a.p.pid, 1: a.p.pid, 2: b.p.pid}
