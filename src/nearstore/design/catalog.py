"""The hardware catalog: validated component specs, every figure with its source.

Loaded from YAML (the packaged ``data/catalog.yaml`` plus any user files).
Every numeric field of a component needs an entry in its ``sources`` mapping
(keys may list several fields: ``"read_gb_per_s, watts"``) that either cites a
URL or starts with ``assumption:`` followed by the reasoning; ``"*"`` covers
every field not listed (allowed for user files, not in the packaged catalog).
Every problem is a ``CatalogError`` naming the file (and line, for YAML
syntax), the component and the field, with what was expected.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nearstore.core.errors import ConfigError

__all__ = ["CatalogError", "NvmeSsd", "Nic", "MemoryChannel", "FormFactor", "Chassis", "Cpu", "Accelerator",
           "EmulatedAccelerator", "ComputationalDrive", "Ebof", "MemoryModule", "GpuServer", "Appliance", "Catalog",
           "load_catalog", "read_yaml_sources", "validate_item", "PCIE_GB_PER_S_PER_LANE", "sourced_fields"]

#: usable GB/s per lane and direction after line coding: Gen3 8 GT/s x 128/130, Gen4 16 GT/s, Gen5 32 GT/s
#: (PCI-SIG base specifications, https://pcisig.com/specifications)
PCIE_GB_PER_S_PER_LANE = {3: 0.985, 4: 1.969, 5: 3.938}

_URL = re.compile(r"https?://\S+")
_MIN_REASON = 20  # characters of reasoning after "assumption:"


class CatalogError(ConfigError):
    """A catalog file has an unknown kind, a missing field, an unsourced figure or a value out of range."""


def _source_ok(text: str) -> bool:
    t = text.strip()
    if _URL.search(t):
        return True
    return t.lower().startswith("assumption:") and len(t.split(":", 1)[1].strip()) >= _MIN_REASON


def sourced_fields(model: type[BaseModel]) -> list[str]:
    """The fields of a component that are figures (numbers), each of which needs a source."""
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if ann in (int, float) and name != "name":
            out.append(name)
    return out


class _Component(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    source: str = Field(min_length=3, description="what the part is (a product, a class of products)")
    sources: dict[str, str] = Field(description="field (or comma-separated fields, or '*') -> URL or "
                                                "'assumption: <reasoning>'")

    @model_validator(mode="after")
    def _every_figure_sourced(self) -> "_Component":
        cover: dict[str, str] = {}
        for key, text in self.sources.items():
            for f in (k.strip() for k in key.split(",")):
                if f != "*" and f not in type(self).model_fields:
                    raise ValueError(f"sources names {f!r}, which is not a field of {type(self).__name__}")
                cover[f] = text
        for f in sourced_fields(type(self)):
            text = cover.get(f, cover.get("*"))
            if text is None:
                raise ValueError(f"field {f} has no entry in sources (a URL, or 'assumption: <reasoning>')")
            if not _source_ok(text):
                raise ValueError(f"the source of field {f} ({text!r}) is neither a URL nor "
                                 f"'assumption: <at least {_MIN_REASON} characters of reasoning>'")
        return self


class NvmeSsd(_Component):
    interface: Literal["pcie3", "pcie4", "pcie5", "ethernet-25g"]
    form_factor: str
    read_gb_per_s: float = Field(gt=0, le=100)
    lanes: int = Field(4, ge=0, le=16)
    watts: float = Field(gt=0, description="active (read) power")
    idle_watts: float = Field(ge=0)
    capacity_tb: float = Field(gt=0)
    price_usd: float = Field(ge=0)


class Nic(_Component):
    gbit_per_s: float = Field(gt=0, le=3200)
    pcie_gen: int = Field(ge=3, le=5)
    pcie_lanes: int = Field(ge=1, le=32)
    watts: float = Field(gt=0)
    idle_watts: float = Field(ge=0)
    price_usd: float = Field(ge=0)

    @property
    def gb_per_s(self) -> float:
        """Usable bytes/s: the line rate, or the PCIe slot if that is slower (400 GbE on Gen4 x16)."""
        return min(self.gbit_per_s / 8, self.pcie_lanes * PCIE_GB_PER_S_PER_LANE[self.pcie_gen])


class MemoryChannel(_Component):
    mega_transfers_per_s: float = Field(gt=0)
    bus_bytes: int = Field(gt=0)

    @property
    def gb_per_s(self) -> float:
        return self.mega_transfers_per_s * self.bus_bytes / 1000


class FormFactor(_Component):
    """A drive form factor and the power its slot delivers (what a computational drive must fit in)."""

    max_watts: float = Field(gt=0)


class Cpu(_Component):
    """A CPU package. ``core_speed``: images/s of one core relative to the reference server core."""

    cores: int = Field(ge=1)
    core_speed: float = Field(gt=0, le=10)
    watts: float = Field(gt=0, description="TDP, drawn with every core busy")
    idle_watts: float = Field(ge=0)
    price_usd: float = Field(ge=0)
    pcie_gen: int = Field(ge=3, le=5)
    pcie_lanes: int = Field(ge=0)
    memory: Literal["ddr4", "ddr5", "lpddr5"]
    memory_channels: int = Field(ge=1)
    persistent_memory: list[Literal["nvdimm-n", "pmem-100", "pmem-200"]] = []


class Chassis(_Component):
    """A storage server chassis: bays, slots, its CPUs, the PCIe lanes behind them, fans and supplies."""

    rack_units: int = Field(ge=1)
    drive_bays: int = Field(ge=0)
    form_factor: str
    nic_slots: int = Field(ge=0)
    cpu: str
    cpu_sockets: int = Field(ge=1)
    switch_downstream_lanes: int = Field(ge=0, description="drive lanes behind PCIe switches (0: drives on CPU lanes)")
    switch_upstream_lanes: int = Field(ge=0, description="lanes from the switches to the CPUs")
    switch_pcie_gen: int = Field(4, ge=3, le=5)
    watts: float = Field(gt=0, description="board, memory, fans, switches, supply losses; without CPUs, drives, NICs")
    idle_watts: float = Field(ge=0)
    price_usd: float = Field(ge=0, description="without CPUs, drives, NICs")
    max_watts: float = Field(gt=0, description="power supply rating")


class Accelerator(_Component):
    """A GPU or a small accelerator.

    ``fp16_tflops``: dense fp16/bf16 tensor TFLOP/s (training uses this;
    0: cannot train). ``int8_tops``: dense int8 TOP/s (inference uses the
    faster of the two). ``mfu``: the fraction of peak a convnet step reaches.
    ``jpeg_images_per_s``: ImageNet-size JPEGs/s of its hardware JPEG
    decoder (0: none).
    """

    category: Literal["gpu", "small"]
    fp16_tflops: float = Field(ge=0)
    int8_tops: float = Field(ge=0)
    memory_gb: float = Field(gt=0)
    memory_gb_per_s: float = Field(gt=0)
    watts: float = Field(gt=0)
    idle_watts: float = Field(ge=0)
    price_usd: float = Field(ge=0)
    mfu: float = Field(gt=0, le=1)
    jpeg_images_per_s: float = Field(0.0, ge=0)
    bus: Literal["sxm", "pcie", "module"]
    pcie_gen: int = Field(4, ge=3, le=5)
    pcie_lanes: int = Field(16, ge=0, le=16)

    @model_validator(mode="after")
    def _some_rate(self) -> "Accelerator":
        if not self.fp16_tflops and not self.int8_tops:
            raise ValueError("an accelerator needs fp16_tflops or int8_tops > 0")
        return self

    def macs_per_s(self, train: bool) -> float:
        """Achieved MAC/s: fp16/bf16 to train; to infer, the faster of fp16 and int8 (1 MAC = 2 ops)."""
        peak = self.fp16_tflops if train else max(self.fp16_tflops, self.int8_tops)
        return peak * 1e12 / 2 * self.mfu

    def bytes_per_param(self, train: bool) -> float:
        return 2.0 if train or self.fp16_tflops >= self.int8_tops else 1.0


class EmulatedAccelerator(_Component):
    """An accelerator as MLPerf Storage emulates it: a fixed compute time per batch of one workload."""

    workload: str
    batch: int = Field(ge=1)
    step_s: float = Field(gt=0)
    record_bytes: int = Field(gt=0, description="bytes per sample in the benchmark's dataset")

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.step_s


class ComputationalDrive(_Component):
    """An NVMe drive with compute inside: embedded cores and optionally an accelerator."""

    form_factor: str
    interface: Literal["pcie3", "pcie4", "pcie5"]
    lanes: int = Field(4, ge=1, le=16)
    read_gb_per_s: float = Field(gt=0, le=100, description="what the drive's compute can read from its flash")
    capacity_tb: float = Field(gt=0)
    cores: int = Field(ge=0)
    core_speed: float = Field(gt=0, le=10)
    accel_fp16_tflops: float = Field(ge=0)
    accel_int8_tops: float = Field(ge=0)
    accel_memory_gb: float = Field(ge=0)
    accel_mfu: float = Field(gt=0, le=1)
    watts: float = Field(gt=0, description="drive and compute at full load")
    idle_watts: float = Field(ge=0)
    price_usd: float = Field(ge=0)

    @property
    def link_gb_per_s(self) -> float:
        return self.lanes * PCIE_GB_PER_S_PER_LANE[int(self.interface[-1])]


class Ebof(_Component):
    """An Ethernet bunch of flash: Ethernet SSDs on an embedded switch, optionally a DPU for storage-side work."""

    drive_bays: int = Field(ge=1)
    drive_gbit_per_s: float = Field(gt=0, description="each bay's Ethernet port")
    uplink_ports: int = Field(ge=1)
    dpu_cores: int = Field(ge=0)
    core_speed: float = Field(gt=0, le=10)
    dpu_gbit_per_s: float = Field(ge=0, description="what the DPU can take in from the switch")
    watts: float = Field(gt=0, description="enclosure, switch, DPU, fans; without drives")
    idle_watts: float = Field(ge=0)
    price_usd: float = Field(ge=0)
    rack_units: int = Field(ge=1)


class MemoryModule(_Component):
    """A persistent memory module: NVDIMM-N (DRAM speed, flash backup) or Optane PMem."""

    technology: Literal["nvdimm-n", "pmem-100", "pmem-200"]
    memory: Literal["ddr4"]
    capacity_gb: float = Field(gt=0)
    read_gb_per_s: float = Field(gt=0)
    watts: float = Field(gt=0)
    idle_watts: float = Field(ge=0)
    price_usd: float = Field(ge=0)


class GpuServer(_Component):
    """A compute node of the training tier."""

    rack_units: int = Field(ge=1)
    gpu_slots: int = Field(ge=1)
    cpu: str
    cpu_sockets: int = Field(ge=1)
    drive_bays: int = Field(ge=0)
    drive: str = Field(description="its local NVMe drive model (nvme_ssd)")
    ram_gb: float = Field(gt=0)
    page_cache_fraction: float = Field(gt=0, le=1, description="share of RAM the page cache can hold")
    nic: str
    nics: int = Field(ge=1, description="NICs facing storage (not the GPU fabric)")
    watts: float = Field(gt=0, description="board, memory, fans, switches, supply losses; without CPUs, GPUs, drives")
    idle_watts: float = Field(ge=0)
    price_usd: float = Field(ge=0, description="without CPUs, GPUs, drives")


class Appliance(_Component):
    """A storage appliance as sold, for validation against published benchmarks: its datasheet read rate."""

    rack_units: int = Field(ge=1)
    read_gb_per_s: float = Field(gt=0)
    drives: int = Field(ge=1)
    max_watts: float = Field(gt=0)


KINDS: dict[str, type[_Component]] = {
    "nvme_ssd": NvmeSsd, "nic": Nic, "memory_channel": MemoryChannel, "form_factor": FormFactor,
    "chassis": Chassis, "cpu": Cpu, "accelerator": Accelerator, "emulated_accelerator": EmulatedAccelerator,
    "computational_drive": ComputationalDrive, "ebof": Ebof, "memory_module": MemoryModule, "gpu_server": GpuServer,
    "appliance": Appliance,
}


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True)
    nvme_ssd: dict[str, NvmeSsd] = {}
    nic: dict[str, Nic] = {}
    memory_channel: dict[str, MemoryChannel] = {}
    form_factor: dict[str, FormFactor] = {}
    chassis: dict[str, Chassis] = {}
    cpu: dict[str, Cpu] = {}
    accelerator: dict[str, Accelerator] = {}
    emulated_accelerator: dict[str, EmulatedAccelerator] = {}
    computational_drive: dict[str, ComputationalDrive] = {}
    ebof: dict[str, Ebof] = {}
    memory_module: dict[str, MemoryModule] = {}
    gpu_server: dict[str, GpuServer] = {}
    appliance: dict[str, Appliance] = {}

    def get(self, kind: str, name: str) -> Any:
        table = getattr(self, kind)
        key = name.lower()
        if key not in table:
            if kind in ("accelerator", "emulated_accelerator"):
                raise CatalogError(f"no accelerator named {name!r}; accelerators: {', '.join(self.accelerator_names())}")
            raise CatalogError(f"no {kind} named {name!r} in the catalog; known: {', '.join(sorted(table))}")
        return table[key]

    def accelerator_names(self) -> list[str]:
        """Every valid accelerator name: real ones, then MLPerf Storage emulated ones (with their workload)."""
        return sorted(self.accelerator) + [f"{n} (emulated, {e.workload})"
                                           for n, e in sorted(self.emulated_accelerator.items())]


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
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise CatalogError(f"{origin}:{where}: not valid YAML: {problem}") from None
    return out


def validate_item(model: type[BaseModel], item: Any, *, origin: str, what: str, index: int) -> Any:
    """``model.model_validate(item)``; a problem names the file, the component and each field."""
    label = item.get("name", f"#{index}") if isinstance(item, dict) else f"#{index}"
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        problems = "; ".join((f"field {'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"]
                             for e in exc.errors())
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


def _check_references(cat: Catalog) -> None:
    """Cross-component rules: names that must exist, drives within their form factor's power."""
    for d in [*cat.computational_drive.values(), *cat.nvme_ssd.values()]:
        ff = cat.form_factor.get(d.form_factor.lower())
        if ff is None and d.form_factor != "none":
            raise CatalogError(f"{type(d).__name__} {d.name!r}: form factor {d.form_factor!r} is not in the catalog; "
                               f"known: {', '.join(sorted(cat.form_factor))}")
        if ff is not None and d.watts > ff.max_watts:
            raise CatalogError(f"{type(d).__name__} {d.name!r} draws {d.watts:g} W, more than its form factor "
                               f"{ff.name} delivers ({ff.max_watts:g} W)")
    for c in cat.chassis.values():
        if c.cpu.lower() not in cat.cpu:
            raise CatalogError(f"chassis {c.name!r}: cpu {c.cpu!r} is not in the catalog")
        if c.form_factor.lower() not in cat.form_factor:
            raise CatalogError(f"chassis {c.name!r}: form factor {c.form_factor!r} is not in the catalog")
    for s in cat.gpu_server.values():
        for kind, ref in (("cpu", s.cpu), ("nvme_ssd", s.drive), ("nic", s.nic)):
            if ref.lower() not in getattr(cat, kind):
                raise CatalogError(f"gpu_server {s.name!r}: {kind} {ref!r} is not in the catalog")


def load_catalog(*paths: str | Path, builtin: bool = True) -> Catalog:
    """The packaged catalog (unless ``builtin=False``) plus ``paths``; later files override by name."""
    merged: dict[str, dict[str, _Component]] = {k: {} for k in KINDS}
    for origin, doc in read_yaml_sources("catalog.yaml", paths, builtin=builtin, what="catalog"):
        for kind, comps in _parse(doc or {}, origin).items():
            merged[kind].update(comps)
    cat = Catalog(**merged)
    _check_references(cat)
    return cat
