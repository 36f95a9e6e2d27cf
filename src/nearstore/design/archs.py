"""Architecture templates over the catalog, evaluated with the one performance model.

A template builds a ``System``: the resources of ``boxes`` storage systems
plus the compute tier they feed, what each side can run (``Side``), what a
byte crosses between them (``link``), and the path whose bandwidth is the
storage<->compute figure per 2U. Every resource carries idle and busy watts
(power is weighted by utilization) and a group, "storage" or "compute", so
storage-only cost and power can be reported. Templates (users can write their
own: any function returning a System):

- ``host_gpu_server``: host-centric: local NVMe in every GPU server, all work
  on the host CPUs or, with DALI, on the GPUs' JPEG decoders and SMs. A
  dataset larger than one server's drives is spread over the servers, and
  reads from other servers cross their NICs.
- ``smart_ebof``: an EBOF (Ethernet SSDs on an embedded switch) with a
  BlueField-class DPU on the switch for storage-side work.
- ``smart_nvme_2u``: a 2U storage server of computational drives (cores, an
  accelerator per drive) behind PCIe switches, its own CPU also
  preprocessing; drive lanes, switch uplinks and NIC lanes must fit.
- ``nvdimm``: NVDIMM-N (or Optane PMem) on a platform that supports it, an
  accelerator on its real bus (the Alveo U250 on PCIe Gen3 x16).

Every storage design feeds the same ``ComputeTier`` (GPU servers with host
CPUs, RAM for the page cache and storage NICs), so designs compare on equal
terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nearstore.core.errors import ConfigError
from nearstore.design.catalog import PCIE_GB_PER_S_PER_LANE, Catalog, CatalogError
from nearstore.model.core import Resource, Stage, evaluate

__all__ = ["Device", "Side", "System", "ComputeTier", "Nics", "parse_nics", "host_gpu_server", "smart_ebof",
           "smart_nvme_2u", "nvdimm", "storage_compute_bandwidth", "ARCHITECTURES", "SEED_DESIGNS", "SEED_CONFIG",
           "VARIANTS", "IO_CORE_S_PER_BYTE"]

#: host CPU work of serving storage reads (NVMe-oF target / file server): assumption, ~1 core per 5 GB/s
IO_CORE_S_PER_BYTE = 1 / 5e9


@dataclass(frozen=True)
class Device:
    """An accelerator class on one side: a resource measured in device-seconds, and what it can do."""

    resource: str
    count: int
    train_macs_per_s: float  # achieved MAC/s per device at fp16/bf16 (0: cannot train)
    infer_macs_per_s: float  # achieved MAC/s per device at its best inference precision
    infer_bytes_per_param: float
    memory_bytes: float
    jpeg: str | None = None  # resource of its hardware JPEG decoder
    bus: str | None = None  # resource a model stage's input crosses to reach it
    allreduce: str | None = None  # resource gradients cross between devices (data-parallel training)
    groups: int = 1  # boxes the devices sit in: between boxes the all-reduce crosses ``group_link``
    group_link: str | None = None
    emulated: bool = False


@dataclass(frozen=True)
class Side:
    """Where a side runs cpu stages and model stages (resource names; None: it cannot)."""

    cpu: str | None = None
    accel: Device | None = None
    extra_cpu: str | None = None  # a second CPU pool sharing the side's cpu stages (a storage server's own CPU)
    gpu_decode: bool = False  # JPEG stages may run on the accelerators (DALI)


@dataclass(frozen=True)
class System:
    name: str
    description: str
    resources: list[Resource]
    path: list[str]  # resources a byte crosses between storage and the compute next to it (the per-2U figure)
    read: list[str]  # resources a sample read crosses
    storage: Side
    compute: Side
    link: list[str]  # resources a byte crosses from the storage side to the compute side
    storage_rack_units: int
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # configuration faults: lanes, supplies (infeasible)
    servers: int = 1  # compute servers
    cache_bytes_per_server: float = 0.0  # page cache each compute server can give the dataset
    local_drives_per_server: int = 0  # host-centric: the dataset lives on the compute servers' drives
    raw_exit: list[str] = field(default_factory=list)  # resources raw bytes cross leaving the drives (PCIe uplinks)
    boxes: int = 1

    @property
    def storage_capacity_bytes(self) -> float:
        media = next(r for r in self.resources if r.name == "media")
        return (media.memory_bytes or 0.0) * media.count


@dataclass(frozen=True)
class Nics:
    count: int
    model: str


def parse_nics(spec: str) -> Nics:
    """``"3x100gbe"`` -> Nics(3, "100gbe")."""
    count, sep, model = spec.lower().partition("x")
    if not sep or not count.isdigit() or int(count) < 1 or not model:
        raise ConfigError(f"nics must look like COUNTxMODEL, e.g. 3x100gbe (got {spec!r})")
    return Nics(int(count), model)


@dataclass(frozen=True, kw_only=True)
class ComputeTier:
    """The training/inference servers every design feeds."""

    gpus: int = 8
    gpu: str = "h100"
    server: str = "dgx-h100"
    model_macs: float | None = None  # with an MLPerf emulated accelerator: the workload's MACs per sample
    gpu_decode: bool = True  # DALI may preprocess JPEGs on the GPUs
    nics: Nics | None = None  # storage NICs per server (default: the server's own)

    def servers(self, cat: Catalog) -> int:
        if self.gpus < 1:
            raise ConfigError(f"gpus must be >= 1 (got {self.gpus})")
        return math.ceil(self.gpus / cat.get("gpu_server", self.server).gpu_slots)

    def emulated(self, cat: Catalog) -> bool:
        return self.gpu.lower() in cat.emulated_accelerator

    def device(self, cat: Catalog) -> Device:
        if self.emulated(cat):  # a fixed step time per batch, as MLPerf Storage emulates it
            em = cat.get("emulated_accelerator", self.gpu)
            if self.model_macs is None:
                raise ConfigError(f"{self.gpu} is an emulated accelerator: the tier needs the workload's MACs")
            rate = em.samples_per_s * self.model_macs
            return Device(resource="gpu", count=self.gpus, train_macs_per_s=rate, infer_macs_per_s=rate,
                          infer_bytes_per_param=2.0, memory_bytes=float("inf"), emulated=True)
        g = cat.get("accelerator", self.gpu)
        return Device(resource="gpu", count=self.gpus, train_macs_per_s=g.macs_per_s(True),
                      infer_macs_per_s=g.macs_per_s(False), infer_bytes_per_param=g.bytes_per_param(False),
                      memory_bytes=g.memory_gb * 1e9, jpeg="gpu_jpeg" if g.jpeg_images_per_s else None)

    def resources(self, cat: Catalog) -> list[Resource]:
        s = cat.get("gpu_server", self.server)
        c = cat.get("cpu", s.cpu)
        nics = self.nics or Nics(s.nics, s.nic)
        n = cat.get("nic", nics.model)
        servers = self.servers(cat)
        out = []
        if self.emulated(cat):
            out.append(Resource(name="gpu", rate=1.0, count=self.gpus, unit="device-s", group="compute"))
        else:
            g = cat.get("accelerator", self.gpu)
            out.append(Resource(name="gpu", rate=1.0, count=self.gpus, unit="device-s", watts=g.watts,
                                idle_watts=g.idle_watts, cost=g.price_usd, memory_bytes=g.memory_gb * 1e9,
                                group="compute"))
            if g.jpeg_images_per_s:
                out.append(Resource(name="gpu_jpeg", rate=g.jpeg_images_per_s, count=self.gpus, unit="image",
                                    group="compute"))
        cores = servers * s.cpu_sockets * c.cores
        out += [
            Resource(name="host_cpu", rate=c.core_speed, count=cores, unit="core-s", watts=c.watts / c.cores,
                     idle_watts=c.idle_watts / c.cores, cost=c.price_usd / c.cores, group="compute"),
            Resource(name="compute_nic", rate=n.gb_per_s * 1e9, count=servers * nics.count, watts=n.watts,
                     idle_watts=n.idle_watts, cost=n.price_usd, group="compute"),
            Resource(name="gpu_servers", rate=1.0, count=servers, unit="server", watts=s.watts,
                     idle_watts=s.idle_watts, cost=s.price_usd, rack_units=s.rack_units, group="compute"),
        ]
        return out

    def side(self, cat: Catalog) -> Side:
        return Side(cpu="host_cpu", accel=self.device(cat), gpu_decode=self.gpu_decode and not self.emulated(cat))

    def cache_bytes(self, cat: Catalog) -> float:
        s = cat.get("gpu_server", self.server)
        return s.ram_gb * 1e9 * s.page_cache_fraction


def storage_compute_bandwidth(system: System) -> tuple[float, str]:
    """Bytes/s between storage and compute per system, and the resource that limits it."""
    ev = evaluate(system.resources, [Stage(name="move one byte", demands={r: 1.0 for r in system.path})])
    return ev.samples_per_s / system.boxes, ev.bottleneck or ""


def _fits(count: int, limit: int, what: str, where: str) -> None:
    if not 1 <= count <= limit:
        raise ConfigError(f"{what} must be in 1..{limit} for {where} (got {count})")


def _nics(cat: Catalog, nics: Nics, boxes: int) -> Resource:
    n = cat.get("nic", nics.model)
    return Resource(name="ethernet", rate=n.gb_per_s * 1e9, count=nics.count * boxes, watts=n.watts,
                    idle_watts=n.idle_watts, cost=n.price_usd, group="storage")


def _tier(tier: ComputeTier | None) -> ComputeTier:
    return tier or ComputeTier()


def _common(tier: ComputeTier, cat: Catalog) -> dict:
    return {"servers": tier.servers(cat), "cache_bytes_per_server": tier.cache_bytes(cat)}


def host_gpu_server(cat: Catalog, *, drive: str | None = None, drives: int | None = None,
                    tier: ComputeTier | None = None, boxes: int = 1) -> System:
    """Host-centric: the dataset on the GPU servers' own drives (``boxes`` is unused: storage grows with them)."""
    tier = _tier(tier)
    s = cat.get("gpu_server", tier.server)
    d = cat.get("nvme_ssd", drive or s.drive)
    drives = s.drive_bays if drives is None else drives
    _fits(drives, s.drive_bays, "drives", f"server {s.name}")
    servers = tier.servers(cat)
    return System(
        name="host_gpu_server",
        description=f"host-centric: {tier.gpus} x {tier.gpu} in {servers} x {s.name}, {drives} x {d.name} each",
        resources=[Resource(name="media", rate=d.read_gb_per_s * 1e9, count=drives * servers, watts=d.watts,
                            idle_watts=d.idle_watts, cost=d.price_usd, memory_bytes=d.capacity_tb * 1e12,
                            group="storage"), *tier.resources(cat)],
        path=["media"], read=["media"], storage=Side(), compute=tier.side(cat), link=[], storage_rack_units=0,
        local_drives_per_server=drives, **_common(tier, cat),
    )


