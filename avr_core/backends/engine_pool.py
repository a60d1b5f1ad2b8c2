"""Engines in their own processes: one per GPU group, all busy, all gone when closed.

vLLM's offline `LLM` refuses ``data_parallel_size > 1`` in one process, and an engine inside
the Prefect worker keeps accelerator memory until that process ends. So on a GPU machine (or
whenever `data_parallel_size > 1`) a vLLM backend is an `EnginePool`: `size` worker processes,
worker i seeing only its GPU group through CUDA_VISIBLE_DEVICES (tensor parallel inside a
group). A round is split into `size` contiguous chunks, run at the same time, and joined in
input order; each chunk keeps its global index offset, so per-conversation seeds (when requests
carry them) are the same as in one engine. No scheduler: a static split of one round, which is
what a round of same-shaped requests needs. Each engine runs in its own session: `close()` ends
its whole process group (vLLM's EngineCore and TP workers included), and an engine whose pool
process died ends its group itself. Every reply of a call is read before the next call, even
after an engine error; when that cannot be done (a dead engine, an interrupted read) the pool
closes rather than let a later call read an earlier call's answers. `broadcast` runs one method
on every engine (a weight reload, sleep, wake-up).

    >>> pool = EnginePool("avr_core.backends.vllm_offline:VLLMGenerator",        # doctest: +SKIP
    ...                   {"model": "/models/llama3-8b", "tensor_parallel_size": 2},
    ...                   groups=[[0, 1], [2, 3], [4, 5], [6, 7]])
    >>> pool.call("generate_at", convs, params)   # 4 engines x TP 2, one round  # doctest: +SKIP
    >>> pool.close()                               # processes joined, GPUs free  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import time
from typing import Sequence

from .base import BackendStats, BackendUnavailable

log = logging.getLogger(__name__)


def gpu_groups(size: int, per_engine: int, gpus: Sequence[int], visible: int) -> list[list[int]]:
    """`size` groups of `per_engine` GPUs from `gpus` (empty: 0..visible-1). Without CUDA
    (visible == 0) every group is empty: engines on CPU.

    >>> gpu_groups(4, 2, [], 8)
    [[0, 1], [2, 3], [4, 5], [6, 7]]
    >>> gpu_groups(2, 1, [6, 7], 8)
    [[6], [7]]
    >>> gpu_groups(2, 1, [], 0)
    [[], []]
    """
    if visible == 0:
        return [[] for _ in range(size)]
    allowed = list(gpus) or list(range(visible))
    if size * per_engine > len(allowed):
        raise BackendUnavailable(f"{size} engine(s) x {per_engine} GPU(s) need {size * per_engine} GPUs, "
                                 f"but {len(allowed)} are allowed ({allowed})")
    return [allowed[i * per_engine:(i + 1) * per_engine] for i in range(size)]


def child_visible_devices(group: Sequence[int], parent: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for an engine on `group`: the group holds indices of THIS process's
    visible devices (as torch numbers them), so under a parent restriction -- a Ray actor given
    GPUs 4 and 5 sees them as 0 and 1 -- they are mapped back through it, never read as
    physical ids (which would put every actor's engine on GPU 0).

    >>> child_visible_devices([0, 1], None)
    '0,1'
    >>> child_visible_devices([1], "4,5")
    '5'
    >>> child_visible_devices([0], "GPU-8f2a,GPU-77c1")
    'GPU-8f2a'
    """
    if not parent or not parent.strip():
        return ",".join(map(str, group))
    ids = [x.strip() for x in parent.split(",") if x.strip()]
    if max(group) >= len(ids):
        raise BackendUnavailable(f"GPU group {list(group)} is outside the {len(ids)} visible devices "
                                 f"(CUDA_VISIBLE_DEVICES={parent})")
    return ",".join(ids[i] for i in group)


