"""The hardware catalog: validated component specs, each with its source.

Loaded from YAML (the packaged ``data/catalog.yaml`` plus any user files).
Every problem is a ``CatalogError`` naming the file, the component and the
field, with what was expected.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nearstore.core.errors import ConfigError

__all__ = ["CatalogError", "NvmeSsd", "Nic", "MemoryChannel", "Chassis", "Cpu", "Accelerator", "EmulatedAccelerator",
           "ComputationalDrive", "Ebof", "MemoryModule", "GpuServer", "Catalog", "load_catalog", "read_yaml_sources",
           "validate_item"]


class CatalogError(ConfigError):
    """A catalog file has an unknown kind, a missing field or a value of the wrong unit or range."""


class _Component(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    source: str = Field(min_length=3, description="where the figures come from")


class NvmeSsd(_Component):
    read_gb_per_s: float = Field(gt=0, le=100)
    watts: float = Field(gt=0)
    capacity_tb: float = Field(gt=0)
    price_usd: float = Field(ge=0)


class Nic(_Component):
    gbit_per_s: float = Field(gt=0, le=3200)
    watts: float = Field(gt=0)
    price_usd: float = Field(ge=0)

    @property
    def gb_per_s(self) -> float:
        return self.gbit_per_s / 8


class MemoryChannel(_Component):
    mega_transfers_per_s: float = Field(gt=0)
    bus_bytes: int = Field(gt=0)

    @property
    def gb_per_s(self) -> float:
        return self.mega_transfers_per_s * self.bus_bytes / 1000


class Chassis(_Component):
    rack_units: int = Field(ge=1)
    drive_bays: int = Field(ge=0)
    nic_slots: int = Field(ge=0)
    memory_channels: int = Field(ge=0)
    max_watts: float = Field(gt=0)


class Cpu(_Component):
    """A CPU package. ``core_speed`` is relative to the reference core that measured workload op costs."""

    cores: int = Field(ge=1)
    core_speed: float = Field(gt=0, le=10)
    watts: float = Field(gt=0)
    price_usd: float = Field(ge=0)


class Accelerator(_Component):
    """A GPU or a small accelerator.

    ``dense_tops``: dense fp16/bf16 tensor TFLOP/s for GPUs, int8 TOP/s for
    small accelerators (1 MAC = 2 ops). ``mfu``: the fraction of that peak a
    convnet step reaches (an assumption stated in ``source``; calibrate it).
    """

    category: Literal["gpu", "small"]
    dense_tops: float = Field(gt=0)
    memory_gb: float = Field(gt=0)
    memory_gb_per_s: float = Field(gt=0)
    watts: float = Field(gt=0)
    price_usd: float = Field(ge=0)
    mfu: float = Field(gt=0, le=1)
    bytes_per_param: float = Field(2.0, gt=0, description="weights' precision on this device (2: fp16, 1: int8)")

    @property
    def macs_per_s(self) -> float:
        return self.dense_tops * 1e12 / 2 * self.mfu


class EmulatedAccelerator(_Component):
    """An accelerator as MLPerf Storage emulates it: a fixed compute time per batch of a workload."""

    workload: str
    batch: int = Field(ge=1)
    step_s: float = Field(gt=0)
    record_bytes: int = Field(gt=0, description="bytes per sample in the benchmark's dataset")

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.step_s


class ComputationalDrive(_Component):
    """An NVMe drive with compute inside: embedded cores and optionally an accelerator."""

    read_gb_per_s: float = Field(gt=0, le=100)
    capacity_tb: float = Field(gt=0)
    cores: int = Field(ge=0)
    core_speed: float = Field(gt=0, le=10)
    accel_tops: float = Field(ge=0, description="int8 TOP/s of the drive's accelerator (0: none)")
    accel_memory_gb: float = Field(ge=0)
    accel_mfu: float = Field(0.3, gt=0, le=1)
    watts: float = Field(gt=0)
    price_usd: float = Field(ge=0)


class Ebof(_Component):
    """An Ethernet bunch of flash: Ethernet SSDs behind a switch, with a DPU's cores for storage-side work."""

    drive_bays: int = Field(ge=1)
    uplinks: int = Field(ge=1)
    dpu_cores: int = Field(ge=0)
    core_speed: float = Field(gt=0, le=10)
    watts: float = Field(gt=0, description="enclosure, switch and DPU, without drives")
    price_usd: float = Field(ge=0)
    rack_units: int = Field(ge=1)


