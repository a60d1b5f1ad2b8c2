"""Exclusive locks on artifacts across processes and machines: `flock` on a local store, a fenced
LEASE on an object store.

Local store: `flock` on `<root>/.locks/<stage>.<key>.lock`. The kernel drops it when its holder dies,
even by SIGKILL, and never hands it to another while the holder lives (even a stopped one), so a
local holder cannot lose its lock.

Object store: a lease is the highest generation `<root>/.locks/<stage>.<key>/lease-<gen>.json`,
created with a conditional create (exactly one taker per generation). The lease records its holder,
its `lease_s` and how often it is renewed. Three rules keep it honest:

* The holder renews it every `lease_s / 3` from a heartbeat thread. It has LOST the lease as soon
  as its generation is no longer the highest one (a taker created the next one), and also when its
  last successful renewal is older than 2/3 of `lease_s` (`assert_lease`): a waiter takes over only
  after seeing no renewal for a whole `lease_s` on its own clock, so the holder stops first.
* A waiter takes over after max(its own `lease_s`, the holder's) without a new renewal, measured on
  ITS OWN monotonic clock: no clock is compared across machines, and a waiter configured with a
  shorter `lease_s` cannot take over a live holder.
* A holder that is alive but makes no progress (no write, no checkpoint) for `stall_s` gives the
  lease up and says so, so a wedged stage does not block every other machine forever.

A lost lease raises `LeaseLost` at the holder's next write (every write path calls `assert_lease`).
A write already past that check when the holder froze still cannot harm the taker: every attempt
writes under its own names (avr_core/store/attempts.py) and only the committed manifest says which.

The commit itself is fenced by the generation (`commit`): the holder of generation g commits by
creating generation g+1 with its manifest in it, a conditional create, and only then the manifest.
A taker also needs g+1, so of a stale holder's commit and a takeover exactly one wins: a holder
whose generation was taken over can no longer commit, even if it passed `assert_lease` just before
it froze. A commit record counts as released; whoever reads it next creates the manifest from it
(`_finish_commit`: the same bytes, so whichever of the two creates lands first, the other agrees),
which covers a holder frozen between its commit record and its manifest. Once the manifest exists
the holder rewrites the record as a plain release.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import threading
import time
from typing import Iterator

from avr_core.store.objects import put_exclusive

log = logging.getLogger("avr")
LOCKS = ".locks"   # <root>/.locks/: lock files, outside every artifact (dot dirs are not stages)

# lock path -> {"thread", "depth", and for a lease its state}: this process's locks. Re-entry is per
# THREAD: another thread of this process that locks the same artifact waits like another process.
_HELD: dict[str, dict] = {}
_HELD_GUARD = threading.Lock()


class ArtifactLockTimeout(TimeoutError):
    """Another process held an artifact's lock for longer than the caller agreed to wait."""


class LeaseLost(RuntimeError):
    """This process's lease on an artifact was taken over, expired unrenewed or was given up for
    lack of progress: it must not write more of that artifact."""


def worker_id() -> str:
    """Who computed something, for manifests: host and process id (`host:pid`)."""
    return f"{platform.node()}:{os.getpid()}"


def lock_path(store, name: str) -> str:
    return store._p(LOCKS, name)


def held_state(store, ref) -> dict | None:
    """This process's lease state on `ref` (an object store), or None if it holds none."""
    entry = _HELD.get(lock_path(store, f"{ref.stage}.{ref.key}")) if store.remote else None
    return entry.get("lease") if entry else None


def assert_lease(store, ref) -> None:
    """Raise `LeaseLost` unless this process may still write `ref`: called before every write. A
    no-op on a local store and for an artifact this process holds no lease on."""
    state = held_state(store, ref)
    if state is None or state.get("committed"):   # committed: nothing more of it is written, or fenced
        return
    if state.get("lost"):
        raise LeaseLost(f"{ref}: lease lost ({state['lost']}); this process stops writing it")
    quiet = time.monotonic() - state["renewed"]
    if quiet > state["lease_s"] * 2 / 3:
        state["lost"] = f"not renewed for {quiet:.0f} s"
        raise LeaseLost(f"{ref}: lease not renewed for {quiet:.0f} s (over 2/3 of lease_s={state['lease_s']:g}); "
                        "another process may have taken it over, so this one stops writing it")