def _die_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Kill this engine's whole process group once the pool's process is gone (killed, crashed):
    in its own session the engine no longer gets the terminal's signals, and vLLM's engine core
    does not watch its parent, so without this a dead pool would leave both holding GPU memory."""
    import signal
    import time

    while os.getppid() == parent:
        time.sleep(every_s)
    os.killpg(os.getpid(), signal.SIGKILL)


def _worker(conn, target: str, kwargs: dict, env: dict, parent: int) -> None:
    # A session (and process group) of its own: everything the engine starts (vLLM's EngineCore,
    # its TP workers) is in this group, and `EnginePool.close` ends the group, not one process.
    os.setsid()
    import threading

    threading.Thread(target=_die_with_parent, args=(parent,), daemon=True).start()
    os.environ.update(env)        # before anything imports CUDA
    import importlib

    try:
        module, _, name = target.partition(":")
        obj = getattr(importlib.import_module(module), name)(**kwargs)
        conn.send(("ready", getattr(obj, "device", None)))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which raises
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    orphaned = False
    try:
        _serve(conn, obj)
    except (EOFError, OSError):   # the pool's end of the pipe closed: the pool process is gone
        orphaned = True
    finally:
        if hasattr(obj, "close"):
            obj.close()
        conn.close()
    if orphaned:                  # no pool left to end this group: end it here (this process too)
        import signal
        os.killpg(os.getpid(), signal.SIGKILL)


def _serve(conn, obj) -> None:
    """Answer (seq, method, args) messages until None (close) or the pool's end of the pipe closes.

    Every reply echoes `seq`, so the pool can tell an answer to this call from a stale one, and
    carries the engine's cumulative counters, an error reply too: what an engine counted before
    it failed (dropped requests, say) still reaches the stage's manifest. The pool builds `args`
    (a chunk with its offset for `call`, the caller's arguments for `broadcast`), so both kinds
    of message are the same here."""
    while (msg := conn.recv()) is not None:
        seq, method, args = msg
        try:
            reply = ("ok", seq, getattr(obj, method)(*args), _snapshot(obj))
        except Exception as e:  # noqa: BLE001 -- reported to the parent, which raises
            reply = ("error", seq, f"{type(e).__name__}: {e}", _snapshot(obj))
        conn.send(reply)


def _snapshot(obj) -> dict | None:
    """The engine's cumulative counters, or None if it keeps none (an error must still be sent)."""
    try:
        return obj.stats.as_dict()
    except Exception:  # noqa: BLE001 -- counters are a record, never a reason to lose a reply
        return None


class EnginePool:
    """`len(groups)` processes each holding `target(**kwargs)` (a "module:Class" backend)."""

    def __init__(self, target: str, kwargs: dict, groups: list[list[int]], start_timeout_s: float = 1800,
                 per_engine: Sequence[dict] = (), drain_timeout_s: float = 120):
        """`per_engine[i]` (optional) updates `kwargs` for engine i (e.g. a distinct seed).
        `drain_timeout_s`: after one engine fails, how long the others' replies are waited for
        before the pool is closed instead (`_collect`)."""
        ctx = mp.get_context("spawn")
        # ONE stats object for the pool's life, updated in place: callers (tasks.runtime.Backend)
        # tell backends apart by the identity of their stats object.
        self.stats = BackendStats()
        self._latest: dict[int, dict] = {}     # engine -> its latest cumulative counters
        self._pending: set[int] = set()        # engines whose reply to a sent message is unread
        self._seq = 0
        self.drain_timeout_s = drain_timeout_s
        self.groups = groups
        self.closed = False
        self.procs, self.conns = [], []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        for i, g in enumerate(groups):
            parent, child = ctx.Pipe()
            env = {"CUDA_VISIBLE_DEVICES": child_visible_devices(g, visible)} if g else {}
            kw = {**kwargs, **(per_engine[i] if i < len(per_engine) else {})}
            p = ctx.Process(target=_worker, args=(child, target, kw, env, os.getpid()), daemon=False)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        devices = []
        for i, c in enumerate(self.conns):
            if not c.poll(start_timeout_s):
                self.close()
                raise BackendUnavailable(f"engine {i} of {target} did not start in {start_timeout_s:.0f}s")
            msg = self._recv(i)
            if msg[0] != "ready":
                self.close()
                raise BackendUnavailable(f"engine {i} (GPUs {groups[i]}) of {target} failed to start: {msg[1]}")
            devices.append(msg[1])
        per = [f"gpus {','.join(map(str, g))}" if g else "cpu" for g in groups]
        inner = f" [{devices[0]}]" if devices[0] else ""
        self.device = f"{len(groups)} engine process(es): " + "; ".join(per) + inner

    def _recv(self, i: int) -> tuple:
        """Engine i's next message; a dead engine closes the pool (its peers may hold GPUs for nothing)."""
        try:
            return self.conns[i].recv()
        except (EOFError, OSError):
            code = self.procs[i].exitcode
            self.close()
            raise BackendUnavailable(f"engine process {i} (GPUs {self.groups[i]}) died (exit code {code})") from None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def call(self, method: str, items: Sequence, *args) -> list:
        """`method(chunk, *args, offset)` on every engine at once over contiguous chunks of
        `items`; the results joined in input order."""
        self._check_usable()
        n = len(self.conns)
        bounds = [round(len(items) * i / n) for i in range(n + 1)]
        jobs = {i: (list(items[bounds[i]:bounds[i + 1]]), *args, bounds[i])
                for i in range(n) if bounds[i + 1] > bounds[i]}
        replies = self._exchange(method, jobs)
        return [x for i in sorted(replies) for x in replies[i]]

    def broadcast(self, method: str, *args) -> list:
        """`method(*args)` on EVERY engine (nothing split: `reload_weights`, `sleep`, `wake_up`);
        the per-engine results, in engine order."""
        self._check_usable()
        replies = self._exchange(method, {i: args for i in range(len(self.conns))})
        return [replies[i] for i in sorted(replies)]

    def _exchange(self, method: str, jobs: dict[int, tuple]) -> dict[int, object]:
        """Send `method(*jobs[i])` to engine i, read EVERY reply, and raise the first engine error.

        All replies are read even when one engine fails: an unread reply would be taken as the
        next call's answer, and a large one blocks its engine in `send` while the next call blocks
        in ours (a deadlock). Whatever stops that from completing -- a dead engine, an engine that
        does not answer within `drain_timeout_s` of a failure, an exception inside a read (a stage
        timeout, KeyboardInterrupt) -- closes the pool, so no later call can see these replies."""
        self._seq += 1
        try:
            for i, args in jobs.items():
                self._pending.add(i)          # before the send: an interrupted send is unknown state too
                self.conns[i].send((self._seq, method, args))
            replies, errors = self._collect(self._seq)
        except BaseException:
            self.close()
            raise
        finally:
            self._sum_stats()
        if errors:
            i, what = errors[0]
            more = f" (and {len(errors) - 1} other engine(s) failed)" if len(errors) > 1 else ""
            raise RuntimeError(f"engine process {i} (GPUs {self.groups[i]}): {what}{more}")
        return replies

    def _check_usable(self) -> None:
        if self.closed:
            raise RuntimeError("this engine pool is closed (its processes have ended): build a new backend")
        if self._pending:    # an earlier exchange ended without reading everything: replies may be stale
            left = sorted(self._pending)
            self.close()
            raise RuntimeError(f"engine pool closed: engine(s) {left} still owed replies to an earlier call, "
                               f"which this call would have read as its own: build a new backend")

    def _collect(self, seq: int) -> tuple[dict[int, object], list[tuple[int, str]]]:
        """Every outstanding reply, in arrival order: ({engine: result}, [(engine, error)]).
        Unbounded while all is well (a round takes as long as it takes); after the first error
        the others get `drain_timeout_s` in all."""
        replies, errors, deadline = {}, [], None
        while self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = mp_connection.wait([self.conns[i] for i in sorted(self._pending)], left)
            if not ready:
                i, what = errors[0]
                raise RuntimeError(f"engine process {i} (GPUs {self.groups[i]}): {what}; engine(s) "
                                   f"{sorted(self._pending)} did not reply within {self.drain_timeout_s:g}s "
                                   f"after it, so the pool was closed")
            for i in [self.conns.index(c) for c in ready]:
                status, got, payload, counters = self._recv(i)
                self._pending.discard(i)
                if got != seq:
                    raise RuntimeError(f"engine process {i} answered call {got} during call {seq}: "
                                       f"the pool is out of step and was closed")
                if counters is not None:
                    self._latest[i] = counters
                if status == "ok":
                    replies[i] = payload
                else:
                    errors.append((i, payload))
                    deadline = deadline or time.monotonic() + self.drain_timeout_s
        return replies, errors

    def _sum_stats(self) -> None:
        """`stats` = the sum of every engine's latest cumulative counters, written into the SAME
        object (engines count over their whole life, so the sum is this pool's total)."""
        for f in dataclasses.fields(self.stats):
            setattr(self.stats, f.name, sum(c.get(f.name, 0) for c in self._latest.values()))

    def close(self, timeout_s: float = 60) -> None:
        """Stop every engine process and everything it started; afterwards none is alive.

        Each engine is asked to stop (its backend's `close`), given `timeout_s`, and then its
        whole process group is killed: that ends an engine that did not stop and any engine core
        or TP worker it left behind (a stopped engine's group is empty by then). An engine that
        still owes a reply is not asked (it may be blocked writing that reply, and would never
        read the request) but killed at once. The worker is waited for without being reaped
        (WNOWAIT), so its pid -- the group's id -- cannot be reused by an unrelated process
        before the group is killed."""
        for i, c in enumerate(self.conns):
            if i in self._pending:   # busy, or blocked writing an unread reply: it would never read this
                continue
            try:
                c.send(None)
            except OSError:          # BrokenPipeError included: that engine is gone already
                pass
        deadline = time.monotonic() + timeout_s
        for i, p in enumerate(self.procs):
            wait = 0.0 if i in self._pending else deadline - time.monotonic()
            if not _wait_exit(p.pid, wait) and i not in self._pending:
                log.warning("engine process %s did not exit in %.0fs: killing its process group", p.pid, timeout_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.join(5)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []
        self._pending.clear()
        self.closed = True


def _wait_exit(pid: int, timeout_s: float, every_s: float = 0.05) -> bool:
    """Whether process `pid` (a child of this process) exits within `timeout_s`; it is left
    unreaped. Polling, not `Process.join`: an engine's grandchildren inherit the pipe behind
    multiprocessing's exit sentinel, so the sentinel stays open while any of them lives."""
    end = time.monotonic() + max(0.0, timeout_s)
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:    # already reaped
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(every_s)
