"""Network architectures as plain data: layers, cuts, and what each cut costs (no torch needed).

A network is described layer by layer (convolutions and the final pooling) so
that ``describe(arch, cut, hw)`` gives, without building or running anything,
the activation shape at a cut, the multiply-accumulates up to it, the
parameter count and bytes, and the activation memory one sample holds while it
runs. Ops' ``declare`` uses it (node servers never load torch to validate a
ticket); tests check it against the real modules (``nets.models``) and the
papers' figures.

Cuts, the same names for every architecture: ``stem`` (ResNet: conv 7x7/2 +
max-pool, 1/4 resolution; MobileNetV2: the stride-2 stem conv and its first
inverted residual, 1/2 resolution), ``layer1``..``layer4`` (the end of each
resolution stage: 1/4, 1/8, 1/16, 1/32; MobileNetV2's layer4 ends with its
1x1 conv to 1280 channels), ``pooled`` (global average: a vector).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from nearstore.core.errors import OpParamError

__all__ = ["ARCHS", "CUTS", "STARTS", "Conv", "NetInfo", "describe", "layers", "check_arch_cut", "check_segment",
           "input_hw", "weights_digest"]

CUTS = ("stem", "layer1", "layer2", "layer3", "layer4", "pooled")
#: where a segment of a network may start: its input image, or any cut but ``pooled`` (a vector ends the net)
STARTS = ("input", *CUTS[:-1])

#: the architectures, each with its published reference (parameters and MACs at 224x224, classifier included)
ARCHS: dict[str, str] = {
    "resnet18": "He et al. 2016, Deep Residual Learning (ResNet-18: 11.69M parameters, 1.82 GMAC)",
    "resnet50": "He et al. 2016, Deep Residual Learning (ResNet-50 v1.5: 25.56M parameters, ~4.1 GMAC)",
    "mobilenet_v2": "Sandler et al. 2018, MobileNetV2 (3.5M parameters, 300M MAC)",
}

_RESNET = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
# MobileNetV2's inverted residual settings (expansion t, channels c, repeats n, first stride s) and the
# cut each group ends in
_MNV2 = ((1, 16, 1, 1, "stem"), (6, 24, 2, 2, "layer1"), (6, 32, 3, 2, "layer2"), (6, 64, 4, 2, "layer3"),
         (6, 96, 3, 1, "layer3"), (6, 160, 3, 2, "layer4"), (6, 320, 1, 1, "layer4"))


@dataclass(frozen=True)
class Conv:
    """One convolution (with its batch norm when ``bn``); ``hw_out`` is its output resolution."""

    cin: int
    cout: int
    k: int
    stride: int
    groups: int = 1
    bn: bool = True
    hw_in: tuple[int, int] = (0, 0)

    @property
    def hw_out(self) -> tuple[int, int]:
        pad = self.k // 2
        return tuple((d + 2 * pad - self.k) // self.stride + 1 for d in self.hw_in)  # type: ignore[return-value]

    @property
    def params(self) -> int:
        return self.k * self.k * self.cin // self.groups * self.cout + (2 * self.cout if self.bn else 0)

    @property
    def buffers(self) -> int:  # batch norm's running mean and variance
        return 2 * self.cout if self.bn else 0

    @property
    def macs(self) -> int:
        h, w = self.hw_out
        return self.k * self.k * self.cin // self.groups * self.cout * h * w


@dataclass(frozen=True)
class NetInfo:
    """What running ``arch`` from ``start`` up to ``cut`` on a ``hw`` input image costs per sample (fp32
    activations); ``in_shape`` is the segment's input (3 x hw for ``start="input"``)."""

    arch: str
    cut: str
    hw: tuple[int, int]
    shape: tuple[int, ...]
    macs: int
    params: int
    buffers: int
    resident_bytes: int
    convs: list[Conv] = field(repr=False, default_factory=list)
    start: str = "input"
    in_shape: tuple[int, ...] = ()

    @property
    def param_bytes(self) -> int:
        """fp32 parameters and batch-norm statistics: what a worker holds to run the cut."""
        return 4 * (self.params + self.buffers)


def check_arch_cut(arch: str, cut: str) -> None:
    if arch not in ARCHS:
        raise OpParamError(f"unknown network architecture {arch!r}; known: {', '.join(ARCHS)}")
    if cut not in CUTS:
        raise OpParamError(f"unknown cut {cut!r} for {arch}; cuts: {', '.join(CUTS)}")


def check_segment(arch: str, start: str, cut: str) -> None:
    """``start`` .. ``cut`` must name a non-empty piece of ``arch``, in order."""
    check_arch_cut(arch, cut)
    if start not in STARTS:
        raise OpParamError(f"unknown start {start!r} for {arch}; starts: {', '.join(STARTS)}")
    if start != "input" and CUTS.index(start) >= CUTS.index(cut):
        later = ", ".join(CUTS[CUTS.index(start) + 1:])
        raise OpParamError(f"a segment of {arch} from {start!r} must end at a later cut ({later}), not {cut!r}")