def commit(store, ref, path: str, data: bytes) -> bool:
    """Create `path` (the manifest of `ref`) with `data`, as THE commit of `ref`: True if this is
    the artifact's manifest now (ours, or a taker finished our commit with our bytes), False if
    another manifest stands. Under a lease the commit is fenced by the generation (module
    docstring): `LeaseLost` if a taker holds the next generation. Without a lease (a local store, or
    a caller that took none) it is the plain conditional create."""
    state = held_state(store, ref)
    if state is None:
        return put_exclusive(store.fs, path, data)
    assert_lease(store, ref)
    d, gen = lock_path(store, f"{ref.stage}.{ref.key}"), state["gen"]
    record = {"commit": {"path": path, "data": data.decode()}, "holder": state["me"], "gen": gen + 1}
    state["closing"] = True            # our own next generation is no takeover: the heartbeat stops
    if not put_exclusive(store.fs, f"{d}/{_lease_name(gen + 1)}", json.dumps(record).encode()):
        state["lost"] = "taken over before its commit"
        raise LeaseLost(f"{ref}: lease taken over before this process committed; its commit is refused "
                        "(the process that took over commits)")
    state["committed"] = gen + 1
    if not put_exclusive(store.fs, path, data):
        return False
    # The manifest exists: the record becomes a plain release, so a manifest deleted by hand later (to
    # have the artifact computed again) is not created anew from it by the next process to lock it.
    with contextlib.suppress(Exception):
        store.fs.pipe_file(f"{d}/{_lease_name(gen + 1)}", json.dumps(
            {"released": True, "committed": True, "holder": state["me"], "gen": gen + 1}).encode())
    return True


def _finish_commit(fs, record: dict) -> None:
    """A commit record read as the top generation: create its manifest if its holder has not (it
    died or froze between the two creates). The same bytes: if the holder's own create lands too,
    `put_exclusive` on either side sees its own content and agrees."""
    c = record["commit"]
    put_exclusive(fs, c["path"], c["data"].encode())


def note_progress(store, ref) -> None:
    """The holder of `ref` made progress (a write, a checkpoint): see `stall_s`."""
    state = held_state(store, ref)
    if state is not None:
        state["progress"] = time.monotonic()


@contextlib.contextmanager
def reentered(path: str) -> Iterator[bool]:
    """True (and counted) if this thread already holds `path`."""
    me = threading.get_ident()
    with _HELD_GUARD:
        entry = _HELD.get(path)
        mine = entry is not None and entry["thread"] == me
        if mine:
            entry["depth"] += 1
    try:
        yield mine
    finally:
        if mine:
            with _HELD_GUARD:
                entry["depth"] -= 1


def _hold(path: str, **extra) -> None:
    with _HELD_GUARD:
        _HELD[path] = {"thread": threading.get_ident(), "depth": 1, **extra}


def _unhold(path: str) -> None:
    with _HELD_GUARD:
        _HELD.pop(path, None)


@contextlib.contextmanager
def flock(path: str, what: str, timeout: float | None, log: logging.Logger, poll_s: float = 0.1) -> Iterator[None]:
    """`flock(LOCK_EX)` on `path`, polled so a timeout can fail cleanly. The fd is close-on-exec
    (Python's default), so a training subprocess never inherits the lock past its parent."""
    import fcntl

    with reentered(path) as again:
        if again:
            yield
            return
    t0, warned = time.monotonic(), False
    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                warned = still_waiting(log, what, lambda: _holder(path), f"lock {path}", "", timeout, t0, warned)
                time.sleep(poll_s)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)   # the holder we waited for removed this file on release: lock the current one
    try:
        if warned:
            log.info("%s: lock acquired after %.1f s waiting", what, time.monotonic() - t0)
        os.ftruncate(fd, 0)   # who holds it, for the message of whoever waits next
        os.pwrite(fd, f"pid={os.getpid()} host={platform.node()} since={time.strftime('%H:%M:%S')}".encode(), 0)
        _hold(path)
        try:
            yield
        finally:
            _unhold(path)
            # Remove the file while still holding it, so no lock file outlives a finished stage.
            # Safe: a waiter that then gets the lock on the removed file sees it is no longer
            # the one at `path` (_same_file) and locks the current one instead.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)      # closing the fd releases the flock (and so does the kernel on SIGKILL)


def _lease_name(gen: int) -> str:
    return f"lease-{gen:08d}.json"


def generations(fs, d: str) -> list[int]:
    try:
        names = fs.ls(d, detail=False)
    except FileNotFoundError:
        return []
    return sorted(int(n.rsplit("-", 1)[-1][:8]) for n in names if n.rsplit("/", 1)[-1].startswith("lease-"))


def _acquire(fs, d: str, me: str, what: str, lease_s: float, timeout: float | None, log, poll_s: float):
    """Wait for the lease in `d` and take it: (generation, generations seen when taken, the
    monotonic time the taking create was SENT: the holder's first "renewal", as conservative as
    the later ones)."""
    t0, warned, seen = time.monotonic(), False, {}    # (gen, seq) -> when this process first saw it
    body = {"holder": me, "seq": 0, "what": what, "lease_s": lease_s, "renew_every_s": lease_s / 3}
    while True:
        gens = generations(fs, d)
        top = gens[-1] if gens else -1
        take, cur = top < 0, {}
        if not take:
            try:
                cur = json.loads(fs.cat_file(f"{d}/{_lease_name(top)}"))
            except FileNotFoundError:   # released and cleaned up between the listing and the read
                continue
            expiry = max(lease_s, float(cur.get("lease_s") or 0))   # the holder's own setting counts too
            first = seen.setdefault((top, cur.get("seq")), time.monotonic())
            if "commit" in cur:         # committed (module docstring): made whole, then free
                _finish_commit(fs, cur)
                take = True
            elif cur.get("released"):
                take = True
            elif time.monotonic() - first >= expiry:
                log.warning("%s: lease of %s not renewed for %.0f s: taking it over", what, cur.get("holder"),
                            time.monotonic() - first)
                take = True
        sent = time.monotonic()
        if take and put_exclusive(fs, f"{d}/{_lease_name(top + 1)}", json.dumps({**body, "gen": top + 1}).encode()):
            if warned:
                log.info("%s: lease acquired after %.1f s waiting", what, time.monotonic() - t0)
            return top + 1, gens, sent
        if not take:
            warned = still_waiting(log, what, lambda c=cur: c.get("holder"), f"lease {d}",
                                   f", taken over after {lease_s:g} s without renewal", timeout, t0, warned)
        time.sleep(poll_s)


