"""Op contract: declared specs, validated parameters, a registry, and per-sample randomness.

An op is a registered class with a pydantic ``Params`` model. Before running,
``declare(spec_in) -> spec_out`` states the output kind, shape, dtype and mean
bytes per sample, so planners and the designer reason without executing it.
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

__all__ = ["Spec", "Op", "OpParams", "register", "registry", "make_op", "rng_for", "rng_reused", "KINDS"]

#: kinds of data flowing between ops
KINDS = ("jpeg", "npy", "image", "chw_u8", "chw_f32")


@dataclass(frozen=True)
class Spec:
    """What a stage produces per sample.

    ``shape`` uses None for dimensions that vary per sample; ``hw`` is the mean
    (height, width) of variable-size images (from the manifest), used to
    estimate ``bytes`` (the mean bytes per sample).
    """

    kind: str
    shape: tuple[int | None, ...] | None
    dtype: str
    bytes: float
    hw: tuple[float, float] | None = None

    @property
    def fixed(self) -> bool:
        return self.shape is not None and all(d is not None for d in self.shape)

    def with_(self, **kw: Any) -> "Spec":
        return replace(self, **kw)


class OpParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_REGISTRY: dict[str, type["Op"]] = {}


def register(cls: type["Op"]) -> type["Op"]:
    if cls.name in _REGISTRY:
        raise ValueError(f"op {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type["Op"]]:
    """Registered ops by name (a copy)."""
    return dict(_REGISTRY)


class Op:
    """Base class. Subclasses set ``name``, ``inputs`` (accepted kinds), ``random`` and ``Params``."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    random: ClassVar[bool] = False
    Params: ClassVar[type[OpParams]] = OpParams

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
            )
            allowed = ", ".join(f"{k}: {v.annotation}" for k, v in self.Params.model_fields.items())
            raise OpParamError(f"op {self.name}: {problems} (parameters: {allowed or 'none'})") from None

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
