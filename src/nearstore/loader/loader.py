"""The loader: global order, rank share, batches built in parallel, exact resume, stats.

Batch i of an epoch is a pure function of (dataset, seed, epoch, rank,
world_size, batch_size, i), so the loader's state is (epoch, batches yielded)
and resuming needs nothing else. A state saved with another world size
resumes elastically: the rest of that epoch (``order.resume_offset``) is split
among the new ranks, and later epochs follow the new world size's order. Worker threads build whole batches (the
decode and resize kernels release the GIL) straight into a preallocated array
whose shape comes from the pipeline's declared output spec.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from nearstore.core.errors import ConfigError, NearstoreError, ResumeStateError
from nearstore.core.memory import BlockPool, HeapBlock
from nearstore.loader.order import Remainder, batch_bounds, epoch_order, num_batches, rank_share, resume_offset
from nearstore.node.client import ClusterSource
from nearstore.node.spec import ClusterSpec
from nearstore.ops.base import Spec
from nearstore.ops.image import worker_init
from nearstore.ops.pipeline import Pipeline, input_spec_of
from nearstore.plan.planner import plan
from nearstore.store.sources import Fetched, LocalSource, SampleSource

__all__ = ["Loader", "Batch", "LoaderStats", "SampleError"]

STATE_VERSION = 1
log = logging.getLogger(__name__)


class SampleError(NearstoreError, ValueError):
    """A sample failed (read, checksum or an op) and on_error='raise'; names shard and key."""


@dataclass
class Batch:
    """One batch: ``data`` is an (n, *shape) array when the output shape is fixed, else a list."""

    data: Any
    labels: np.ndarray
    keys: list[str]
    ids: np.ndarray
    epoch: int
    index: int

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class LoaderStats:
    samples: int = 0
    batches: int = 0
    bytes_read: int = 0
    skipped: int = 0
    skipped_samples: list[dict] = field(default_factory=list)
    empty_batches: int = 0  # batches whose every sample was skipped: not handed out (on_error="skip")
    op_seconds: dict[str, float] = field(default_factory=dict)
    fetch_seconds: float = 0.0
    wait_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.wall_seconds if self.wall_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "batches": self.batches,
            "bytes_read": self.bytes_read,
            "skipped": self.skipped,
            "skipped_samples": self.skipped_samples[:100],
            "empty_batches": self.empty_batches,
            "op_seconds": dict(self.op_seconds),
            "fetch_seconds": self.fetch_seconds,
            "wait_seconds": self.wait_seconds,
            "wall_seconds": self.wall_seconds,
            "samples_per_second": self.samples_per_second,
        }


def _settle(result: Future, *, exc: BaseException | None = None, source: Future | None = None) -> None:
    """Copy an outcome into ``result`` unless the consumer cancelled it."""
    try:
        if source is not None:
            if source.cancelled():
                result.cancel()
                return
            exc = source.exception()
            if exc is None:
                result.set_result(source.result())
                return
        result.set_exception(exc)
    except InvalidStateError:
        pass


class Loader:
    """Iterate a store through a pipeline, in batches, deterministically.

    Keyword-only configuration, checked here: ``batch_size``, ``seed``,
    ``shuffle``, ``rank``/``world_size`` with ``remainder`` ('pad' or 'drop'),
    ``drop_last`` (a short last batch), ``workers`` (host threads), ``prefetch``
    (batches in flight; a cluster over an open link is asked for several
    consecutive batches per request, ``batches_per_fetch``), ``on_error`` ('raise' or 'skip': skipped samples are
    counted in ``stats``). With ``cluster``, ``split`` says how many ops run on
    the nodes: an op index, 'host', 'node', 'auto' (the planner chooses), or a
    function from sample ids to one split per sample. Each batch runs its
    samples' remaining ops as one batch (``Pipeline.run_batch``).
    """

    def __init__(
        self,
        store: Any = None,
        *,
        pipeline: Pipeline | list,
        batch_size: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        remainder: Remainder = "pad",
        drop_last: bool = False,
        workers: int = 2,
        prefetch: int = 4,
        on_error: Literal["raise", "skip"] = "raise",
        cluster: Any = None,
        split: int | str | Callable[[np.ndarray], Sequence[int]] = "host",
        source: SampleSource | None = None,
    ) -> None:
        if sum(x is not None for x in (store, cluster, source)) != 1:
            raise ConfigError("give exactly one of store (a path or Store), cluster (a ClusterSpec, LocalCluster "
                              "or cluster file) or source")
        if workers < 1:
            raise ConfigError(f"workers must be >= 1 (got {workers})")
        if prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1 (got {prefetch})")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip' (got {on_error!r})")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)
        self.plan = None  # with split="auto": the planner's Plan (choice, reason, predictions)
        if cluster is not None:
            spec = getattr(cluster, "spec", cluster)
            spec = spec if isinstance(spec, ClusterSpec) else ClusterSpec.load(spec)
            if split == "auto":  # measure the cluster and let the model choose (see nearstore.plan)
                self.plan = plan(spec, self.pipeline, host_workers=workers, batch_size=batch_size, loader=Loader)
                split = self.plan.choice
            source = ClusterSource(spec, self.pipeline, split)
        elif split not in ("host", 0):
            raise ConfigError(f"split={split!r} needs a cluster: ops run on storage nodes only when "
                              "Loader(cluster=...) is given")
        self.source: SampleSource = source if source is not None else LocalSource(store)
        self.manifest = self.source.manifest
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.remainder, self.drop_last = rank, world_size, remainder, drop_last
        self.workers, self.prefetch, self.on_error = workers, prefetch, on_error
        rank_share(np.arange(1), rank=rank, world_size=world_size, remainder=remainder)  # validates
        self.specs: list[Spec] = self.pipeline.declare(input_spec_of(self.manifest))
        self.output_spec = self.specs[-1]
        self.epoch = 0
        self._batches_done = 0
        self._start = (0, 0)  # (epoch, offset): that epoch's batches cover order[offset:] (elastic resume)
        self.stats = LoaderStats()
        self._stats_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._io: ThreadPoolExecutor | None = None
        # batch memory, reused once the consumer drops a batch: no page faults per batch
        self._memory = BlockPool(HeapBlock, keep=prefetch + workers + 2)
        # batches per request to the source: several when each request has a fixed cost worth sharing (nodes
        # over an open link), at most half the read-ahead so that two requests are always in flight
        self.batches_per_fetch = max(1, min(self.source.batches_per_fetch(batch_size), prefetch // 2))

    def stats_snapshot(self) -> dict:
        """``stats.as_dict()`` read consistently while batches are being built."""
        with self._stats_lock:
            return self.stats.as_dict()

    # -- order -------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(
            self.manifest.num_samples, seed=self.seed, epoch=epoch, fingerprint=self.manifest.fingerprint,
            shuffle=self.shuffle,
        )

    def _offset(self, epoch: int) -> int:
        return self._start[1] if self._start[0] == epoch else 0

    def share(self, epoch: int) -> np.ndarray:
        """This rank's samples of ``epoch`` (after an elastic resume: of the rest of that epoch)."""
        return rank_share(self._order(epoch), rank=self.rank, world_size=self.world_size, remainder=self.remainder,
                          start=self._offset(epoch))

    def __len__(self) -> int:
        return num_batches(len(self.share(self.epoch)), self.batch_size, drop_last=self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0 (got {epoch})")
        self.epoch, self._batches_done, self._start = epoch, 0, (epoch, 0)

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_done": self._batches_done,
            "epoch_start": self._offset(self.epoch),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "fingerprint": self.manifest.fingerprint,
            "rank": self.rank,
            "world_size": self.world_size,
            "remainder": self.remainder,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "pipeline": self.pipeline.to_json(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` stopped. A state from any rank of the same world size resumes exactly (ranks
        move in lockstep); one from another world size resumes elastically (see ``nearstore.loader.order``)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ResumeStateError(f"not a nearstore loader state (version {STATE_VERSION}): {str(state)[:80]}")
        mine = self.state_dict()
        for key in ("seed", "shuffle", "fingerprint", "remainder", "batch_size", "drop_last", "pipeline"):
            if state.get(key) != mine[key]:
                raise ResumeStateError(
                    f"state_dict {key}={state.get(key)!r} does not match this loader's {key}={mine[key]!r}; "
                    "resume with the same dataset, seed, remainder, batch size and pipeline"
                )
        try:
            epoch, done, start = int(state["epoch"]), int(state["batches_done"]), int(state.get("epoch_start", 0))
            world = int(state["world_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ResumeStateError(f"state_dict lacks a valid {exc}: epoch, batches_done and world_size are "
                                   "integers") from None
        if world == self.world_size:
            self.epoch, self._batches_done, self._start = epoch, done, (epoch, start)
            return
        n = self.manifest.num_samples
        offset = resume_offset(n, start=start, world_size=world, batches_done=done, batch_size=self.batch_size)
        if offset >= n:  # that epoch was fully consumed
            epoch, offset = epoch + 1, 0
        log.info("elastic resume: state of %d ranks at epoch %d, batch %d -> %d ranks continue epoch %d at "
                 "sample %d of %d", world, int(state["epoch"]), done, self.world_size, epoch, offset, n)
        self.epoch, self._batches_done, self._start = epoch, 0, (epoch, offset)

    # -- iteration -------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; afterwards the loader stands at the next epoch's start."""
        return self.epochs(1)

    def epochs(self, count: int | None = None) -> Iterator[Batch]:
        """``count`` epochs (None: without end) back to back, prefetching across epoch boundaries.

        A training loop that iterates epoch after epoch never sees the pipeline
        drain at a boundary. ``state_dict()`` stays exact: it is updated as each
        batch is handed out.
        """
        if count is not None and count < 1:
            raise ConfigError(f"count must be >= 1 or None (got {count})")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nearstore-host", initializer=worker_init)
            self._io = ThreadPoolExecutor(self.prefetch, thread_name_prefix="nearstore-io")
        first, start = self.epoch, self._batches_done
        last = None if count is None else first + count - 1

        def positions() -> Iterator[tuple[int, int, np.ndarray, int]]:
            e, i = first, start
            while last is None or e <= last:
                share = self.share(e)
                total = num_batches(len(share), self.batch_size, drop_last=self.drop_last)
                if total == 0:
                    raise ConfigError(f"rank {self.rank} gets no batch in epoch {e} ({len(share)} samples, "
                                      f"batch_size {self.batch_size}, drop_last {self.drop_last})")
                for j in range(i, total):
                    yield e, j, share, total
                e, i = e + 1, 0

        todo = positions()
        pending: deque[tuple[Future, int]] = deque()
        group = self.batches_per_fetch
        upcoming = next(todo, None)

        def refill() -> None:
            """Submit fetches of ``group`` consecutive batches (fewer at an epoch's end) while that many
            prefetch slots are free, so the source is asked for whole groups, not one batch at a time."""
            nonlocal upcoming
            while upcoming is not None and self.prefetch - len(pending) >= group:  # group <= prefetch
                e, j, share, total = upcoming
                indices = [j]
                upcoming = next(todo, None)
                while len(indices) < group and upcoming is not None and upcoming[0] == e:
                    indices.append(upcoming[1])
                    upcoming = next(todo, None)
                pending.extend((fut, total) for fut in self._submit(e, indices, share))

        t_start = time.perf_counter()
        try:
            refill()
            while pending:
                fut, total = pending.popleft()
                t0 = time.perf_counter()
                batch = fut.result()
                waited = time.perf_counter() - t0
                refill()
                if batch.index + 1 < total:
                    self.epoch, self._batches_done = batch.epoch, batch.index + 1
                else:
                    self.epoch, self._batches_done = batch.epoch + 1, 0
                if len(batch) == 0:  # every sample skipped (on_error="skip"): never hand out an empty batch
                    with self._stats_lock:
                        self.stats.empty_batches += 1
                    continue
                with self._stats_lock:
                    self.stats.wait_seconds += waited
                    self.stats.batches += 1
                    self.stats.wall_seconds += time.perf_counter() - t_start
                t_start = time.perf_counter()
                yield batch
        finally:
            for fut, _ in pending:
                fut.cancel()

    def _submit(self, epoch: int, indices: list[int], share: np.ndarray) -> list[Future]:
        """Fetch batches ``indices`` (consecutive, of one epoch) in one request to the source, on the I/O pool
        (up to ``prefetch`` batches ahead), then compute each on the worker pool (on the I/O thread when the
        source ran every op). One future per batch."""
        assert self._io is not None and self._pool is not None
        bounds = [batch_bounds(i, len(share), self.batch_size) for i in indices]
        ids = share[bounds[0][0] : bounds[-1][1]]
        results: list[Future] = [Future() for _ in indices]
        pool = self._pool

        def fetch() -> tuple[list[Fetched], Any, float]:
            t0 = time.perf_counter()
            spec = self.output_spec
            buf = self._memory.array((len(ids), *spec.shape), spec.dtype) if spec.fixed else [None] * len(ids)
            # a source may deliver finished samples straight into the batch (ClusterSource: checked there)
            got = self.source.fetch(ids, epoch=epoch, seed=self.seed, into=buf if spec.fixed else None)
            return got, buf, time.perf_counter() - t0

        def fetched(ff: Future) -> None:
            try:
                got, buf, seconds = ff.result()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer with its traceback
                for result in results:
                    _settle(result, exc=exc)
                return
            base = bounds[0][0]
            for index, (lo, hi), result in zip(indices, bounds, results):
                if result.cancelled():
                    continue
                # this batch's part of the request: its samples and its slice of the shared buffer (a view)
                part, part_buf = got[lo - base : hi - base], buf[lo - base : hi - base]
                part_ids, part_s = share[lo:hi], seconds * (hi - lo) / len(ids)
                try:
                    if self._finished(part):  # no op left to run: bookkeeping only, here (no hand-off to a worker)
                        batch = self._build(epoch, index, part_ids, part, part_buf, part_s)
                        try:
                            result.set_result(batch)
                        except InvalidStateError:  # cancelled by the consumer
                            pass
                        continue
                    cf = pool.submit(self._build, epoch, index, part_ids, part, part_buf, part_s)
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer with its traceback
                    _settle(result, exc=exc)
                    continue
                cf.add_done_callback(lambda c, result=result: _settle(result, source=c))

        self._io.submit(fetch).add_done_callback(fetched)
        return results

    def _finished(self, fetched: list[Fetched]) -> bool:
        """Whether the source ran every op on every good sample of ``fetched``."""
        ops, prefix = len(self.pipeline.ops), self.source.prefix
        return all(f.error is not None or (prefix if f.prefix is None else f.prefix) == ops for f in fetched)

    def _build(self, epoch: int, index: int, ids: np.ndarray, fetched: list[Fetched], buf: Any,
               fetch_s: float) -> Batch:
        """Run each fetched sample's remaining ops (from how far its source processed it) as one batch into
        ``buf``. Samples the source already wrote into their slot of ``buf`` are not copied again (numpy
        skips an assignment of an array to itself)."""
        good = [f for f in fetched if f.error is None]
        if len(good) < len(fetched) and isinstance(buf, np.ndarray):
            # good samples move up over the failed ones' slots: take those already in ``buf`` out first
            for f in good:
                if isinstance(f.data, np.ndarray) and np.shares_memory(f.data, buf):
                    f.data = f.data.copy()
        timings: dict[str, float] = {}
        errors: list[Exception | None] = []
        if good:
            starts = [self.source.prefix if f.prefix is None else f.prefix for f in good]
            errors = self.pipeline.run_batch([f.data for f in good], keys=[f.key for f in good], seed=self.seed,
                                             epoch=epoch, starts=starts, timings=timings, out=buf)
        failed = iter(errors)
        keys: list[str] = []
        labels: list[int] = []
        kept: list[int] = []
        skipped: list[dict] = []
        nbytes = 0
        n = 0  # slot of the next good output in ``buf``
        for f in fetched:
            err = f.error if f.error is not None else next(failed)
            slot, n = (None, n) if f.error is not None else (n, n + 1)
            if err is not None:
                self._fail(f, err, skipped)
                continue
            if slot != len(keys):  # close the gap a skipped sample left
                buf[len(keys)] = buf[slot]
            keys.append(f.key)
            labels.append(f.label)
            kept.append(f.sample)
            nbytes += f.nbytes
        data = buf[: len(keys)]
        with self._stats_lock:
            st = self.stats
            st.samples += len(keys)
            st.bytes_read += nbytes
            st.fetch_seconds += fetch_s
            st.skipped += len(skipped)
            st.skipped_samples.extend(skipped)
            for k, v in timings.items():
                st.op_seconds[k] = st.op_seconds.get(k, 0.0) + v
        return Batch(data, np.asarray(labels, np.int64), keys, np.asarray(kept, np.int64), epoch, index)

    def _fail(self, f: Fetched, err: Exception, skipped: list) -> None:
        """Count a bad sample (on_error='skip') or raise ``SampleError`` naming it."""
        if self.on_error == "skip":
            skipped.append({"shard": f.shard, "key": f.key, "sample": f.sample, "error": str(err)})
            return
        raise SampleError(
            f"shard {f.shard}, key {f.key} (sample {f.sample}): {err}. "
            "Pass on_error='skip' to skip and count bad samples"
        ) from err

    def close(self) -> None:
        for pool in (self._io, self._pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._io = None
        self.source.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
