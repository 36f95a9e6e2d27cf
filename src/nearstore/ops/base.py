"""The stage contract: declared specs, validated parameters, a registry, batches and per-sample randomness.

This module is the one neutral contract that the loader, the node workers, the
planner and the designer share (it imports nothing of theirs).

An op is a registered class with a pydantic ``Params`` model. Before running,
``declare(spec_in) -> spec_out`` states the output kind, shape, dtype and mean
bytes per sample, where the op can run (``where``: "cpu", "accelerator") and
what it costs per sample (``macs``, ``param_bytes``, ``resident_bytes``), so
planners and the designer reason without executing it. Ops run on batches
(``run_batch``); the default loops over the samples (``into``/``__call__``),
and an op that really batches overrides it and sets ``batched = True``. A
sample's output never depends on how samples were grouped into batches.
Randomness comes only from ``rng_for(seed, epoch, key, position)``: a sample's
output depends on nothing but its input bytes and those four values, whichever
process (node or host) runs the op.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from nearstore.core.errors import OpParamError

__all__ = ["Spec", "Op", "OpParams", "register", "unregister", "registry", "make_op", "rng_for", "rng_reused",
           "KINDS", "PLACES", "NO_COST"]

#: kinds of data flowing between ops (ops from plugins may add their own)
KINDS = ("jpeg", "npy", "image", "chw_u8", "chw_f32")

#: where an op can run
PLACES = ("cpu", "accelerator")


@dataclass(frozen=True)
class Spec:
    """What a stage produces per sample.

    ``shape`` uses None for dimensions that vary per sample; ``hw`` is the mean
    (height, width) of variable-size images (from the manifest), used to
    estimate ``bytes`` (the mean bytes per sample).

    The cost fields describe the op that produced this spec (the same fields
    the designer's workload stages carry): ``where`` it can run (a subset of
    ``PLACES``), ``macs`` (multiply-accumulates per sample; 0 for ops whose
    cost is only measured, like decoding), ``param_bytes`` (its parameters,
    held once per worker) and ``resident_bytes`` (bytes held per sample while
    it runs: per batch, batch size x this).
    """

    kind: str
    shape: tuple[int | None, ...] | None
    dtype: str
    bytes: float
    hw: tuple[float, float] | None = None
    where: tuple[str, ...] = ("cpu",)
    macs: float = 0.0
    param_bytes: float = 0.0
    resident_bytes: float = 0.0

    def __post_init__(self) -> None:
        bad = [w for w in self.where if w not in PLACES]
        if bad or not self.where:
            raise OpParamError(f"Spec.where must be a non-empty subset of {PLACES}, got {self.where!r}")
        for name in ("macs", "param_bytes", "resident_bytes"):
            if getattr(self, name) < 0:
                raise OpParamError(f"Spec.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def fixed(self) -> bool:
        return self.shape is not None and all(d is not None for d in self.shape)

    def with_(self, **kw: Any) -> "Spec":
        return replace(self, **kw)

    def costless(self) -> "Spec":
        """This data spec with the cost of a cheap cpu op (for ops that pass their input through)."""
        return replace(self, **NO_COST)


#: the cost fields of an op that only moves or relabels data
NO_COST: dict[str, Any] = {"where": ("cpu",), "macs": 0.0, "param_bytes": 0.0, "resident_bytes": 0.0}


class OpParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_REGISTRY: dict[str, type["Op"]] = {}


def register(cls: type["Op"]) -> type["Op"]:
    if cls.name in _REGISTRY:
        raise ValueError(f"op {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove op ``name`` (used to undo a plugin module that failed half-way through importing)."""
    _REGISTRY.pop(name, None)


def registry() -> dict[str, type["Op"]]:
    """Registered ops by name (a copy)."""
    return dict(_REGISTRY)


