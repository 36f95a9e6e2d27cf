"""The networks as PyTorch modules, from Hugging Face transformers' pure-PyTorch definitions, cut at a named point.

``build(arch, cut, weights=None, seed=0)`` returns an eval-mode module that
maps a float32 (N, 3, H, W) ImageNet-normalized batch to the activation at the
cut. Why transformers: timm, the usual source, imports torchvision at import
time (``timm/layers/create_norm.py``), and torchvision's registry build does not
import against the CPU torch here; transformers' ``ResNetModel`` and
``MobileNetV2Model`` are plain PyTorch (Apache-2.0) and match the published
networks exactly (tests check parameters and MACs against ``nets.archs``).

Weights: a seeded initialization (torchvision's scheme: Kaiming-normal
convolutions, unit batch norms) whose batch-norm statistics are then set from
one forward pass over seeded noise, so every cut's activations have a sane
scale (a random MobileNetV2 in eval mode otherwise fades to 1e-21); or a
user's file: a PyTorch state dict (``.pt``/``.pth``/``.bin``, transformers' key
names, with or without the ``resnet.``/``mobilenet_v2.`` prefix of the
classification checkpoints; classifier keys ignored) or an ONNX model whose
initializers carry those names (``nets.export_onnx`` writes such files). A
file that does not match names the first key or shape that differs. Nothing
is ever downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.models.mobilenet_v2.configuration_mobilenet_v2 import MobileNetV2Config
from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import MobileNetV2Model
from transformers.models.resnet.configuration_resnet import ResNetConfig
from transformers.models.resnet.modeling_resnet import ResNetModel

from nearstore.core.errors import OpParamError
from nearstore.nets.archs import CUTS, check_arch_cut, check_segment, weights_digest  # noqa: F401  (re-exported)

__all__ = ["build", "backbone", "load_state", "state_of", "export_onnx", "weights_digest", "WeightsError", "CALIBRATION_SAMPLES", "CALIBRATION_HW"]

log = logging.getLogger(__name__)

#: seeded-noise samples (and their size) whose batch statistics become a random network's batch-norm statistics:
#: fixed, so a seed gives the same weights for every cut and input size
CALIBRATION_SAMPLES = 8
CALIBRATION_HW = (112, 112)
_PREFIXES = ("resnet.", "mobilenet_v2.", "model.", "backbone.")


class WeightsError(OpParamError):
    """A weights file that cannot be read or does not match the architecture."""


def backbone(arch: str) -> nn.Module:
    """The whole (uncut) backbone of ``arch``, freshly initialized by transformers."""
    check_arch_cut(arch, "stem")
    if arch == "resnet18":
        return ResNetModel(ResNetConfig(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512]))
    if arch == "resnet50":
        return ResNetModel(ResNetConfig(depths=[3, 4, 6, 3], layer_type="bottleneck",
                                        hidden_sizes=[256, 512, 1024, 2048]))
    # torchvision's padding (symmetric), not TensorFlow's "same"
    return MobileNetV2Model(MobileNetV2Config(tf_padding=False))


class Cut(nn.Module):
    """Parts of a backbone run in order up to a cut; ``pooled`` ends with global average pooling."""

    def __init__(self, parts: list[tuple[str, nn.Module]], pooled: bool) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.pooled = pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts.values():
            x = part(x)
        if self.pooled:
            x = x.mean(dim=(2, 3))
        return x


def _parts(arch: str, net: nn.Module, cut: str, start: str = "input") -> list[tuple[str, nn.Module]]:
    """(state-dict prefix, module) of each piece after ``start`` up to ``cut``."""
    upto = CUTS.index(cut if cut != "pooled" else "layer4")
    first = 0 if start == "input" else CUTS.index(start) + 1
    if arch.startswith("resnet"):
        pieces = [("embedder", net.embedder)] + [(f"encoder.stages.{i}", s) for i, s in enumerate(net.encoder.stages)]
        return pieces[first: upto + 1]
    # MobileNetV2: layer i of transformers' 16 inverted residuals; the stem holds the first (expansion 1)
    groups = {"stem": [("conv_stem", net.conv_stem)],
              "layer1": [(f"layer.{i}", net.layer[i]) for i in range(0, 2)],
              "layer2": [(f"layer.{i}", net.layer[i]) for i in range(2, 5)],
              "layer3": [(f"layer.{i}", net.layer[i]) for i in range(5, 12)],
              "layer4": [(f"layer.{i}", net.layer[i]) for i in range(12, 16)] + [("conv_1x1", net.conv_1x1)]}
    return [p for c in CUTS[first: upto + 1] for p in groups[c]]


def _names_up_to(arch: str, cut: str) -> list[str]:
    """The state-dict prefixes of the pieces up to ``cut`` (what a segment starting at ``cut`` leaves out)."""
    with torch.device("meta"):
        net = backbone(arch)
    return [p for p, _ in _parts(arch, net, cut)]


def _init(module: nn.Module, seed: int) -> None:
    """torchvision's initialization, from ``seed`` (independent of the global generator)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_out) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _calibrate(module: nn.Module, seed: int) -> None:
    """Set every batch norm's statistics to those of seeded noise (ImageNet-normalized scale)."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((CALIBRATION_SAMPLES, 3, *CALIBRATION_HW), generator=gen)
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: one pass sets the statistics exactly
    module.train()
    with torch.no_grad():
        module(x)
    module.eval()


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a PyTorch file or an ONNX model's initializers."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        try:
            model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - onnx raises several kinds for a bad file
            raise WeightsError(f"weights file {path} is not a readable ONNX model: {exc}") from None
        return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle and zip errors alike
        raise WeightsError(f"weights file {path} is not a readable PyTorch state dict: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_state(module: Cut, state: dict[str, Any], *, origin: str) -> None:
    """Copy ``state`` into ``module`` (keys under a known prefix too); the first missing key or shape
    mismatch is an error. Keys past the cut (and a classifier's) are ignored."""
    plain = {}
    for k, v in state.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        plain[k] = v
    want = module.state_dict()
    for key, ref in want.items():
        if key.endswith("num_batches_tracked"):  # a training counter, unused in eval mode
            ref.zero_()
            continue
        src_key = key.removeprefix("parts.")
        prefix, _, rest = src_key.partition(".")
        src_key = _unmangle(prefix) + "." + rest
        if src_key not in plain:
            near = ", ".join(sorted(plain)[:3])
            raise WeightsError(f"weights {origin} lack {src_key!r} (shape {tuple(ref.shape)}), the first key that "
                               f"differs from the architecture's; the file's keys start {near}")
        got = plain[src_key]
        if tuple(got.shape) != tuple(ref.shape):
            raise WeightsError(f"weights {origin}: {src_key!r} has shape {tuple(got.shape)}, the architecture "
                               f"needs {tuple(ref.shape)} (the first shape that differs)")
        with torch.no_grad():
            ref.copy_(got.to(ref.dtype))


def _mangle(prefix: str) -> str:
    return prefix.replace(".", "__")  # ModuleDict keys cannot contain dots


def _unmangle(key: str) -> str:
    return key.replace("__", ".")


def state_of(module: Cut) -> dict[str, torch.Tensor]:
    """``module``'s weights under transformers' key names (what ``build(weights=...)`` reads back)."""
    out = {}
    for key, value in module.state_dict().items():
        prefix, _, rest = key.removeprefix("parts.").partition(".")
        out[_unmangle(prefix) + "." + rest] = value
    return out


def export_onnx(module: Cut, path: str | Path) -> None:
    """Write ``module`` as an ONNX model whose initializers keep transformers' key names (no folding), so
    the file also serves as a weights file. Input ``x`` (N, 3, H, W) float32, output ``y``."""

    class Named(nn.Module):  # the ModuleDict's mangled names, unmangled, become the initializer names
        def __init__(self) -> None:
            super().__init__()
            for name, part in module.parts.items():
                self.add_module(_unmangle(name), part)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return module(x)

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.onnx.export(Named().eval(), (torch.zeros(2, 3, 64, 64),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_shapes={"x": {0: torch.export.Dim("n")}}, dynamo=True, optimize=False,
                      verbose=False, external_data=False)


def build(arch: str, cut: str, *, weights: str | None = None, seed: int = 0, start: str = "input") -> Cut:
    """``arch`` from ``start`` up to ``cut`` in eval mode, with seeded or loaded weights (see the module doc).

    A segment (``start`` past the input) holds exactly the weights the whole network up to ``cut`` has there:
    segments run one after the other compute what the uncut network computes."""
    check_segment(arch, start, cut)
    if start != "input" and weights is None:
        # seeded weights and batch-norm statistics are drawn in order from the input: build the prefix, keep the end
        whole = build(arch, cut, seed=seed)
        skip = len(_names_up_to(arch, start))
        return Cut(list(whole.parts.items())[skip:], pooled=cut == "pooled").eval()
    with torch.device("meta"):  # structure only: every tensor is set below (transformers' init would be wasted)
        net = backbone(arch)
    net.to_empty(device="cpu")
    module = Cut([(_mangle(p), m) for p, m in _parts(arch, net, cut, start)], pooled=cut == "pooled")
    for name, buf in module.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()
    if weights is None:
        _init(module, seed)
        _calibrate(module, seed)
    else:
        load_state(module, _read_state(Path(weights)), origin=f"file {weights}")
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
