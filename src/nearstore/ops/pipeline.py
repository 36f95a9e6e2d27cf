"""Pipelines: an ordered list of ops, grouped into stages, runnable in pieces.

A pipeline runs ops[0:k] on a storage node and ops[k:] on the host. Ops are
grouped into stages: decode_jpeg directly followed by a geometry op
(random_resized_crop, center_crop, resize) forms one fused stage (region +
DCT-scaled decoding). A split may fall only between stages, so a sample's
output is bit-identical for every valid split. ``declare`` gives the spec after
every op boundary without running anything.

``run_batch`` runs a batch of samples, each from its own split (how far it was
already processed) to a common stop: runs of per-sample stages go sample by
sample (a sample stays in cache through them, as it always did), and a stage
whose op batches (``Op.batched``) runs once over the batch's samples that
reach it. A sample that fails (``SampleDecodeError``) is reported in its slot
of the returned errors and leaves the others untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from nearstore.core.errors import ConfigError, OpParamError, SampleDecodeError
from nearstore.ops.base import Op, Spec, make_op, rng_for, rng_reused
from nearstore.ops.image import DecodeJpeg, GeometryOp, decode_geometry
from nearstore.ops.plugins import import_errors, load_op_modules

__all__ = ["Pipeline", "Stage", "input_spec", "input_spec_of", "standard_train", "SPLIT_NAMES"]

SPLIT_NAMES = ("host", "node")


@dataclass(frozen=True)
class Stage:
    """ops[start:stop] run as one unit; ``rng_position`` is the op index whose generator it uses."""

    start: int
    stop: int
    name: str
    fn: Callable[[Any, np.random.Generator | None], Any]
    rng_position: int | None
    into: Callable[[Any, np.random.Generator | None, np.ndarray], None] | None = None
    op: Op | None = None  # the op of a one-op stage (None for a fused stage)

    @property
    def view(self) -> Callable[[Any, np.random.Generator | None], Any] | None:
        """The op's ``as_view`` (its output as a view of its input, for a next stage that accepts views)."""
        return None if self.op is None else self.op.as_view

    @property
    def accepts_views(self) -> bool:
        return self.op is not None and self.op.accepts_views

    @property
    def batched(self) -> bool:
        """Whether the stage runs once per batch (its op overrides ``run_batch``)."""
        return self.op is not None and self.op.batched

    def run_into(self, x: Any, rng: np.random.Generator | None, out: np.ndarray) -> None:
        if self.into is not None:
            self.into(x, rng, out)
        else:
            out[...] = self.fn(x, rng)


def input_spec(payload: str, *, mean_bytes: float, mean_hw: tuple[float, float] | None) -> Spec:
    """The spec of raw samples as stored."""
    return Spec(payload, None, "uint8", float(mean_bytes), mean_hw)


def input_spec_of(manifest: Any) -> Spec:
    """The spec of a store's raw samples, from its manifest (payload kind, mean bytes and image size)."""
    return input_spec(manifest.payload, mean_bytes=manifest.mean_payload_bytes,
                      mean_hw=(float(manifest.mean_height), float(manifest.mean_width)))


