"""A node's workers: the processes that turn sample ids into response record batches.

Each worker opens the node directory itself and, for one chunk of sample ids,
reads every sample, verifies its crc32c, runs the ticket's op prefix (the same
``Pipeline`` code the host runs) and encodes the rows as one Arrow record
batch (``NodeWork``). Process workers hand the outputs back through shared memory
(``/dev/shm``): the server owns slots (files both sides map once and reuse), a
task names the slot to fill, the worker copies the samples' outputs into it
(the one copy the thread path makes too) and returns only the small columns
(keys, labels, shapes, crc32c) by pickle; the server builds the record batch
around the slot and sends it from there. The slot is free again when Arrow
drops the last reference to it. A batch too big for a slot, or no free slot,
comes back by pickle instead (a copy more).

A worker that dies (a crash in a native decoder, the OOM killer) fails only the
request it was serving, with ``WorkerCrashedError``; the pool starts fresh
workers and the node keeps serving. Workers exit on their own when the node
process is gone. ``kind="thread"`` runs the same ``NodeWork`` on threads of the
server process (no process hop; a crash takes the node down).
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import json
import logging
import mmap
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import psutil
import pyarrow as pa

from nearstore.core.errors import ChecksumError, ConfigError, NearstoreError, StoreError
from nearstore.core.memory import BlockPool
from nearstore.node.protocol import Packed, assemble_rows, encode_rows, pack_rows, response_schema
from nearstore.ops.image import worker_init
from nearstore.ops.pipeline import Pipeline, input_spec_of
from nearstore.ops.plugins import load_op_modules
from nearstore.store.store import Store

__all__ = ["NodeWork", "WorkerPool", "WorkerCrashedError", "WORKER_KINDS"]

WORKER_KINDS = ("process", "thread")
log = logging.getLogger(__name__)
WorkerKind = Literal["process", "thread"]


class WorkerCrashedError(NearstoreError, RuntimeError):
    """A node worker process died while serving a request; the node restarted its workers."""


def _new_delta() -> dict:
    return {"processed": 0, "read_seconds": 0.0, "read_bytes": 0, "op_seconds": {}, "errors_by_kind": {},
            "slowdown_seconds": 0.0}


class NodeWork:
    """What one worker does, the same in a process or a thread: read, verify, transform, encode."""

    def __init__(self, data: str | Path, *, slowdown: float = 1.0, memory_bytes: float | None = None,
                 cpu_clock: Literal["thread", "process"] = "thread") -> None:
        self.store = Store.node(data)
        self.slowdown = slowdown
        # what the slowdown scales: the CPU this worker spent on the ops. A process worker runs one task at a
        # time, so its whole process's CPU is the work's (whatever threads the op libraries use); thread workers
        # share a process, so each counts its own thread (their torch and ONNX Runtime run one intra-op thread
        # on it: ``worker_init``)
        self._cpu = time.process_time if cpu_clock == "process" else time.thread_time
        self._costs: dict[str, collections.deque] = {}  # per op chain: recent batches' CPU seconds per sample
        self.memory_bytes = memory_bytes  # None: what the machine has available when a ticket arrives
        self._pipelines: dict[str, tuple[Pipeline, list, pa.Schema]] = {}
        self._lock = threading.Lock()

    def _compiled(self, ops: list[dict | str]) -> tuple[Pipeline, list, pa.Schema]:
        """The validated pipeline for ``ops``, its declared specs on this store and its response schema,
        built once per op chain (every request and every task asks: their cost is per request, not per byte)."""
        key = json.dumps(ops, sort_keys=True)
        with self._lock:
            hit = self._pipelines.get(key)
        if hit is None:
            p = Pipeline(ops)
            specs = p.declare(input_spec_of(self.store.manifest))  # kind errors raise here, before any work
            dtypes = {k: ("bytes" if k == 0 else specs[k].dtype) for k in p.valid_splits}
            hit = (p, specs, response_schema(specs[-1].kind, dtypes[len(p.ops)], dtypes))
            with self._lock:
                if len(self._pipelines) > 64:
                    self._pipelines.clear()
                self._pipelines[key] = hit
        return hit

    def pipeline(self, ops: list[dict | str]) -> Pipeline:
        """The validated pipeline for ``ops`` (cached; kind errors raise before any work)."""
        return self._compiled(ops)[0]

    def specs(self, ops: list[dict | str]) -> list:
        """The declared spec after every prefix of ``ops`` on this store (cached)."""
        return self._compiled(ops)[1]

    def schema(self, ops: list, *, batch_size: int | None = None, copies: int = 1) -> pa.Schema:
        """The response schema for ``ops`` on this store (the dtype after every valid prefix in its metadata).
        With ``batch_size`` (a new request), refuses (``ConfigError``) ops whose declared memory, ``copies``
        workers each holding the parameters and a batch of ``batch_size`` samples, exceeds the node's."""
        pipe, specs, schema = self._compiled(ops)
        if batch_size is not None:
            self._check_memory(pipe, specs, batch_size, copies)
        return schema

    def _check_memory(self, pipe: Pipeline, specs: list, batch_size: int, copies: int) -> None:
        params = sum(s.param_bytes for s in specs[1:])
        resident = max((s.resident_bytes for s in specs[1:]), default=0.0) * batch_size
        if not params and not resident:
            return
        have = self.memory_bytes if self.memory_bytes is not None else psutil.virtual_memory().available
        need = copies * (params + resident)
        if need > have:
            big = max(zip(specs[1:], pipe.ops), key=lambda so: so[0].param_bytes + so[0].resident_bytes * batch_size)
            raise ConfigError(
                f"node {self.store.node_id} cannot run {big[1]!r}: {copies} worker(s) x ({params / 1e6:.1f} MB of "
                f"parameters + {batch_size} samples x {resident / batch_size / 1e6:.1f} MB resident) = "
                f"{need / 1e6:.1f} MB, but it has {have / 1e6:.1f} MB of memory; use a smaller network or cut, a "
                "smaller batch_size, or run these ops on the host")

    def rows(self, ops: list, ids: list[int], seed: int, epoch: int,
             prefixes: list[int] | None = None) -> tuple[list[tuple], dict]:
        """The response rows for ``ids`` (sample i gets ``prefixes[i]`` ops, default all) and the stats they
        add (read time and bytes, op time, errors). The ops run on the whole chunk as one batch.

        A bad sample is a row, not a failure: ``checksum``/``read`` when this
        node's copy is bad (the loader asks a replica), ``decode`` when the
        sample itself is (every copy would fail).
        """
        pipe = self.pipeline(ops)
        delta = _new_delta()
        delta["processed"] = len(ids)
        stops = [len(pipe.ops)] * len(ids) if prefixes is None else list(prefixes)
        rows: list[tuple | None] = [None] * len(ids)
        good: list[tuple[int, int, Any, Any]] = []  # (position, sample, data, ref)
        for pos, sample in enumerate(ids):
            t0 = time.perf_counter()
            try:
                data, ref = self.store.read(sample)
            except StoreError as exc:
                kind = "checksum" if isinstance(exc, ChecksumError) else "read"
                try:  # only on failure: which key it was (the shard's index may itself be unreadable)
                    bad = self.store.ref(sample)
                    rows[pos] = self._error(delta, sample, bad.key, bad.label, kind, exc, stops[pos])
                except StoreError:
                    rows[pos] = self._error(delta, sample, f"#{sample}", -1, kind, exc, stops[pos])
                continue
            delta["read_seconds"] += time.perf_counter() - t0
            delta["read_bytes"] += len(data)
            good.append((pos, sample, data, ref))
        outs: list = [None] * len(good)
        errors: list = [None] * len(good)
        if good:
            timings: dict[str, float] = {}
            cpu0 = self._cpu()
            errors = pipe.run_batch([g[2] for g in good], keys=[g[3].key for g in good], seed=seed, epoch=epoch,
                                    stops=[stops[g[0]] for g in good], timings=timings, out=outs)
            if self.slowdown > 1.0:
                cpu = self._charged_cpu(json.dumps([ops, sorted(set(stops))]), self._cpu() - cpu0, len(good))
                delta["slowdown_seconds"] = self.slow(timings, cpu)
            for k, v in timings.items():
                delta["op_seconds"][k] = delta["op_seconds"].get(k, 0.0) + v
        for (pos, sample, _, ref), out, err in zip(good, outs, errors):
            if err is not None:
                rows[pos] = self._error(delta, sample, ref.key, ref.label, "decode", err, stops[pos])
            else:
                rows[pos] = (sample, ref.key, ref.label, out, None, None, stops[pos])
        return rows, delta  # type: ignore[return-value]

    def message(self, ops: list, ids: list[int], seed: int, epoch: int,
                prefixes: list[int] | None = None) -> tuple[pa.RecordBatch, dict]:
        """The record batch for ``ids`` and its stats delta (the thread workers' whole task)."""
        rows, delta = self.rows(ops, ids, seed, epoch, prefixes)
        return encode_rows(self.schema(ops), rows), delta

    def _error(self, delta: dict, sample: int, key: str, label: int, kind: str, exc: Exception,
               prefix: int) -> tuple:
        delta["errors_by_kind"][kind] = delta["errors_by_kind"].get(kind, 0) + 1
        return sample, key, label, None, kind, f"node {self.store.node_id}: {exc}", prefix

    def _charged_cpu(self, chain: str, cpu: float, n: int) -> float:
        """The CPU seconds the emulated node is charged for ``n`` samples of op chain ``chain`` that used
        ``cpu`` here: ``n`` x the 25th percentile of the chain's CPU per sample over this worker's last 32
        batches (this one included). CPU time is inflated by contention too (cores shared with other
        processes' threads and caches: up to 2x measured on the project's 2-core machine), so a batch's own
        figure would move the emulated node's speed with the machine's load; a low percentile of recent
        batches is the chain's cost on a quiet core."""
        with self._lock:
            hist = self._costs.setdefault(chain, collections.deque(maxlen=32))
            hist.append(max(cpu, 0.0) / max(n, 1))
            if len(self._costs) > 64:
                self._costs.pop(next(iter(self._costs)))
            return n * float(np.percentile(np.fromiter(hist, float), 25))

    def slow(self, timings: dict[str, float], cpu_seconds: float) -> float:
        """Emulate a CPU ``slowdown`` times weaker: ops that used ``cpu_seconds`` of CPU take
        ``slowdown x cpu_seconds``; the worker idles for what their measured time (``timings``) falls short of
        that, and the idle time is added to ``timings`` (in proportion). The emulated node's speed is its
        own: other processes contending for this machine's cores stretch the ops' measured time, which the
        idle time absorbs, not their CPU time, which sets the target (a stretch beyond ``slowdown``x shows).
        Returns the seconds idled."""
        if self.slowdown <= 1.0 or not timings:
            return 0.0
        wall = sum(timings.values())
        extra = max(self.slowdown * max(cpu_seconds, 0.0) - wall, 0.0)
        time.sleep(extra)
        for k, v in timings.items():
            timings[k] += extra * (v / wall if wall > 0 else 1.0 / len(timings))
        return extra

    def profile(self, ops: list, n: int) -> dict:
        """Run the op chain stage by stage on the first ``n`` samples this node holds, as the node serves them
        (a batched stage, such as a network, on all ``n`` at once): seconds per sample (wall, an emulated
        slowdown included, and the stage's own CPU, which other work on the machine does not inflate) and bytes
        out per stage.

        Untimed passes first (``Pipeline.warm_up``): they build what ops build on first use (a network's engine)
        and let a batched stage settle at this batch size, which a long-running node pays once, not per batch.
        """
        pipe = self.pipeline(ops)
        man = self.store.manifest
        ids = [s.first + j for i, s in enumerate(man.shards) if self.store.holds(i) for j in range(s.samples)][:n]
        stage_s = {st.name: 0.0 for st in pipe.stages}
        cpu_s = {st.name: 0.0 for st in pipe.stages}
        out_bytes = {st.name: 0.0 for st in pipe.stages}
        t0 = time.perf_counter()
        read = [self.store.read(sid) for sid in ids]
        read_s = time.perf_counter() - t0
        raw = float(sum(len(x) for x, _ in read))
        keys = [ref.key for _, ref in read]
        if read:
            pipe.warm_up([x for x, _ in read], keys)
        cur: list = [x for x, _ in read]
        for st in pipe.stages:
            t = {st.name: 0.0}
            out: list = [None] * len(cur)
            cpu0 = self._cpu()
            c0 = time.thread_time()  # the stage's own CPU (ops run in this thread, one intra-op thread each)
            errors = pipe.run_batch(cur, keys=keys, seed=0, epoch=0, starts=st.start, stops=st.stop, timings=t,
                                    out=out)
            cpu_s[st.name] = time.thread_time() - c0
            bad = next((e for e in errors if e is not None), None)
            if bad is not None:
                raise bad
            self.slow(t, self._cpu() - cpu0)
            stage_s[st.name] = t[st.name]
            out_bytes[st.name] = float(sum(y.nbytes if hasattr(y, "nbytes") else len(y) for y in out))
            cur = out
        k = max(len(ids), 1)
        return {"node": self.store.node_id, "samples": len(ids), "read_seconds": read_s / k, "raw_bytes": raw / k,
                "stages": [{"name": st.name, "start": st.start, "stop": st.stop, "seconds": stage_s[st.name] / k,
                            "cpu_seconds": cpu_s[st.name] / k, "out_bytes": out_bytes[st.name] / k}
                           for st in pipe.stages]}

    def close(self) -> None:
        self.store.close()


