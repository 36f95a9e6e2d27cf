"""The image op library: decode, crops, resize, flip, layout and normalization.

Geometry ops (random_resized_crop, center_crop, resize) compute a source box
and a target size from the source (height, width), then share one kernel:
crop + antialiased bilinear resize (torch's uint8 kernel). Directly after
decode_jpeg they fuse with it (see ``pipeline``): the box is decoded with
libjpeg-turbo's region decoding at the smallest DCT scale M/8 that still
covers the target size, which is where the speed is. Without scaling (M=8) the
fused path is bit-identical to decode-then-crop.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Annotated

import numpy as np
from pydantic import Field, field_validator

from nearstore.core.errors import SampleDecodeError
from nearstore.ops import _image
from nearstore.ops.base import Op, OpParams, Spec, register
from nearstore.ops.jpeg import JpegError, decode_region, header, scaled_size


__all__ = [
    "DecodeJpeg",
    "DecodeNpy",
    "GeometryOp",
    "RandomResizedCrop",
    "CenterCrop",
    "Resize",
    "Flip",
    "ToUint8CHW",
    "Normalize",
    "resize_hwc",
    "decode_geometry",
    "worker_init",
    "npy_shape",
]

Size = Annotated[int, Field(ge=1, le=8192)]


def worker_init() -> None:
    """Call once in each worker thread: one intra-op thread for torch kernels in this thread.

    N workers already keep N cores busy; letting each also fan out to torch's
    OpenMP pool oversubscribes the cores (measured ~15% slower on 2 cores).
    The setting is per thread (OpenMP's nthreads-var), so the caller's own
    threads, e.g. a training loop, keep theirs.
    """
    import torch  # here and below on first use: a process that only validates pipelines never loads torch

    torch.set_num_threads(1)


def resize_hwc(arr: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Antialiased bilinear resize of an HxWx3 uint8 array (torch's vectorized uint8 kernel); contiguous HxWx3.

    The input is handed over as a channels-last NCHW tensor with an unambiguous
    batch stride, so the kernel also writes channels-last and skips its
    pack-to-planar pass (a third faster, the same bits).
    """
    if arr.shape[0] == out_h and arr.shape[1] == out_w:
        return arr
    import torch

    src = np.ascontiguousarray(arr).reshape(1, *arr.shape).transpose(0, 3, 1, 2)
    # the kernel F.interpolate(mode="bilinear", antialias=True, align_corners=False) calls, without its
    # Python-level checks (held under the GIL, which the other worker threads then wait for)
    out = torch._C._nn._upsample_bilinear2d_aa(torch.from_numpy(src), [out_h, out_w], False)
    return out.numpy().transpose(0, 2, 3, 1)[0]


@register
class DecodeJpeg(Op):
    """JPEG bytes -> HxWx3 uint8 RGB."""

    name = "decode_jpeg"
    inputs = ("jpeg",)

    def declare(self, spec: Spec) -> Spec:
        h, w = spec.hw or (0.0, 0.0)
        return Spec("image", (None, None, 3), "uint8", h * w * 3, spec.hw)

    def __call__(self, x: bytes, rng: np.random.Generator | None) -> np.ndarray:
        w, h = _header(x)
        return _decode(x, 8, 0, 0, w, h, (w, h))


class _NpyParams(OpParams):
    shape: list[Size] | None = None


@register
class DecodeNpy(Op):
    """.npy bytes of an HxWxC uint8 array -> that array (a zero-copy view)."""

    name = "decode_npy"
    inputs = ("npy",)
    Params = _NpyParams

    def declare(self, spec: Spec) -> Spec:
        if self.params.shape:
            shape = tuple(self.params.shape)
            return Spec("image", shape, "uint8", float(math.prod(shape)), (float(shape[0]), float(shape[1])))
        h, w = spec.hw or (0.0, 0.0)
        return Spec("image", (None, None, 3), "uint8", h * w * 3, spec.hw)

    def __call__(self, x: bytes, rng: np.random.Generator | None) -> np.ndarray:
        shape, offset = _npy_header(x)
        if self.params.shape and list(shape) != self.params.shape:
            raise SampleDecodeError(f".npy payload has shape {shape}, pipeline declared {self.params.shape}")
        return np.frombuffer(x, np.uint8, count=math.prod(shape), offset=offset).reshape(shape)


def _npy_header(x: bytes) -> tuple[tuple[int, ...], int]:
    # samples of a dataset share one header: parse each distinct header once
    if len(x) >= 10 and x[6] == 1:
        (shape, offset) = _npy_header_cached(bytes(x[: 10 + int.from_bytes(x[8:10], "little")]))
    else:
        shape, offset = _npy_header_parse(bytes(x[:4096]))
    if len(x) < offset + math.prod(shape):
        raise SampleDecodeError(f".npy payload is truncated ({len(x)} bytes for shape {shape})")
    return shape, offset


@functools.lru_cache(maxsize=256)
def _npy_header_cached(head: bytes) -> tuple[tuple[int, ...], int]:
    return _npy_header_parse(head)


def _npy_header_parse(head: bytes) -> tuple[tuple[int, ...], int]:
    try:
        f = io.BytesIO(head)
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except (ValueError, EOFError) as exc:
        raise SampleDecodeError(f"not a .npy payload: {exc}") from exc
    if dtype != np.uint8 or fortran or len(shape) != 3:
        raise SampleDecodeError(f".npy payload is {dtype} {shape}; decode_npy takes C-order HxWxC uint8")
    return tuple(shape), f.tell()


def npy_shape(x: bytes) -> tuple[int, ...]:
    """Shape of an HxWxC uint8 .npy payload (validates the header)."""
    return _npy_header(x)[0]


def _header(data: bytes) -> tuple[int, int]:
    try:
        return header(data)
    except JpegError as exc:
        raise SampleDecodeError(str(exc)) from exc


class GeometryOp(Op):
    """An op defined by a source box and a target size; fuses with decode_jpeg."""

    inputs = ("image",)

    def box(self, h: int, w: int, rng: np.random.Generator | None) -> tuple[int, int, int, int, int, int]:
        """(x, y, box_w, box_h, out_h, out_w) for a source of h x w."""
        raise NotImplementedError

    def out_hw(self, hw: tuple[float, float] | None) -> tuple[int | None, int | None]:
        raise NotImplementedError

    def declare(self, spec: Spec) -> Spec:
        oh, ow = self.out_hw(spec.hw)
        if oh is None or ow is None:
            h, w = spec.hw or (0.0, 0.0)
            est = self._estimate(h, w)
            return Spec("image", (None, None, 3), "uint8", est[0] * est[1] * 3, est)
        return Spec("image", (oh, ow, 3), "uint8", float(oh * ow * 3), (float(oh), float(ow)))

    def _estimate(self, h: float, w: float) -> tuple[float, float]:
        return h, w

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        h, w = x.shape[:2]
        bx, by, bw, bh, oh, ow = self.box(h, w, rng)
        return resize_hwc(x[by : by + bh, bx : bx + bw], oh, ow)


#: DCT scales (M/8) with SIMD IDCTs in libjpeg-turbo; the others are slower than full size
_SIMD_SCALES = (1, 2, 4)


def decode_geometry(data: bytes, op: GeometryOp, rng: np.random.Generator | None) -> np.ndarray:
    """decode_jpeg fused with a geometry op: region decode at the smallest sufficient DCT scale."""
    w, h = _header(data)
    bx, by, bw, bh, oh, ow = op.box(h, w, rng)
    m = 8
    for cand in _SIMD_SCALES:
        if (bw * cand) // 8 >= ow and (bh * cand) // 8 >= oh:
            m = cand
            break
    if m == 8:
        region = _decode(data, 8, bx, by, bw, bh, (w, h))
    else:
        sw, sh = scaled_size(w, h, m)
        x0, y0 = (bx * m) // 8, (by * m) // 8
        x1, y1 = min(sw, -(-(bx + bw) * m // 8)), min(sh, -(-(by + bh) * m // 8))
        region = _decode(data, m, x0, y0, x1 - x0, y1 - y0, (sw, sh))
    return resize_hwc(region, oh, ow)


def _decode(data: bytes, m: int, x: int, y: int, w: int, h: int, full: tuple[int, int]) -> np.ndarray:
    try:
        return decode_region(data, m, x, y, w, h, full=full)
    except JpegError as exc:
        raise SampleDecodeError(str(exc)) from exc


class _RRCParams(OpParams):
    size: Size = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be (low, high) with 0 < low <= high, got {v}")
        return v


@register
class RandomResizedCrop(GeometryOp):
    """torchvision's RandomResizedCrop: random area and aspect box, resized to size x size."""

    name = "random_resized_crop"
    random = True
    Params = _RRCParams

    def out_hw(self, hw: tuple[float, float] | None) -> tuple[int, int]:
        return self.params.size, self.params.size

    def box(self, h: int, w: int, rng: np.random.Generator | None) -> tuple[int, int, int, int, int, int]:
        assert rng is not None
        s, p = self.params.size, self.params
        area = h * w
        log_lo, log_hi = math.log(p.ratio[0]), math.log(p.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(p.scale[0], p.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            bw = int(round(math.sqrt(target * aspect)))
            bh = int(round(math.sqrt(target / aspect)))
            if 0 < bw <= w and 0 < bh <= h:
                y = int(rng.integers(0, h - bh + 1))
                x = int(rng.integers(0, w - bw + 1))
                return x, y, bw, bh, s, s
        in_ratio = w / h
        if in_ratio < p.ratio[0]:
            bw, bh = w, int(round(w / p.ratio[0]))
        elif in_ratio > p.ratio[1]:
            bh, bw = h, int(round(h * p.ratio[1]))
        else:
            bw, bh = w, h
        return (w - bw) // 2, (h - bh) // 2, bw, bh, s, s


class _SizeParams(OpParams):
    size: Size


@register
class CenterCrop(GeometryOp):
    """Center size x size crop (no resize); sources smaller than size are an error."""

    name = "center_crop"
    Params = _SizeParams

    def out_hw(self, hw: tuple[float, float] | None) -> tuple[int, int]:
        return self.params.size, self.params.size

    def box(self, h: int, w: int, rng: np.random.Generator | None) -> tuple[int, int, int, int, int, int]:
        s = self.params.size
        if h < s or w < s:
            raise SampleDecodeError(f"center_crop(size={s}) needs an image of at least {s}x{s}, got {w}x{h}")
        return (w - s) // 2, (h - s) // 2, s, s, s, s


@register
class Resize(GeometryOp):
    """Resize so the shorter side is ``size`` (aspect kept)."""

    name = "resize"
    Params = _SizeParams

    def out_hw(self, hw: tuple[float, float] | None) -> tuple[None, None]:
        return None, None

    def _estimate(self, h: float, w: float) -> tuple[float, float]:
        s = self.params.size
        if not h or not w:
            return float(s), float(s)
        return (s, s * w / h) if h <= w else (s * h / w, s)

    def box(self, h: int, w: int, rng: np.random.Generator | None) -> tuple[int, int, int, int, int, int]:
        s = self.params.size
        oh, ow = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        return 0, 0, w, h, oh, ow


class _FlipParams(OpParams):
    p: float = Field(0.5, ge=0.0, le=1.0)


@register
class Flip(Op):
    """Horizontal flip with probability p."""

    name = "flip"
    inputs = ("image",)
    random = True
    Params = _FlipParams

    def declare(self, spec: Spec) -> Spec:
        return spec.costless()

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        assert rng is not None
        return x[:, ::-1] if rng.random() < self.params.p else x


@register
class ToUint8CHW(Op):
    """HxWx3 uint8 -> 3xHxW uint8 (contiguous)."""

    name = "to_uint8_chw"
    inputs = ("image",)

    def declare(self, spec: Spec) -> Spec:
        shape = None if spec.shape is None else (spec.shape[2], spec.shape[0], spec.shape[1])
        return Spec("chw_u8", shape, "uint8", spec.bytes, spec.hw)

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def as_view(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        return x.transpose(2, 0, 1)


class _NormParams(OpParams):
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"every std must be > 0, got {v}")
        return v


@register
class Normalize(Op):
    """uint8 CHW -> float32 CHW: (x / 255 - mean) / std per channel."""

    name = "normalize"
    inputs = ("chw_u8",)
    Params = _NormParams
    accepts_views = True

    def declare(self, spec: Spec) -> Spec:
        return Spec("chw_f32", spec.shape, "float32", spec.bytes * 4, spec.hw)

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        std = np.asarray(self.params.std, np.float32)
        scale = (1.0 / (255.0 * std)).reshape(3, 1)
        shift = (np.asarray(self.params.mean, np.float32) / std).reshape(3, 1)
        # every uint8 value's result per channel, by the float32 multiply then subtract the output is defined by
        self._lut = np.ascontiguousarray(np.arange(256, dtype=np.float32)[None, :] * scale - shift, np.float32)

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        out = np.empty(x.shape, np.float32)
        self.into(x, rng, out)
        return out

    def into(self, x: np.ndarray, rng: np.random.Generator | None, out: np.ndarray) -> None:
        # one table look-up pass from any strides (a flipped view; read-only received buffers too) into the
        # slot: a cast and two arithmetic passes over 600 KB of float32 cost ~3x as much, for the same bits
        if out.dtype == np.float32 and out.flags.c_contiguous:
            _image.lut_planes(x, self._lut, out)
        else:
            tmp = np.empty(x.shape, np.float32)
            _image.lut_planes(x, self._lut, tmp)
            out[...] = tmp