def smart_ebof(cat: Catalog, *, drive: str = "em6", drives: int = 24, nics: Nics = Nics(3, "100gbe"),
               enclosure: str = "ebof-24", tier: ComputeTier | None = None, boxes: int = 1) -> System:
    tier = _tier(tier)
    d, e = cat.get("nvme_ssd", drive), cat.get("ebof", enclosure)
    if not d.interface.startswith("ethernet"):
        raise CatalogError(f"an EBOF holds Ethernet SSDs; drive {d.name!r} is {d.interface} "
                           f"(Ethernet drives: {', '.join(n for n, x in cat.nvme_ssd.items() if x.interface.startswith('ethernet'))})")
    _fits(drives, e.drive_bays, "drives", f"enclosure {e.name}")
    _fits(nics.count, e.uplink_ports, "nics (uplink ports)", f"enclosure {e.name}")
    per_drive = min(d.read_gb_per_s, e.drive_gbit_per_s / 8)
    res = [Resource(name="media", rate=per_drive * 1e9, count=drives * boxes, watts=d.watts, idle_watts=d.idle_watts,
                    cost=d.price_usd, memory_bytes=d.capacity_tb * 1e12, group="storage"),
           _nics(cat, nics, boxes),
           Resource(name="enclosure", rate=1.0, count=boxes, unit="box", watts=e.watts, idle_watts=e.idle_watts,
                    cost=e.price_usd, rack_units=e.rack_units, group="storage")]
    if e.dpu_cores:
        res += [Resource(name="storage_cpu", rate=e.core_speed, count=e.dpu_cores * boxes, unit="core-s",
                         group="storage"),
                Resource(name="dpu_port", rate=e.dpu_gbit_per_s / 8 * 1e9, count=boxes, group="storage")]
    return System(
        name="smart_ebof",
        description=f"EBOF: {boxes} x {drives} x {d.name} Ethernet SSDs, {nics.count} x {nics.model} uplinks, "
                    f"{e.dpu_cores} DPU cores",
        resources=res + tier.resources(cat), path=["media", "ethernet"], read=["media"],
        storage=Side(cpu="storage_cpu" if e.dpu_cores else None), compute=tier.side(cat),
        link=["ethernet", "compute_nic"], storage_rack_units=e.rack_units * boxes,
        raw_exit=["dpu_port"] if e.dpu_cores else [], boxes=boxes, **_common(tier, cat),
    )