class Pipeline:
    """An op list with declared specs and stage boundaries.

    ``Pipeline(["decode_jpeg", {"op": "random_resized_crop", "size": 224}, "flip", "to_uint8_chw"])``
    """

    def __init__(self, ops: Iterable[dict | str | Op] = ()) -> None:
        load_op_modules()  # ops of the nearstore.ops entry-point group (imported once per process)
        try:
            self.ops: list[Op] = [make_op(o) for o in ops]
        except OpParamError as exc:
            failed = import_errors()
            if not failed or "unknown op" not in str(exc):
                raise
            lines = "; ".join(f"{src}: {err.strip().splitlines()[-1]}" for src, err in failed.items())
            raise OpParamError(f"{exc}; op modules that failed to import here: {lines}") from None
        self.stages: list[Stage] = self._group()

    def _group(self) -> list[Stage]:
        stages: list[Stage] = []
        i = 0
        while i < len(self.ops):
            op = self.ops[i]
            nxt = self.ops[i + 1] if i + 1 < len(self.ops) else None
            if isinstance(op, DecodeJpeg) and isinstance(nxt, GeometryOp):
                geo = nxt
                stages.append(
                    Stage(i, i + 2, f"{op.name}+{geo.name}", lambda x, rng, g=geo: decode_geometry(x, g, rng),
                          i + 1 if geo.random else None)
                )
                i += 2
            else:
                stages.append(Stage(i, i + 1, op.label, op, i if op.random else None, op.into, op))
                i += 1
        return stages

    def __len__(self) -> int:
        return len(self.ops)

    def to_json(self) -> list[dict]:
        return [o.to_json() for o in self.ops]

    @classmethod
    def from_json(cls, ops: Sequence[dict]) -> "Pipeline":
        if not isinstance(ops, (list, tuple)):
            raise OpParamError(f"a pipeline is a list of ops, got {type(ops).__name__}")
        return cls(ops)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(map(repr, self.ops))}])"

    @property
    def valid_splits(self) -> list[int]:
        """Op indices where the pipeline may be cut (stage boundaries, 0 and len included)."""
        return [0] + [s.stop for s in self.stages]

    def resolve_split(self, split: int | str) -> int:
        """A split given as an index, 'host' (0) or 'node' (all ops)."""
        if split == "host":
            return 0
        if split == "node":
            return len(self.ops)
        if isinstance(split, bool) or not isinstance(split, int):
            raise ConfigError(f"split must be an op index, 'host' or 'node' (or 'auto' where supported); got {split!r}")
        if split not in self.valid_splits:
            inside = next((s.name for s in self.stages if s.start < split < s.stop), None)
            why = f" it falls inside the fused stage {inside}" if inside else ""
            raise ConfigError(f"split {split} is not valid for {self!r};{why} valid splits: {self.valid_splits}")
        return split

    def declare(self, spec: Spec) -> list[Spec]:
        """Specs at every op boundary: element i is the input of op i; the last is the output."""
        specs = [spec]
        for pos, op in enumerate(self.ops):
            op.check_input(specs[-1], pos)
            specs.append(op.declare(specs[-1]))
        return specs

    def declare_stages(self, spec: Spec) -> list[Spec]:
        """Per stage: the spec after it, with the stage's cost (its ops' MACs and parameter bytes summed, the
        largest resident bytes, where all of them can run). What the planner and the designer both read."""
        specs = self.declare(spec)
        out = []
        for st in self.stages:
            produced = specs[st.start + 1 : st.stop + 1]
            where = tuple(w for w in produced[0].where if all(w in s.where for s in produced))
            out.append(specs[st.stop].with_(where=where or ("cpu",), macs=sum(s.macs for s in produced),
                                            param_bytes=sum(s.param_bytes for s in produced),
                                            resident_bytes=max(s.resident_bytes for s in produced)))
        return out

    def run(
        self,
        x: Any,
        *,
        key: str,
        seed: int,
        epoch: int,
        start: int = 0,
        stop: int | None = None,
        timings: dict[str, float] | None = None,
        out: np.ndarray | None = None,
    ) -> Any:
        """Run ops[start:stop] on one sample (both must be valid splits): a batch of one.

        With ``out`` (a slot of the declared output shape) the result is
        written there and None is returned. A failing sample raises its error.
        """
        box: list | np.ndarray = [None] if out is None else out[None]
        err = self.run_batch([x], keys=[key], seed=seed, epoch=epoch, starts=start, stops=stop, timings=timings,
                             out=box)[0]
        if err is not None:
            raise err
        return None if out is not None else box[0]

    #: full passes over a profile's batch before timing it, when a stage runs batches: a network engine's first
    #: runs at a new batch size are slow (memory planning, arena growth; measured 1.3-2x on this CPU for the
    #: first two 16-sample passes after a 2-sample one), which a serving node pays once, not per batch
    WARM_PASSES = 2

    def warm_up(self, xs: Sequence[Any], keys: Sequence[str]) -> None:
        """Run the ops untimed as a profile is about to: once over two samples (builds what ops build on first
        use, such as a network's engine) and, when a stage runs batches, ``WARM_PASSES`` times over all."""
        self.run_batch(xs[:2], keys=keys[:2], seed=0, epoch=0, out=[None] * len(xs[:2]))
        if any(st.batched for st in self.stages):
            for _ in range(self.WARM_PASSES):
                self.run_batch(xs, keys=keys, seed=0, epoch=0, out=[None] * len(xs))

    def run_batch(
        self,
        xs: Sequence[Any],
        *,
        keys: Sequence[str],
        seed: int,
        epoch: int,
        starts: int | Sequence[int] = 0,
        stops: int | Sequence[int] | None = None,
        timings: dict[str, float] | None = None,
        out: np.ndarray | list,
    ) -> list[SampleDecodeError | None]:
        """Run ops[starts[i]:stops[i]] on sample ``xs[i]`` into ``out[i]``; returns each sample's error (or None).

        ``starts`` and ``stops`` are one split for all samples or one per sample
        (the host finishes samples that nodes processed to different depths;
        a node runs each sample to its own depth); all must be valid splits
        (``stops`` default: all ops). ``out`` is a list whose entries are set,
        or, when every sample stops at the same split, an array of the declared
        output shape (one slot per sample). A sample's bits do not depend on
        the other samples, their splits, or how they are grouped.
        """
        n = len(xs)
        first = [starts] * n if isinstance(starts, int) else [int(s) for s in starts]
        stops = len(self.ops) if stops is None else stops
        end = [stops] * n if isinstance(stops, int) else [int(s) for s in stops]
        if len(first) != n or len(end) != n or len(keys) != n:
            raise ConfigError(f"run_batch: {n} samples but {len(keys)} keys, {len(first)} starts, {len(end)} stops")
        valid = self.valid_splits
        for k in {*first, *end}:
            if k not in valid:
                raise ConfigError(f"split {k} is not valid for {self!r}; valid splits: {valid}")
        if any(a > b for a, b in zip(first, end)):
            raise ConfigError("a sample's start is past its stop: "
                              f"{next((a, b) for a, b in zip(first, end) if a > b)}")
        into = isinstance(out, np.ndarray)
        if into and len(set(end)) > 1:
            raise ConfigError("run_batch writes into an array only when every sample stops at the same split; "
                              "pass a list as out")
        errors: list[SampleDecodeError | None] = [None] * n
        cur = list(xs)
        lo, hi = min(first, default=0), max(end, default=0)
        todo = [st for st in self.stages if st.start >= lo and st.stop <= hi]
        last = todo[-1] if todo else None
        i = 0
        while i < len(todo):  # segments: a batched stage alone, or a run of per-sample stages
            j = i + 1
            if not todo[i].batched:
                while j < len(todo) and not todo[j].batched:
                    j += 1
            segment = todo[i:j]
            if segment[0].batched:
                self._batched_stage(segment[0], cur, errors, first, end, keys, seed, epoch, timings,
                                    out if segment[0] is last and into else None)
            else:
                self._sample_stages(segment, cur, errors, first, end, keys, seed, epoch, timings,
                                    out if segment[-1] is last and into else None)
            i = j
        for s in range(n):  # list outputs, and samples with nothing to run
            if errors[s] is None:
                if not into:
                    out[s] = cur[s]
                elif first[s] == end[s]:
                    out[s][...] = cur[s]
        return errors

    @staticmethod
    def _sample_stages(segment: list[Stage], cur: list, errors: list, first: list[int], end: list[int],
                       keys: Sequence[str], seed: int, epoch: int, timings: dict[str, float] | None,
                       out: np.ndarray | None) -> None:
        """Per-sample stages, sample by sample; the segment's last output goes to ``out[s]`` when given."""
        final = segment[-1]
        # a layout-only stage whose output goes straight on to a stage that reads views hands it a view
        viewed = [st.view is not None and nxt.accepts_views for st, nxt in zip(segment, segment[1:])] + [False]
        for s in range(len(cur)):
            if errors[s] is not None:
                continue
            x = cur[s]
            try:
                for k, st in enumerate(segment):
                    if st.start < first[s] or st.stop > end[s]:
                        continue
                    rng = rng_reused(seed, epoch, keys[s], st.rng_position) if st.rng_position is not None else None
                    t0 = time.perf_counter()
                    if out is not None and st is final:
                        st.run_into(x, rng, out[s])
                        x = None
                    elif viewed[k] and segment[k + 1].stop <= end[s]:
                        x = st.view(x, rng)  # type: ignore[misc]
                    else:
                        x = st.fn(x, rng)
                    if timings is not None:
                        timings[st.name] = timings.get(st.name, 0.0) + time.perf_counter() - t0
            except SampleDecodeError as exc:
                errors[s], x = exc, None
            cur[s] = x

    @staticmethod
    def _batched_stage(st: Stage, cur: list, errors: list, first: list[int], end: list[int], keys: Sequence[str],
                       seed: int, epoch: int, timings: dict[str, float] | None, out: np.ndarray | None) -> None:
        """One batched op over the samples that reach it; a failing batch is rerun sample by sample."""
        assert st.op is not None
        active = [s for s in range(len(cur)) if errors[s] is None and first[s] <= st.start and st.stop <= end[s]]
        if not active:
            return
        whole = out is not None and len(active) == len(cur)
        dst: np.ndarray | list = out if whole else [None] * len(active)  # type: ignore[assignment]
        rngs = [rng_for(seed, epoch, keys[s], st.rng_position) if st.rng_position is not None else None
                for s in active]
        t0 = time.perf_counter()
        try:
            st.op.run_batch([cur[s] for s in active], rngs, dst)
        except SampleDecodeError:  # find the bad sample(s): a sample's bits do not depend on its batch
            for n, s in enumerate(active):
                one: list = [None]
                try:
                    st.op.run_batch([cur[s]], [rngs[n]], one)
                    dst[n] = one[0]
                except SampleDecodeError as exc:
                    errors[s] = exc
        if timings is not None:
            timings[st.name] = timings.get(st.name, 0.0) + time.perf_counter() - t0
        for n, s in enumerate(active):
            if errors[s] is not None:
                cur[s] = None
            elif out is not None:
                if not whole:
                    out[s][...] = dst[n]
                cur[s] = None
            else:
                cur[s] = dst[n]


def standard_train(size: int = 224, *, normalize: bool = True) -> Pipeline:
    """decode_jpeg + random_resized_crop(size) + flip + to_uint8_chw (+ normalize): the ImageNet training pipeline."""
    ops: list[dict | str] = ["decode_jpeg", {"op": "random_resized_crop", "size": size}, "flip", "to_uint8_chw"]
    if normalize:
        ops.append("normalize")
    return Pipeline(ops)