class Op:
    """Base class. Subclasses set ``name``, ``inputs`` (accepted kinds), ``random`` and ``Params``;
    ``version`` (reported by a node's ``capabilities``) and ``batched`` (it overrides ``run_batch``);
    ``accepts_views`` (its per-sample path reads arrays of any strides) and ``as_view`` (for an op that only
    changes the layout: its output as a view)."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    random: ClassVar[bool] = False
    Params: ClassVar[type[OpParams]] = OpParams
    version: ClassVar[str] = "1"
    batched: ClassVar[bool] = False
    accepts_views: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
            )
            allowed = ", ".join(f"{k}: {v.annotation}" for k, v in self.Params.model_fields.items())
            raise OpParamError(f"op {self.name}: {problems} (parameters: {allowed or 'none'})") from None

    @property
    def label(self) -> str:
        """The stage name this op gives a pipeline (unique within it: timings and profiles are keyed by it)."""
        return self.name

    def check_input(self, spec: Spec, position: int) -> None:
        if spec.kind not in self.inputs:
            raise OpParamError(
                f"op {self.name} at position {position} takes {' or '.join(self.inputs)}, "
                f"but the previous stage produces {spec.kind}"
            )

    def declare(self, spec: Spec) -> Spec:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: Any, rng: np.random.Generator | None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def into(self, x: Any, rng: np.random.Generator | None, out: np.ndarray) -> None:
        """Run and write the result into ``out`` (a batch slot); ops override it to skip a copy."""
        out[...] = self(x, rng)

    #: an op that only relabels the layout may define ``as_view(x, rng)``: its output with the same values as a
    #: view of ``x``. A pipeline hands that view (no copy) to a following op with ``accepts_views`` in the same run;
    #: wherever the output leaves the run (a split, the batch), the op runs as usual.
    as_view: ClassVar[Any] = None

    def run_batch(self, xs: list, rngs: list[np.random.Generator | None], out: np.ndarray | list) -> None:
        """Run on a batch: ``xs[i]`` with ``rngs[i]`` -> ``out[i]`` (a slot of an array of the declared
        output shape, or a list entry to set).

        The default loops over the samples (``into``/``__call__``); ops that
        batch override it and set ``batched = True``. Either way, sample i's
        output must not depend on the other samples of the batch (tested per op).
        A ``SampleDecodeError`` fails the whole call; the caller then runs the
        samples one at a time to find the bad one.
        """
        if isinstance(out, np.ndarray):
            for i, (x, rng) in enumerate(zip(xs, rngs)):
                self.into(x, rng, out[i])
        else:
            for i, (x, rng) in enumerate(zip(xs, rngs)):
                out[i] = self(x, rng)

    def to_json(self) -> dict:
        return {"op": self.name, **self.params.model_dump(mode="json")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{self.name}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.name)


def make_op(spec: dict | str | Op) -> Op:
    """Build an op from ``{"op": name, **params}``, a bare name, or return an Op as is."""
    if isinstance(spec, Op):
        return spec
    if isinstance(spec, str):
        spec = {"op": spec}
    if not isinstance(spec, dict) or "op" not in spec:
        raise OpParamError(f"an op is given as {{'op': NAME, ...params}}; got {spec!r}")
    params = dict(spec)
    name = params.pop("op")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise OpParamError(f"unknown op {name!r}; registered ops: {', '.join(sorted(_REGISTRY))}")
    return cls(**params)


def _philox_key(seed: int, epoch: int, key: str, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{key}\x00{position}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


def rng_for(seed: int, epoch: int, key: str, position: int) -> np.random.Generator:
    """The generator of op ``position`` for sample ``key``: a pure function of its arguments."""
    return np.random.Generator(np.random.Philox(key=_philox_key(seed, epoch, key, position)))


_THREAD = threading.local()
_ZEROS = np.zeros(4, np.uint64)


def rng_reused(seed: int, epoch: int, key: str, position: int) -> np.random.Generator:
    """``rng_for``'s stream from this thread's one generator, reseeded in place (~4x cheaper than a new one).

    It is valid until this thread's next call: for use inside one op, never kept.
    """
    g = getattr(_THREAD, "rng", None)
    if g is None:
        g = _THREAD.rng = np.random.Generator(np.random.Philox(key=0))
    k = _philox_key(seed, epoch, key, position)
    g.bit_generator.state = {
        "bit_generator": "Philox",
        "state": {"counter": _ZEROS, "key": np.array([k & 0xFFFFFFFFFFFFFFFF, k >> 64], np.uint64)},
        "buffer": _ZEROS, "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
    }
    return g