#: how much each cut shrinks the input image's side (ResNet: the stem pools to 1/4; MobileNetV2's stem is 1/2)
_STRIDE = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def input_hw(arch: str, start: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The input image size whose activation at ``start`` has ``shape`` (C, H, W): what a segment that starts
    there was cut from (its costs are stated per input image)."""
    check_segment(arch, start, "pooled")
    if start == "input":
        return int(shape[1]), int(shape[2])
    f = 2 if (arch == "mobilenet_v2" and start == "stem") else _STRIDE[start]
    hw = (int(shape[1]) * f, int(shape[2]) * f)
    want = layers(arch, hw)[1][start] if min(hw) >= 32 else None
    if want != tuple(int(d) for d in shape):
        raise OpParamError(f"a {arch} segment from {start!r} takes its {start} activations (C x H x W, e.g. "
                           f"{layers(arch, (224, 224))[1][start]} for a 224x224 image); got shape {tuple(shape)}")
    return hw


def _block(convs: list[tuple[str, Conv]], stage: str, c: Conv) -> Conv:
    convs.append((stage, c))
    return c


def layers(arch: str, hw: tuple[int, int]) -> tuple[list[tuple[str, Conv]], dict[str, tuple[int, int, int]]]:
    """Every convolution of ``arch`` on a ``hw`` input, tagged with the cut it belongs to, and the
    (channels, height, width) at the end of each cut but ``pooled``."""
    check_arch_cut(arch, "stem")
    out: list[tuple[str, Conv]] = []
    ends: dict[str, tuple[int, int, int]] = {}
    if arch in _RESNET:
        kind, depths = _RESNET[arch]
        stem = _block(out, "stem", Conv(3, 64, 7, 2, hw_in=hw))
        h, w = stem.hw_out
        h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1  # max-pool 3x3/2, padding 1
        ends["stem"] = (64, h, w)
        cin = 64
        for i, n in enumerate(depths):
            stage, width = f"layer{i + 1}", 64 << i
            cout = width * (4 if kind == "bottleneck" else 1)
            for b in range(n):
                stride = 2 if (b == 0 and i > 0) else 1
                if kind == "bottleneck":
                    a = _block(out, stage, Conv(cin, width, 1, 1, hw_in=(h, w)))
                    m = _block(out, stage, Conv(width, width, 3, stride, hw_in=a.hw_out))
                    last = _block(out, stage, Conv(width, cout, 1, 1, hw_in=m.hw_out))
                else:
                    a = _block(out, stage, Conv(cin, width, 3, stride, hw_in=(h, w)))
                    last = _block(out, stage, Conv(width, cout, 3, 1, hw_in=a.hw_out))
                if stride != 1 or cin != cout:
                    _block(out, stage, Conv(cin, cout, 1, stride, hw_in=(h, w)))
                cin, (h, w) = cout, last.hw_out
            ends[stage] = (cin, h, w)
    else:  # mobilenet_v2
        first = _block(out, "stem", Conv(3, 32, 3, 2, hw_in=hw))
        cin, (h, w) = 32, first.hw_out
        for t, c, n, s, stage in _MNV2:
            for b in range(n):
                stride = s if b == 0 else 1
                hidden = cin * t
                if t != 1:
                    _block(out, stage, Conv(cin, hidden, 1, 1, hw_in=(h, w)))
                dw = _block(out, stage, Conv(hidden, hidden, 3, stride, groups=hidden, hw_in=(h, w)))
                _block(out, stage, Conv(hidden, c, 1, 1, hw_in=dw.hw_out))
                cin, (h, w) = c, dw.hw_out
            ends[stage] = (cin, h, w)
        _block(out, "layer4", Conv(320, 1280, 1, 1, hw_in=(h, w)))
        ends["layer4"] = (1280, h, w)
    return out, ends


def describe(arch: str, cut: str, hw: tuple[int, int] = (224, 224), start: str = "input") -> NetInfo:
    """Shape, MACs, parameters and resident bytes of ``arch`` run from ``start`` up to ``cut`` on a ``hw``
    input image (``start="input"``: the whole network up to the cut)."""
    check_segment(arch, start, cut)
    if min(hw) < 32:
        raise OpParamError(f"network input must be at least 32x32 (got {hw[0]}x{hw[1]}): five stride-2 stages")
    convs, ends = layers(arch, hw)
    first = 0 if start == "input" else CUTS.index(start) + 1
    run = CUTS[first: CUTS.index(cut) + 1]
    used = [c for stage, c in convs if stage in run]
    if cut == "pooled":
        shape: tuple[int, ...] = (ends["layer4"][0],)
    else:
        shape = ends[cut]
    in_shape = (3, *hw) if start == "input" else ends[start]
    # activation memory one sample holds at once: the input, the widest conv's input and output, and a
    # residual branch's input kept alive beside them (an upper-bound estimate, fp32); a pooling-only
    # segment (layer4 -> pooled) holds its input and output
    widest = max((c.cin * c.hw_in[0] * c.hw_in[1] + c.cout * c.hw_out[0] * c.hw_out[1] for c in used), default=0)
    biggest_in = max((c.cin * c.hw_in[0] * c.hw_in[1] for c in used), default=0)
    resident = 4 * (math.prod(in_shape) + widest + biggest_in + math.prod(shape))
    return NetInfo(arch, cut, hw, shape, sum(c.macs for c in used), sum(c.params for c in used),
                   sum(c.buffers for c in used), resident, used, start, tuple(in_shape))


def weights_digest(weights: str | None, seed: int) -> str:
    """What identifies the weights: the file's sha256, or the seed."""
    if weights is None:
        return f"seed-{seed}"
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256-" + h.hexdigest()[:16]
