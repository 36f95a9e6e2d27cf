"""Network layers as ops: a CNN run up to a named cut, on batches, on a node or on the host.

``{"op": "network", "arch": "resnet50", "cut": "pooled", "dtype": "float16"}``
takes the image pipeline's 3xHxW crops (``chw_u8``, normalized here with
ImageNet's mean and std exactly as the ``normalize`` op does, or ``chw_f32``
already normalized) and emits the activation at the cut: kind ``act``
(float32 or float16, shape C x H' x W' or C for ``pooled``) or ``act_q8``
(int8 with a per-sample scale, see ``nets.quant``; the host-side
``dequantize`` op turns it back into float32). ``declare`` states the shape,
bytes, MACs up to the cut, parameter bytes and resident bytes without loading
torch (``nets.archs``). The network is built on first use in the process that
runs it, with its engine: ``auto`` measures PyTorch and ONNX Runtime there and
keeps the faster. Outputs match across processes, batches and engines within
``nets.quant.TOLERANCE``, not bit for bit; a sample whose activation is NaN or
Inf fails as that sample's error.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from nearstore.core.errors import OpParamError, SampleDecodeError
from nearstore.nets import ARCHS, CUTS, DTYPES, ENGINES
from nearstore.nets.archs import STARTS, NetInfo, check_segment, describe, input_hw
from nearstore.nets.quant import decode_q8, encode, encoded_shape
from nearstore.ops.base import Op, OpParams, Spec, register
from nearstore.ops.image import Normalize

__all__ = ["Network", "Dequantize", "ACT_KINDS", "network_ops"]

log = logging.getLogger(__name__)

#: kinds a network op emits: float activations, and int8 ones with a per-sample scale
ACT_KINDS = ("act", "act_q8")


# Literal types: a bad value's error lists the allowed ones
Arch = Literal[tuple(ARCHS)]  # type: ignore[valid-type]
Cut = Literal[CUTS]  # type: ignore[valid-type]
Start = Literal[STARTS]  # type: ignore[valid-type]
Dtype = Literal[DTYPES]  # type: ignore[valid-type]
EngineName = Literal[("auto", *ENGINES)]  # type: ignore[valid-type]


class _NetParams(OpParams):
    arch: Arch = "resnet50"  # type: ignore[valid-type]
    cut: Cut = "pooled"  # type: ignore[valid-type]
    dtype: Dtype = "float32"  # type: ignore[valid-type]
    engine: EngineName = "auto"  # type: ignore[valid-type]
    weights: str | None = Field(None, description="a PyTorch state dict or ONNX file; None: seeded random init")
    seed: int = Field(0, ge=0)
    start: Start = Field("input", description="run from this cut's activations on (a segment); input: the image")  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _segment(self) -> "_NetParams":
        check_segment(self.arch, self.start, self.cut)
        return self


@register
class Network(Op):
    """A CNN (``arch``) up to ``cut``; output in ``dtype``; see the module doc."""

    name = "network"
    inputs = ("chw_u8", "chw_f32", "act")
    Params = _NetParams
    batched = True
    version = "1"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._lock = threading.Lock()
        self._engine: Any = None
        self._shape: tuple[int, ...] | None = None
        self._norm = Normalize()
        self.engine_times: dict[str, float] = {}

    @property
    def label(self) -> str:
        """``network`` for a network run from its input; a later segment is named by where it starts."""
        return self.name if self.params.start == "input" else f"{self.name}@{self.params.start}"

    def info(self, hw: tuple[int, int] = (224, 224)) -> NetInfo:
        """Shape and costs of this segment (``start`` .. ``cut``) for a ``hw`` input image."""
        return describe(self.params.arch, self.params.cut, hw, self.params.start)

    def declare(self, spec: Spec) -> Spec:
        p = self.params
        if p.start == "input":
            if spec.kind == "act" or not spec.fixed or spec.shape is None or len(spec.shape) != 3 \
                    or spec.shape[0] != 3:
                raise OpParamError(f"op {self.name} takes fixed-size 3xHxW crops (put a crop or resize before it); "
                                   f"the previous stage produces {spec.kind} of shape {spec.shape}")
            hw = (int(spec.shape[1]), int(spec.shape[2]))  # type: ignore[arg-type]
        else:
            if spec.kind != "act" or spec.shape is None or spec.dtype not in ("float32", "float16"):
                raise OpParamError(f"op {self.name} from {p.start!r} takes {p.arch}'s float {p.start} activations "
                                   f"(a network op with cut={p.start!r} before it); the previous stage produces "
                                   f"{spec.kind} {spec.dtype} of shape {spec.shape}")
            hw = input_hw(p.arch, p.start, spec.shape)
        info = self.info(hw)
        shape = encoded_shape(info.shape, self.params.dtype)
        item = np.dtype(self.params.dtype).itemsize
        return Spec("act_q8" if self.params.dtype == "int8" else "act", shape, self.params.dtype,
                    float(math.prod(shape) * item), None, where=("cpu", "accelerator"), macs=float(info.macs),
                    param_bytes=float(info.param_bytes), resident_bytes=float(info.resident_bytes))

    # -- running --------------------------------------------------------------------------
    @property
    def engine_name(self) -> str | None:
        """The engine this process runs (None before the first batch)."""
        return None if self._engine is None else self._engine.name

    def _ready(self, shape: tuple[int, ...]) -> Any:
        with self._lock:
            if self._engine is None or self._shape != shape:
                from nearstore.nets import runtime as eng  # torch and ONNX Runtime: only where a network runs
                from nearstore.nets import models

                p = self.params
                built: list = []

                def module() -> Any:  # built once, and only where an engine needs it (not for a cached export)
                    if not built:
                        built.append(models.build(p.arch, p.cut, weights=p.weights, seed=p.seed, start=p.start))
                    return built[0]

                span = p.cut if p.start == "input" else f"{p.start}-{p.cut}"
                key = f"{p.arch}-{span}-{'x'.join(map(str, shape))}-{models.weights_digest(p.weights, p.seed)}"
                if p.engine == "auto":
                    self._engine, self.engine_times = eng.pick_engine(module, key=key, shape=shape, batch=4)
                else:
                    self._engine = eng.make_engine(p.engine, module, key=key, shape=shape)
                self._shape = shape
            return self._engine

    def _batch(self, xs: list) -> np.ndarray:
        first = np.asarray(xs[0])
        if first.ndim != 3 or (self.params.start == "input" and first.shape[0] != 3):
            raise SampleDecodeError(f"op {self.name} takes C x H x W inputs (3 channels from the input), got shape "
                                    f"{first.shape}")
        batch = np.empty((len(xs), *first.shape), np.float32)
        for i, x in enumerate(xs):
            x = np.asarray(x)
            if x.shape != first.shape:
                raise SampleDecodeError(f"op {self.name}: sample {i} has shape {x.shape}, the batch {first.shape}")
            if x.dtype == np.uint8:
                self._norm.into(x, None, batch[i])  # the normalize op's exact arithmetic
            else:
                batch[i] = x
        return batch

    def run_batch(self, xs: list, rngs: list, out: np.ndarray | list) -> None:
        batch = self._batch(xs)
        engine = self._ready(tuple(batch.shape[1:]))
        y = engine.run(batch)
        p = self.params
        target = out if isinstance(out, np.ndarray) else np.empty(
            (len(xs), *encoded_shape(y.shape[1:], p.dtype)), p.dtype)
        bad = encode(y, p.dtype, target)
        if bad:
            raise SampleDecodeError(f"network {p.arch} up to {p.cut} ({engine.name}, {p.dtype}) produced NaN or "
                                    f"Inf for sample(s) {bad} of a batch of {len(xs)}")
        if not isinstance(out, np.ndarray):
            for i in range(len(xs)):
                out[i] = target[i]

    def __call__(self, x: Any, rng: np.random.Generator | None) -> np.ndarray:
        out: list = [None]
        self.run_batch([x], [rng], out)
        return out[0]

    def into(self, x: Any, rng: np.random.Generator | None, out: np.ndarray) -> None:
        self.run_batch([x], [rng], out[None])


class _DequantParams(OpParams):
    shape: list[int] = Field(min_length=1, description="the activation's shape (the network op's cut shape)")


@register
class Dequantize(Op):
    """int8 activations with a per-sample scale (``act_q8``) -> float32 of ``shape``."""

    name = "dequantize"
    inputs = ("act_q8",)
    Params = _DequantParams

    def declare(self, spec: Spec) -> Spec:
        shape = tuple(self.params.shape)
        if spec.shape is not None and spec.shape != encoded_shape(shape, "int8"):
            raise OpParamError(f"op {self.name}: shape {list(shape)} does not fit int8 rows of {spec.shape} "
                               f"(it must be the network cut's shape, {spec.shape[0] - 4} values)")
        return Spec("act", shape, "float32", float(math.prod(shape) * 4), None)

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        return decode_q8(np.asarray(x), tuple(self.params.shape))


def network_ops(arch: str, cut: str, *, dtype: str = "float32", engine: str = "auto", weights: str | None = None,
                seed: int = 0, hw: tuple[int, int] = (224, 224), segments: tuple[str, ...] = (),
                between: str = "float32") -> list[dict]:
    """The op list for a network cut (and, for int8, the host-side ``dequantize`` after it).

    ``segments``: cuts at which to break the network into consecutive ops (for example ``("layer2",)`` gives
    input..layer2 then layer2..``cut``), so a split may fall inside the network: the nodes run the first
    segments, the host the rest. Activations between segments travel in ``between`` (float32 or float16);
    ``dtype`` applies to the last segment's output. The segments compute what the uncut network computes.
    """
    bounds = ["input", *segments, cut]
    for a, b in zip(bounds, bounds[1:]):
        check_segment(arch, a, b)
    if between not in ("float32", "float16"):
        raise OpParamError(f"between must be float32 or float16 (activations a later segment reads), got {between!r}")
    ops = [{"op": "network", "arch": arch, "cut": b, "dtype": dtype if b == cut else between, "engine": engine,
            "weights": weights, "seed": seed, **({"start": a} if a != "input" else {})}
           for a, b in zip(bounds, bounds[1:])]
    if dtype == "int8":
        ops.append({"op": "dequantize", "shape": list(describe(arch, cut, hw).shape)})
    return ops