# -- the worker-process side ---------------------------------------------------------
_WORK: NodeWork | None = None
_BARRIER: "threading.Barrier | None" = None


def _init_process(data: str, slowdown: float, out_dir: str, barrier: "threading.Barrier",
                  ops_modules: list[str]) -> None:
    global _WORK, _BARRIER
    _BARRIER = barrier
    worker_init()
    load_op_modules(ops_modules)  # the node's op modules (an import error is reported by the server)
    _WORK = NodeWork(data, slowdown=slowdown, cpu_clock="process")
    threading.Thread(target=_watch_parent, args=(out_dir,), daemon=True, name="nearstore-parent-watch").start()


def _watch_parent(out_dir: str) -> None:
    """Exit when the node process is gone (killed with SIGKILL, it cannot stop its workers itself)."""
    parent = mp.parent_process()
    if parent is None:
        return
    mp.connection.wait([parent.sentinel])
    shutil.rmtree(out_dir, ignore_errors=True)
    os._exit(0)


def _message_in_process(ops: list, ids: list[int], seed: int, epoch: int, prefixes: list[int] | None,
                        slot: tuple[str, int] | None) -> tuple[Packed, pa.Buffer | None, dict]:
    """Copy the outputs for ``ids`` into ``slot`` (path, size) when they fit, else return them by pickle."""
    assert _WORK is not None, "worker not initialized"
    rows, delta = _WORK.rows(ops, ids, seed, epoch, prefixes)
    delta["cpu"] = (os.getpid(), time.process_time())
    inline: list[pa.Buffer] = []

    def into(n: int) -> Any:
        if slot is not None and n <= slot[1]:
            return _slot_map(*slot)
        inline.append(pa.allocate_buffer(n))
        return inline[0]

    packed = pack_rows(rows, into)
    return packed, (inline[0] if inline else None), delta