class MemoryModule(_Component):
    """A persistent memory module on a memory channel: NVDIMM-N (DRAM speed) or persistent memory."""

    technology: Literal["nvdimm-n", "pmem"]
    capacity_gb: float = Field(gt=0)
    read_gb_per_s: float = Field(gt=0)
    watts: float = Field(gt=0)
    price_usd: float = Field(ge=0)


class GpuServer(_Component):
    """A compute node of the training tier."""

    rack_units: int = Field(ge=1)
    gpu_slots: int = Field(ge=1)
    cpu_sockets: int = Field(ge=1)
    drive_bays: int = Field(ge=0)
    base_watts: float = Field(ge=0, description="fans, memory, board")
    price_usd: float = Field(ge=0, description="chassis, board, memory; without CPUs, GPUs, drives")


KINDS: dict[str, type[_Component]] = {
    "nvme_ssd": NvmeSsd, "nic": Nic, "memory_channel": MemoryChannel, "chassis": Chassis, "cpu": Cpu,
    "accelerator": Accelerator, "emulated_accelerator": EmulatedAccelerator,
    "computational_drive": ComputationalDrive, "ebof": Ebof, "memory_module": MemoryModule, "gpu_server": GpuServer,
}


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True)
    nvme_ssd: dict[str, NvmeSsd] = {}
    nic: dict[str, Nic] = {}
    memory_channel: dict[str, MemoryChannel] = {}
    chassis: dict[str, Chassis] = {}
    cpu: dict[str, Cpu] = {}
    accelerator: dict[str, Accelerator] = {}
    emulated_accelerator: dict[str, EmulatedAccelerator] = {}
    computational_drive: dict[str, ComputationalDrive] = {}
    ebof: dict[str, Ebof] = {}
    memory_module: dict[str, MemoryModule] = {}
    gpu_server: dict[str, GpuServer] = {}

    def get(self, kind: str, name: str) -> Any:
        table = getattr(self, kind)
        key = name.lower()
        if key not in table:
            raise CatalogError(f"no {kind} named {name!r} in the catalog; known: {', '.join(sorted(table))}")
        return table[key]


def read_yaml_sources(packaged: str, paths: tuple, *, builtin: bool, what: str) -> list[tuple[str, Any]]:
    """(origin, parsed YAML) for the packaged file ``data/<packaged>`` (unless not ``builtin``) and ``paths``."""
    texts: list[tuple[str, str]] = []
    if builtin:
        texts.append((f"nearstore/design/data/{packaged}",
                      resources.files("nearstore.design").joinpath(f"data/{packaged}").read_text()))
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise CatalogError(f"{what} file {p} does not exist")
        texts.append((str(p), p.read_text()))
    out = []
    for origin, text in texts:
        try:
            out.append((origin, yaml.safe_load(text)))
        except yaml.YAMLError as exc:
            raise CatalogError(f"{origin}: not valid YAML: {exc}") from None
    return out


def validate_item(model: type[BaseModel], item: Any, *, origin: str, what: str, index: int) -> Any:
    """``model.model_validate(item)``; a problem names the file, the component and each field."""
    label = item.get("name", f"#{index}") if isinstance(item, dict) else f"#{index}"
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        problems = "; ".join(f"field {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CatalogError(f"{origin}: {what} {label!r}: {problems}") from None


def _parse(doc: Any, origin: str) -> dict[str, dict[str, _Component]]:
    if not isinstance(doc, dict):
        raise CatalogError(f"{origin}: a catalog is a mapping of kind -> list of components")
    out: dict[str, dict[str, _Component]] = {}
    for kind, items in doc.items():
        model = KINDS.get(kind)
        if model is None:
            raise CatalogError(f"{origin}: unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        if not isinstance(items, list):
            raise CatalogError(f"{origin}: {kind} must be a list of components")
        for i, item in enumerate(items):
            comp = validate_item(model, item, origin=origin, what=kind, index=i)
            out.setdefault(kind, {})[comp.name.lower()] = comp
    return out


def load_catalog(*paths: str | Path, builtin: bool = True) -> Catalog:
    """The packaged catalog (unless ``builtin=False``) plus ``paths``; later files override by name."""
    merged: dict[str, dict[str, _Component]] = {k: {} for k in KINDS}
    for origin, doc in read_yaml_sources("catalog.yaml", paths, builtin=builtin, what="catalog"):
        for kind, comps in _parse(doc or {}, origin).items():
            merged[kind].update(comps)
    return Catalog(**merged)