def smart_nvme_2u(cat: Catalog, *, drive: str = "orin-e3s", drives: int | None = None,
                  nics: Nics = Nics(3, "100gbe"), chassis: str | None = None, tier: ComputeTier | None = None,
                  boxes: int = 1, head_cores_reserved: int = 4) -> System:
    """A 2U of computational drives; its own CPU (less ``head_cores_reserved`` for serving I/O) also preprocesses."""
    tier = _tier(tier)
    d = cat.get("computational_drive", drive)
    if chassis is None:  # the chassis whose bays take this drive's form factor
        fits = [c for c in cat.chassis.values() if c.form_factor == d.form_factor and c.drive_bays]
        if not fits:
            raise CatalogError(f"no chassis takes {d.form_factor} drives ({d.name})")
        chassis = max(fits, key=lambda c: c.drive_bays).name
    c = cat.get("chassis", chassis)
    if c.form_factor != d.form_factor:
        raise ConfigError(f"drive {d.name} is {d.form_factor}; chassis {c.name} has {c.form_factor} bays")
    drives = c.drive_bays if drives is None else drives
    _fits(drives, c.drive_bays, "drives", f"chassis {c.name}")
    _fits(nics.count, c.nic_slots, "nics", f"chassis {c.name}")
    cpu, n = cat.get("cpu", c.cpu), cat.get("nic", nics.model)
    problems = []
    drive_lanes = drives * d.lanes
    if c.switch_downstream_lanes:
        if drive_lanes > c.switch_downstream_lanes:
            problems.append(f"{drives} drives x {d.lanes} lanes exceed the switches' {c.switch_downstream_lanes} "
                            "downstream lanes")
        cpu_lanes_for_drives, up_gen, up_lanes = c.switch_upstream_lanes, c.switch_pcie_gen, c.switch_upstream_lanes
    else:
        cpu_lanes_for_drives, up_gen, up_lanes = drive_lanes, cpu.pcie_gen, drive_lanes
    need = cpu_lanes_for_drives + nics.count * n.pcie_lanes
    have = cpu.pcie_lanes * c.cpu_sockets
    if need > have:
        problems.append(f"PCIe lanes: {cpu_lanes_for_drives} for drives + {nics.count} x {n.pcie_lanes} for NICs = "
                        f"{need} > the {have} lanes of {c.cpu_sockets} x {cpu.name}")
    peak = drives * d.watts + nics.count * n.watts + c.cpu_sockets * cpu.watts + c.watts
    if peak > c.max_watts:
        problems.append(f"peak power {peak:.0f} W exceeds the chassis supplies ({c.max_watts:.0f} W)")
    up_rate = min(up_lanes * PCIE_GB_PER_S_PER_LANE[up_gen], up_lanes * PCIE_GB_PER_S_PER_LANE[int(d.interface[-1])])
    head = max(c.cpu_sockets * cpu.cores - head_cores_reserved, 0)
    res = [Resource(name="media", rate=d.read_gb_per_s * 1e9, count=drives * boxes, watts=d.watts,
                    idle_watts=d.idle_watts, cost=d.price_usd, memory_bytes=d.capacity_tb * 1e12, group="storage"),
           Resource(name="drive_links", rate=d.link_gb_per_s * 1e9, count=drives * boxes, group="storage"),
           Resource(name="pcie_upstream", rate=up_rate * 1e9, count=boxes, group="storage"),
           _nics(cat, nics, boxes),
           Resource(name="chassis", rate=1.0, count=boxes, unit="box", watts=c.watts, idle_watts=c.idle_watts,
                    cost=c.price_usd, rack_units=c.rack_units, group="storage"),
           Resource(name="storage_head_cpu", rate=cpu.core_speed, count=c.cpu_sockets * cpu.cores * boxes,
                    unit="core-s", watts=cpu.watts / cpu.cores, idle_watts=cpu.idle_watts / cpu.cores,
                    cost=cpu.price_usd / cpu.cores, group="storage")]
    if d.cores:
        res.append(Resource(name="storage_cpu", rate=d.core_speed, count=drives * d.cores * boxes, unit="core-s",
                            group="storage"))
    accel = None
    if d.accel_fp16_tflops or d.accel_int8_tops:
        res.append(Resource(name="storage_accel", rate=1.0, count=drives * boxes, unit="device-s",
                            memory_bytes=d.accel_memory_gb * 1e9, group="storage"))
        infer_fp16 = d.accel_fp16_tflops >= d.accel_int8_tops
        accel = Device(resource="storage_accel", count=drives * boxes,
                       train_macs_per_s=d.accel_fp16_tflops * 1e12 / 2 * d.accel_mfu,
                       infer_macs_per_s=max(d.accel_fp16_tflops, d.accel_int8_tops) * 1e12 / 2 * d.accel_mfu,
                       infer_bytes_per_param=2.0 if infer_fp16 else 1.0, memory_bytes=d.accel_memory_gb * 1e9,
                       allreduce="drive_links", groups=boxes, group_link="ethernet")
    storage_cpu = "storage_cpu" if d.cores else ("storage_head_cpu" if head else None)
    extra = "storage_head_cpu" if d.cores and head else None
    return System(
        name="smart_nvme_2u",
        description=f"smart 2U: {boxes} x {drives} x {d.name} in {c.name} ({cpu.name}), "
                    f"{nics.count} x {nics.model} uplinks",
        resources=res + tier.resources(cat), path=["media"], read=["media"],
        storage=Side(cpu=storage_cpu, accel=accel, extra_cpu=extra),
        compute=tier.side(cat), link=["pcie_upstream", "ethernet", "compute_nic"],
        storage_rack_units=c.rack_units * boxes, problems=problems, boxes=boxes,
        notes=[f"the storage server's own {head} cores (of {c.cpu_sockets * cpu.cores}; {head_cores_reserved} "
               "kept for serving I/O) preprocess alongside the drives' cores"],
        **_common(tier, cat),
    )