_MAPS: dict[str, mmap.mmap] = {}  # slot path -> this worker's mapping of it, oldest first
_MAX_MAPS = 64


def _slot_map(path: str, size: int) -> mmap.mmap:
    """This worker's mapping of the slot file ``path`` (made on first use; the oldest dropped past 64)."""
    mm = _MAPS.get(path)
    if mm is None:
        while len(_MAPS) >= _MAX_MAPS:
            _MAPS.pop(next(iter(_MAPS))).close()
        fd = os.open(path, os.O_RDWR)
        try:
            mm = _MAPS[path] = mmap.mmap(fd, size)
        finally:
            os.close(fd)
    return mm


def _profile_in_process(ops: list, n: int) -> dict:
    assert _WORK is not None, "worker not initialized"
    return {**_WORK.profile(ops, n), "cpu": (os.getpid(), time.process_time())}


def _ready() -> int:
    assert _BARRIER is not None, "worker not initialized"
    _BARRIER.wait(60)  # each worker holds one of these tasks at once: the pids are all of the pool's processes
    return os.getpid()


def _shared_memory_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class _ShmBlock:
    """A slot: a file in shared memory, mapped here and (once, on first use) in each worker."""

    def __init__(self, path: str, size: int) -> None:
        self.path, self.size = path, size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # real pages now: a full /dev/shm is an error here, not a SIGBUS later
            self.map = mmap.mmap(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._anchor)

    def close(self) -> None:
        del self._anchor
        self.map.close()
        Path(self.path).unlink(missing_ok=True)