@contextlib.contextmanager
def lease(store, d: str, what: str, timeout: float | None, log: logging.Logger, stall_s: float | None = None,
          poll_s: float = 0.2) -> Iterator[None]:
    """The object-store lock (module docstring). `stall_s`: give the lease up after this long
    without `note_progress` (None or 0: never)."""
    with reentered(d) as again:
        if again:
            yield
            return
    fs, lease_s = store.fs, store.lease_s
    me = f"{worker_id()} since={time.strftime('%H:%M:%S')}"
    gen, older, sent = _acquire(fs, d, me, what, lease_s, timeout, log, poll_s)
    for g in older:             # older generations are history: only the highest counts
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{d}/{_lease_name(g)}")
    now = time.monotonic()
    state: dict = {"gen": gen, "lease_s": lease_s, "renewed": sent, "progress": now, "lost": None, "me": me}
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fs, d, gen, me, what, state, stop, stall_s, log),
                            name=f"lease:{what}", daemon=True)
    _hold(d, lease=state)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        _unhold(d)
        if not state.get("lost"):
            _release(fs, d, gen, me, committed=bool(state.get("committed")))


def _release(fs, d: str, gen: int, me: str, committed: bool = False) -> None:
    """The next generation says "released" (a waiter takes it at once); then drop our own. After a
    commit the next generation is the commit record, which a waiter reads as released."""
    with contextlib.suppress(Exception):
        if not committed:
            put_exclusive(fs, f"{d}/{_lease_name(gen + 1)}", json.dumps({"released": True, "holder": me}).encode())
        fs.rm_file(f"{d}/{_lease_name(gen)}")


def _heartbeat(fs, d: str, gen: int, me: str, what: str, state: dict, stop: threading.Event,
               stall_s: float | None, log) -> None:
    seq, every = 0, state["lease_s"] / 3
    while not stop.wait(every):
        if state.get("closing"):       # committing: the next generation is our own commit record
            return
        if stall_s and time.monotonic() - state["progress"] > stall_s:
            state["lost"] = f"given up: no progress for {stall_s:g} s (store.stall_s)"
            log.error("%s: no progress for %.0f s (store.stall_s=%g): giving up the lease so another process can "
                      "take over; this process stops writing it", what, time.monotonic() - state["progress"], stall_s)
            _release(fs, d, gen, me)
            return
        seq, t = seq + 1, time.monotonic()
        try:
            gens = generations(fs, d)
            if not gens or gens[-1] != gen:   # a taker created the next generation (or removed ours)
                if state.get("closing"):
                    return
                top = gens[-1] if gens else None
                taker = json.loads(fs.cat_file(f"{d}/{_lease_name(top)}")).get("holder") if top is not None else None
                state["lost"] = f"taken over by {taker or 'another process'}"
                log.error("%s: lease lost to %s (not renewed in time); this process stops writing it", what,
                          taker or "another process")
                return
            fs.pipe_file(f"{d}/{_lease_name(gen)}", json.dumps(
                {"holder": me, "seq": seq, "what": what, "gen": gen, "lease_s": state["lease_s"],
                 "renew_every_s": every}).encode())
            state["renewed"] = t       # the time the renewal was SENT: conservative for the deadline
        except Exception as e:   # noqa: BLE001  a blip: the next beat tries again; the deadline decides
            log.warning("%s: lease renewal failed (%s); retrying", what, e)


def still_waiting(log: logging.Logger, what: str, holder, where: str, note: str, timeout: float | None,
                  t0: float, warned: bool) -> bool:
    """One poll of a lock (flock or lease) held by another process: say so once on the caller's
    logger, and give up after `timeout`. `holder()` is read only then, not on every poll.
    Returns True: the caller has now warned."""
    if not warned:
        log.warning("waiting for another process computing %s (%s; %s%s)%s", what, holder(), where, note,
                    f", for at most {timeout:g} s" if timeout else "")
    if timeout is not None and time.monotonic() - t0 >= timeout:
        raise ArtifactLockTimeout(f"{what}: another process ({holder()}) has been computing it for more than "
                                  f"{timeout:g} s ({where}); rerun later, or raise store.lock_timeout_s")
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "holder unknown"
    except OSError:
        return "holder unknown"