def nvdimm(cat: Catalog, *, module: str = "nvdimm-n-32", modules: int = 2, channel: str = "ddr4-2400",
           channels: int = 1, accelerator: str = "alveo-u250", chassis: str | None = None,
           nics: Nics = Nics(3, "100gbe"), tier: ComputeTier | None = None, boxes: int = 1) -> System:
    """Persistent memory on a platform that supports it; the accelerator on its real bus (PCIe)."""
    tier = _tier(tier)
    m, ch, a = cat.get("memory_module", module), cat.get("memory_channel", channel), cat.get("accelerator", accelerator)
    if chassis is None:
        fits = [c for c in cat.chassis.values() if m.technology in cat.get("cpu", c.cpu).persistent_memory]
        if not fits:
            raise CatalogError(f"no chassis in the catalog has a CPU that supports {m.technology} ({m.name})")
        chassis = fits[0].name
    c = cat.get("chassis", chassis)
    cpu = cat.get("cpu", c.cpu)
    if m.technology not in cpu.persistent_memory:
        supported = [x.name for x in cat.chassis.values() if m.technology in cat.get("cpu", x.cpu).persistent_memory]
        raise ConfigError(f"{m.name} ({m.technology}) needs a platform that supports it; {c.name}'s {cpu.name} "
                          f"supports {cpu.persistent_memory or 'none'}; chassis that do: {', '.join(supported)}")
    _fits(channels, c.cpu_sockets * cpu.memory_channels, "memory channels", f"chassis {c.name}")
    _fits(modules, 2 * channels, "modules (at most 2 per channel)", f"{channels} channel(s)")
    cat.get("nic", nics.model)  # an unknown NIC model is an error here, not later
    _fits(nics.count + 1, c.nic_slots, "nics + the accelerator card", f"chassis {c.name}")
    bus_gb = a.pcie_lanes * PCIE_GB_PER_S_PER_LANE[a.pcie_gen] if a.bus == "pcie" else a.memory_gb_per_s
    res = [
        Resource(name="media", rate=m.read_gb_per_s * 1e9, count=modules * boxes, watts=m.watts,
                 idle_watts=m.idle_watts, cost=m.price_usd, memory_bytes=m.capacity_gb * 1e9, group="storage"),
        Resource(name="memory_channel", rate=ch.gb_per_s * 1e9, count=channels * boxes, group="storage"),
        Resource(name="storage_cpu", rate=cpu.core_speed, count=c.cpu_sockets * cpu.cores * boxes, unit="core-s",
                 watts=cpu.watts / cpu.cores, idle_watts=cpu.idle_watts / cpu.cores, cost=cpu.price_usd / cpu.cores,
                 group="storage"),
        Resource(name="storage_accel", rate=1.0, count=boxes, unit="device-s", watts=a.watts, idle_watts=a.idle_watts,
                 cost=a.price_usd, memory_bytes=a.memory_gb * 1e9, group="storage"),
        Resource(name="accel_bus", rate=bus_gb * 1e9, count=boxes, group="storage"),
        _nics(cat, nics, boxes),
        Resource(name="chassis", rate=1.0, count=boxes, unit="box", watts=c.watts, idle_watts=c.idle_watts,
                 cost=c.price_usd, rack_units=c.rack_units, group="storage"),
    ]
    dev = Device(resource="storage_accel", count=boxes, train_macs_per_s=a.macs_per_s(True) if a.fp16_tflops else 0.0,
                 infer_macs_per_s=a.macs_per_s(False), infer_bytes_per_param=a.bytes_per_param(False),
                 memory_bytes=a.memory_gb * 1e9, bus="accel_bus")
    return System(
        name="nvdimm",
        description=f"NVDIMM appliance: {boxes} x {modules} x {m.name} on {channels} x {ch.name} ({c.name}), "
                    f"{a.name} on {'PCIe Gen%d x%d' % (a.pcie_gen, a.pcie_lanes) if a.bus == 'pcie' else a.bus}",
        resources=res + tier.resources(cat), path=["media", "memory_channel"], read=["media", "memory_channel"],
        storage=Side(cpu="storage_cpu", accel=dev), compute=tier.side(cat), link=["ethernet", "compute_nic"],
        storage_rack_units=c.rack_units * boxes, boxes=boxes, **_common(tier, cat),
    )