def _slot_pool(directory: str) -> BlockPool:
    """The server's slots: 16 MiB to start, grown up to 128 MiB for bigger batches, at most 32."""
    seq = itertools.count()
    return BlockPool(lambda size: _ShmBlock(os.path.join(directory, f"slot-{next(seq)}"), size),
                     size=16 << 20, cap=128 << 20, max_blocks=32, keep=32)


# -- the server side -----------------------------------------------------------------
class WorkerPool:
    """``workers`` processes (or threads) running ``NodeWork`` for the node directory of ``work``.

    ``submit`` returns a future; ``result`` turns it into ``(record batch,
    stats delta)``; ``discard`` drops a future the caller no longer wants
    (freeing its slot).
    """

    def __init__(self, work: NodeWork, *, workers: int, kind: WorkerKind = "process",
                 ops_modules: list[str] | None = None) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be >= 1 (got {workers})")
        if kind not in WORKER_KINDS:
            raise ConfigError(f"worker kind must be one of {', '.join(WORKER_KINDS)} (got {kind!r})")
        self.work, self.workers, self.kind = work, workers, kind
        self.ops_modules = list(ops_modules or [])
        self.restarts = 0
        self.pids: list[int] = [os.getpid()] if kind == "thread" else []  # the processes that run ops
        self._cpu_by_pid: dict[int, float] = {}
        self._lock = threading.Lock()
        self._dir: str | None = None
        if kind == "thread":
            self._pool: ProcessPoolExecutor | ThreadPoolExecutor = ThreadPoolExecutor(
                workers, thread_name_prefix="nearstore-node", initializer=worker_init)
        else:
            self._dir = tempfile.mkdtemp(prefix="nearstore-node-", dir=_shared_memory_dir())
            self._slots = _slot_pool(self._dir)
            self._pool = self._start_processes()

    def _start_processes(self) -> ProcessPoolExecutor:
        # forkserver: workers fork from a clean process that imported the op library and torch once (fast
        # starts, and safe: never a fork of this multithreaded server, which itself does not load torch)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["nearstore.node.workers", "torch"])
        pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_process,
                                   initargs=(str(self.work.store.path), self.work.slowdown, self._dir,
                                             ctx.Barrier(self.workers), self.ops_modules))
        # start them all now: the first request should not wait for them
        self.pids = [f.result() for f in [pool.submit(_ready) for _ in range(self.workers)]]
        return pool

    def _restart(self, broken: ProcessPoolExecutor | ThreadPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start_processes()
                self.restarts += 1
                log.warning("node %s: a worker process died; started %d new workers (restart %d)",
                            self.work.store.node_id, self.workers, self.restarts)

    def _submit(self, fn, *args) -> Future:  # noqa: ANN001
        pool = self._pool
        try:
            fut = pool.submit(fn, *args)
        except BrokenProcessPool:
            self._restart(pool)
            pool = self._pool
            fut = pool.submit(fn, *args)
        fut.pool = pool  # type: ignore[attr-defined]  # which pool to restart if it breaks
        return fut

    def _crashed(self, fut: Future, what: str) -> WorkerCrashedError:
        self._restart(getattr(fut, "pool", self._pool))
        return WorkerCrashedError(f"a worker process died while {what} (killed, out of memory, or a crash in "
                                  "native code; see the node log); the node started new workers, ask again")

    def _note_cpu(self, cpu: tuple[int, float]) -> None:
        with self._lock:
            self._cpu_by_pid[cpu[0]] = cpu[1]

    def submit(self, ops: list, ids: list[int], seed: int, epoch: int, prefixes: list[int] | None = None) -> Future:
        """Start building the record batch for ``ids`` (sample i gets ``prefixes[i]`` ops) on a worker."""
        if self.kind == "thread":
            return self._submit(self.work.message, ops, ids, seed, epoch, prefixes)
        slot = self._slots.take()
        try:
            fut = self._submit(_message_in_process, ops, ids, seed, epoch, prefixes,
                               (slot.path, slot.size) if slot else None)
        except BaseException:
            if slot:
                self._slots.give_back(slot)
            raise
        fut.slot = slot  # type: ignore[attr-defined]  # the result's batch takes over its lease
        fut.ops = ops  # type: ignore[attr-defined]
        return fut

    def result(self, fut: Future) -> tuple[pa.RecordBatch, dict]:
        """Wait for ``fut``: (record batch, stats delta); a dead worker raises ``WorkerCrashedError``."""
        if self.kind == "thread":
            return fut.result()
        slot: _ShmBlock | None = fut.slot  # type: ignore[attr-defined]
        try:
            packed, inline, delta = fut.result()
        except BaseException as exc:
            if slot is not None:
                self._slots.give_back(slot)
            if isinstance(exc, BrokenProcessPool):
                raise self._crashed(fut, "running ops") from None
            raise
        self._note_cpu(delta.pop("cpu"))
        if inline is None:
            payload = self._slots.lend_buffer(slot, packed.payload_bytes)  # type: ignore[arg-type]
        else:
            payload = inline
            self._slots.grow(packed.payload_bytes)  # first: the too-small slot is dropped, not kept
            if slot is not None:
                self._slots.give_back(slot)
        return assemble_rows(self.work.schema(fut.ops), packed, payload), delta  # type: ignore[attr-defined]

    def discard(self, fut: Future, account: Callable[[dict], None] | None = None) -> None:
        """Drop a future nobody will read (a cancelled stream): its slot is freed, and if it ran, its stats
        delta still goes to ``account`` (the work was done)."""
        slot = getattr(fut, "slot", None)

        def done(f: Future) -> None:
            if slot is not None:
                self._slots.give_back(slot)
            if account is not None and not f.cancelled() and f.exception() is None:
                delta = f.result()[-1]
                delta.pop("cpu", None)
                account(delta)

        fut.add_done_callback(done)  # runs at once if it is already done
        fut.cancel()

    def profile(self, ops: list, n: int) -> dict:
        """Profile ``ops`` on ``n`` samples on a worker (the same processes that serve)."""
        if self.kind == "thread":
            return self._submit(self.work.profile, ops, n).result()
        fut = self._submit(_profile_in_process, ops, n)
        try:
            res = fut.result()
        except BrokenProcessPool:
            raise self._crashed(fut, "profiling") from None
        self._note_cpu(res.pop("cpu"))
        return res

    def cpu_seconds(self) -> float:
        """CPU seconds of this process and of every worker process so far (live workers read now; workers
        that died as of their last task)."""
        with self._lock:
            known = dict(self._cpu_by_pid)
            live = [] if self.kind == "thread" else list(self.pids)
        for pid in live:
            try:
                t = psutil.Process(pid).cpu_times()
                known[pid] = t.user + t.system
            except psutil.Error:
                pass
        return time.process_time() + sum(known.values())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._dir:
            self._slots.close()
            shutil.rmtree(self._dir, ignore_errors=True)
