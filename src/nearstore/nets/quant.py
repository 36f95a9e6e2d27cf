"""How an activation leaves a network op: float32, float16, or int8 with a per-sample scale.

int8 rows are ``4 + n`` int8 values: the first four bytes hold the sample's
float32 scale (little-endian), the rest ``round(x / scale)`` with
``scale = max|x| / 127`` (symmetric, so any sign works). ``decode_q8``
restores float32. A sample whose activation has a NaN or an Inf (or overflows
float16) is reported, never encoded.
"""

from __future__ import annotations

import math

import numpy as np

from nearstore.core.errors import OpParamError

__all__ = ["DTYPES", "TOLERANCE", "Q8_ROWS_VERSION", "QUANT_VERSION", "recipe", "encoded_shape", "encode",
           "decode_q8", "max_rel_error"]

DTYPES = ("float32", "float16", "int8")
_Q8_HEADER = 4

#: versions of the int8 recipes; bump one whenever what it produces changes. A derived dataset's fingerprint
#: records the ones its outputs depend on (``recipe``), so stored features made by an older recipe are refused.
Q8_ROWS_VERSION = "1"  # int8 output rows: a float32 scale max|x|/127, then rint(x / scale) clipped to +-127
QUANT_VERSION = "2"  # the onnxruntime-int8 engine's model: static QDQ, per-channel, reduce_range (nets.runtime)


def recipe(engine: str, dtype: str) -> str:
    """The int8 recipes that outputs of ``engine`` in ``dtype`` depend on ("none" for float engines and
    outputs)."""
    parts = []
    if engine == "onnxruntime-int8":
        parts.append(f"static-qdq-v{QUANT_VERSION}")
    if dtype == "int8":
        parts.append(f"q8-rows-v{Q8_ROWS_VERSION}")
    return "+".join(parts) or "none"

#: how far an output may be from the same op's output elsewhere (another process, batch or engine), as the
#: largest absolute difference over the sample's largest magnitude, per (engine, output dtype). fp32: kernels
#: sum in different orders (measured <= 5e-5 across engines, batches and thread counts); fp16 adds its
#: rounding (2^-11 relative); int8 output adds one quantization step (1/127). The int8 engine computes with
#: quantized weights and activations, a different function from float (ResNet-50 pooled, seeded weights: 10%
#: max error against float32); against itself it gave the same bits across batches and thread counts.
TOLERANCE: dict[tuple[str, str], float] = {
    ("pytorch", "float32"): 2e-4, ("pytorch", "float16"): 1.5e-3, ("pytorch", "int8"): 1.2e-2,
    ("onnxruntime", "float32"): 2e-4, ("onnxruntime", "float16"): 1.5e-3, ("onnxruntime", "int8"): 1.2e-2,
    ("onnxruntime-int8", "float32"): 2e-4, ("onnxruntime-int8", "float16"): 1.5e-3,
    ("onnxruntime-int8", "int8"): 1.2e-2,
}


def encoded_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    """The per-sample array shape on the wire for an activation of ``shape``."""
    if dtype not in DTYPES:
        raise OpParamError(f"unknown output dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    return (_Q8_HEADER + math.prod(shape),) if dtype == "int8" else tuple(shape)


def encode(y: np.ndarray, dtype: str, out: np.ndarray) -> list[int]:
    """Write float32 activations ``y`` (N, ...) into ``out`` (N, *encoded_shape) in ``dtype``.

    Returns the indices of samples that are not finite (their rows are left unspecified).
    """
    n = y.shape[0]
    flat = y.reshape(n, -1)
    finite = np.isfinite(flat).all(axis=1)
    if dtype == "float32":
        out[...] = y
    elif dtype == "float16":
        with np.errstate(over="ignore"):
            out[...] = y
        finite &= np.isfinite(out.reshape(n, -1)).all(axis=1)  # beyond float16's range is an Inf, not a value
    else:
        peak = np.where(finite, np.abs(np.where(np.isfinite(flat), flat, 0)).max(axis=1), 0).astype(np.float32)
        scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
        for i in range(n):
            out[i, :_Q8_HEADER] = scale[i : i + 1].view(np.int8)
            if finite[i]:
                q = np.rint(flat[i] / scale[i])
                np.clip(q, -127, 127, out=q)
                out[i, _Q8_HEADER:] = q
    return [int(i) for i in np.flatnonzero(~finite)]


def decode_q8(q: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """int8 rows (N, 4 + n) or one row (4 + n,) -> float32 (N, *shape) or ``shape``."""
    one = q.ndim == 1
    rows = q.reshape(1, -1) if one else q
    if rows.shape[1] != _Q8_HEADER + math.prod(shape):
        raise OpParamError(f"int8 activations of {rows.shape[1] - _Q8_HEADER} values cannot have shape {shape}")
    scale = np.ascontiguousarray(rows[:, :_Q8_HEADER]).view(np.float32)  # (N, 1)
    out = rows[:, _Q8_HEADER:].astype(np.float32) * scale
    out = out.reshape(len(rows), *shape)
    return out[0] if one else out


def max_rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref| over one sample (the measure ``TOLERANCE`` bounds)."""
    a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
    peak = float(np.abs(ref).max()) or 1.0
    return float(np.abs(a - ref).max()) / peak