ARCHITECTURES = {"host_gpu_server": host_gpu_server, "smart_ebof": smart_ebof, "smart_nvme_2u": smart_nvme_2u,
                 "nvdimm": nvdimm}
#: the seed deck's three 2U designs
SEED_DESIGNS = {k: ARCHITECTURES[k] for k in ("smart_ebof", "smart_nvme_2u", "nvdimm")}
#: the seed deck's configuration of each (for its per-2U figures): 3 x 100 GbE, 24 Gen4 x4 drives at 6.4 GB/s,
#: NVDIMM-N on one DDR4-2400 channel
SEED_CONFIG: dict[str, dict] = {"smart_ebof": {}, "smart_nvme_2u": {"drive": "csd-gen4-arm", "drives": 24},
                                "nvdimm": {}}

#: template parameter grids swept for the Pareto plots (the defaults above are one point of each)
VARIANTS: dict[str, list[dict]] = {
    "host_gpu_server": [{"drives": d} for d in (2, 4, 8)],
    "smart_ebof": [{"drives": d, "nics": Nics(k, n)} for d in (8, 16, 24) for k, n in ((3, "100gbe"), (3, "200gbe"))],
    "smart_nvme_2u": [{"drive": c, "drives": d} for c, d in (("orin-e3s", 8), ("orin-e3s", 16), ("smartssd", 12),
                                                               ("smartssd", 24), ("newport", 24),
                                                               ("csd-gen4-arm", 24))],
    "nvdimm": [{"module": m, "modules": k, "channels": ch}
               for m, k, ch in (("nvdimm-n-32", 2, 1), ("pmem-100-256", 2, 1), ("pmem-100-256", 12, 6))],
}

