"""Pipelines: an ordered list of ops, grouped into stages, runnable in pieces.

A pipeline runs ops[0:k] on a storage node and ops[k:] on the host. Ops are
grouped into stages: decode_jpeg directly followed by a geometry op
(random_resized_crop, center_crop, resize) forms one fused stage (region +
DCT-scaled decoding). A split may fall only between stages, so a sample's
output is bit-identical for every valid split. ``declare`` gives the spec after
every op boundary without running anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from nearstore.core.errors import ConfigError, OpParamError
from nearstore.ops.base import Op, Spec, make_op, rng_reused
from nearstore.ops.image import DecodeJpeg, GeometryOp, decode_geometry

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
        self.ops: list[Op] = [make_op(o) for o in ops]
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
                stages.append(Stage(i, i + 1, op.name, op, i if op.random else None, op.into))
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
        """Run ops[start:stop] on one sample (both must be valid splits).

        With ``out`` (a batch slot of the declared output shape) the result is
        written there and None is returned.
        """
        stop = len(self.ops) if stop is None else stop
        todo = [st for st in self.stages if st.start >= start and st.stop <= stop]
        if out is not None and not todo:
            out[...] = x
            return None
        last = len(todo) - 1
        for n, st in enumerate(todo):
            rng = rng_reused(seed, epoch, key, st.rng_position) if st.rng_position is not None else None
            t0 = time.perf_counter()
            if out is not None and n == last:
                st.run_into(x, rng, out)
                x = None
            else:
                x = st.fn(x, rng)
            if timings is not None:
                timings[st.name] = timings.get(st.name, 0.0) + time.perf_counter() - t0
        return x


def standard_train(size: int = 224, *, normalize: bool = True) -> Pipeline:
    """decode_jpeg + random_resized_crop(size) + flip + to_uint8_chw (+ normalize): the ImageNet training pipeline."""
    ops: list[dict | str] = ["decode_jpeg", {"op": "random_resized_crop", "size": size}, "flip", "to_uint8_chw"]
    if normalize:
        ops.append("normalize")
    return Pipeline(ops)
