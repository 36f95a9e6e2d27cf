"""Architecture templates over the catalog, evaluated with the one performance model.

A template builds a ``System``: the resources of a storage system plus the
compute tier it feeds, which resources run storage-side work (``storage``)
and compute-side work (``compute``), what a byte crosses between them
(``link``), and the path whose bandwidth is the storage<->compute figure per
2U. Templates (users can write their own: any function returning a System):

- ``host_gpu_server``: a host-centric GPU server with local NVMe; all work on
  the host CPUs and GPUs.
- ``smart_ebof``: an NVMe-oF EBOF (Ethernet SSDs behind a switch, a DPU's
  cores for storage-side work) shared by the orchestrators over 3 x 100 GbE.
- ``smart_nvme_2u``: a 2U appliance of computational NVMe drives, cores and an
  accelerator per drive, so storage-side work sees the drives' full rate.
- ``nvdimm``: an accelerator on the memory bus next to NVDIMM-N, load/store
  access over one DDR4-2400 channel.

Every storage design feeds the same compute tier (``ComputeTier``: GPUs in
servers with host CPUs), so designs are compared on equal terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nearstore.core.errors import ConfigError
from nearstore.design.catalog import Catalog
from nearstore.model.core import Resource, Stage, evaluate

__all__ = ["Side", "System", "ComputeTier", "host_gpu_server", "smart_ebof", "smart_nvme_2u", "nvdimm",
           "storage_compute_bandwidth", "ARCHITECTURES", "SEED_DESIGNS", "VARIANTS"]


@dataclass(frozen=True)
class Side:
    """Where a side runs cpu stages and model stages (resource names; None: it cannot)."""

    cpu: str | None = None
    accel: str | None = None
    bytes_per_param: float = 2.0


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


@dataclass(frozen=True, kw_only=True)
class ComputeTier:
    """The training/inference servers every design feeds."""

    gpus: int = 8
    gpu: str = "h100"
    server: str = "8gpu-server"
    cpu: str = "xeon-8480"
    nic: str = "200gbe"
    nics_per_server: int = 4
    emulated_macs: float | None = None  # with an MLPerf emulated accelerator: the model's MACs per sample

    def _gpu(self, cat: Catalog) -> Resource:
        if self.emulated_macs is not None:  # a fixed step time per batch, as MLPerf Storage emulates it
            em = cat.get("emulated_accelerator", self.gpu)
            return Resource(name="gpu", rate=em.samples_per_s * self.emulated_macs, count=self.gpus, unit="MAC",
                            memory_bytes=float("inf"))
        g = cat.get("accelerator", self.gpu)
        return Resource(name="gpu", rate=g.macs_per_s, count=self.gpus, unit="MAC", watts=g.watts, cost=g.price_usd,
                        memory_bytes=g.memory_gb * 1e9)

    def servers(self, cat: Catalog) -> int:
        if self.gpus < 1:
            raise ConfigError(f"gpus must be >= 1 (got {self.gpus})")
        return math.ceil(self.gpus / cat.get("gpu_server", self.server).gpu_slots)

    def resources(self, cat: Catalog) -> list[Resource]:
        s, c, n = cat.get("gpu_server", self.server), cat.get("cpu", self.cpu), cat.get("nic", self.nic)
        servers = self.servers(cat)
        cores = servers * s.cpu_sockets * c.cores
        return [
            self._gpu(cat),
            Resource(name="host_cpu", rate=c.core_speed, count=cores, unit="core-s", watts=c.watts / c.cores,
                     cost=c.price_usd / c.cores),
            Resource(name="compute_nic", rate=n.gb_per_s * 1e9, count=servers * self.nics_per_server,
                     watts=n.watts, cost=n.price_usd),
            Resource(name="gpu_servers", rate=1.0, count=servers, unit="server", watts=s.base_watts,
                     cost=s.price_usd, rack_units=s.rack_units),
        ]

    def side(self, cat: Catalog) -> Side:
        bpp = 2.0 if self.emulated_macs is not None else cat.get("accelerator", self.gpu).bytes_per_param
        return Side(cpu="host_cpu", accel="gpu", bytes_per_param=bpp)


def storage_compute_bandwidth(system: System) -> tuple[float, str]:
    """Bytes/s between storage and compute per system, and the resource that limits it."""
    ev = evaluate(system.resources, [Stage(name="move one byte", demands={r: 1.0 for r in system.path})])
    return ev.samples_per_s, ev.bottleneck or ""


def _fits(count: int, limit: int, what: str, chassis: str) -> None:
    if not 1 <= count <= limit:
        raise ConfigError(f"{what} must be in 1..{limit} for {chassis} (got {count})")


def _uplinks(cat: Catalog, nic: str, nics: int) -> Resource:
    n = cat.get("nic", nic)
    return Resource(name="ethernet", rate=n.gb_per_s * 1e9, count=nics, watts=n.watts, cost=n.price_usd)


def host_gpu_server(cat: Catalog, *, drive: str = "gen4-x4", drives: int = 8,
                    tier: ComputeTier | None = None) -> System:
    tier = tier or ComputeTier()
    d, s = cat.get("nvme_ssd", drive), cat.get("gpu_server", tier.server)
    _fits(drives, s.drive_bays, "drives", f"server {s.name}")
    n = drives * tier.servers(cat)  # local drives in every server: storage scales with compute
    return System(
        name="host_gpu_server",
        description=f"host-centric: {tier.gpus} x {tier.gpu} with {drives} x {d.name} local NVMe per server",
        resources=[Resource(name="media", rate=d.read_gb_per_s * 1e9, count=n, watts=d.watts, cost=d.price_usd,
                            memory_bytes=d.capacity_tb * 1e12), *tier.resources(cat)],
        path=["media"], read=["media"], storage=Side(), compute=tier.side(cat), link=[], storage_rack_units=0,
    )


def smart_ebof(cat: Catalog, *, drive: str = "gen4-x4", drives: int = 24, nic: str = "100gbe",
               enclosure: str = "ebof-24", tier: ComputeTier | None = None) -> System:
    tier = tier or ComputeTier()
    d, e = cat.get("nvme_ssd", drive), cat.get("ebof", enclosure)
    _fits(drives, e.drive_bays, "drives", f"enclosure {e.name}")
    res = [Resource(name="media", rate=d.read_gb_per_s * 1e9, count=drives, watts=d.watts, cost=d.price_usd,
                    memory_bytes=d.capacity_tb * 1e12),
           _uplinks(cat, nic, e.uplinks),
           Resource(name="enclosure", rate=1.0, unit="box", watts=e.watts, cost=e.price_usd, rack_units=e.rack_units)]
    if e.dpu_cores:
        res.append(Resource(name="storage_cpu", rate=e.core_speed, count=e.dpu_cores, unit="core-s"))
    return System(
        name="smart_ebof",
        description=f"NVMe-oF EBOF: {drives} x {d.name} behind {e.uplinks} x {nic} uplinks, "
                    f"{e.dpu_cores} DPU cores",
        resources=res + tier.resources(cat), path=["media", "ethernet"], read=["media"],
        storage=Side(cpu="storage_cpu" if e.dpu_cores else None), compute=tier.side(cat),
        link=["ethernet", "compute_nic"], storage_rack_units=e.rack_units,
    )


def smart_nvme_2u(cat: Catalog, *, drive: str = "csd-gen4-npu", drives: int = 24, nic: str = "100gbe", nics: int = 3,
                  chassis: str = "2u-24-bay", tier: ComputeTier | None = None) -> System:
    tier = tier or ComputeTier()
    d, c = cat.get("computational_drive", drive), cat.get("chassis", chassis)
    _fits(drives, c.drive_bays, "drives", f"chassis {c.name}")
    _fits(nics, c.nic_slots, "nics", f"chassis {c.name}")
    res = [Resource(name="media", rate=d.read_gb_per_s * 1e9, count=drives, watts=d.watts, cost=d.price_usd,
                    memory_bytes=d.capacity_tb * 1e12),
           _uplinks(cat, nic, nics),
           Resource(name="chassis", rate=1.0, unit="box", rack_units=c.rack_units)]
    if d.cores:
        res.append(Resource(name="storage_cpu", rate=d.core_speed, count=drives * d.cores, unit="core-s"))
    if d.accel_tops:
        res.append(Resource(name="storage_accel", rate=d.accel_tops * 1e12 / 2 * d.accel_mfu, count=drives,
                            unit="MAC", memory_bytes=d.accel_memory_gb * 1e9))
    return System(
        name="smart_nvme_2u",
        description=f"NVMe smart 2U: {drives} x {d.name} (compute per drive), {nics} x {nic} uplinks",
        resources=res + tier.resources(cat), path=["media"], read=["media"],
        storage=Side(cpu="storage_cpu" if d.cores else None, accel="storage_accel" if d.accel_tops else None,
                     bytes_per_param=1.0),
        compute=tier.side(cat), link=["ethernet", "compute_nic"], storage_rack_units=c.rack_units,
    )


def nvdimm(cat: Catalog, *, module: str = "nvdimm-n-32", modules: int = 2, channel: str = "ddr4-2400",
           channels: int = 1, accelerator: str = "alveo-u250", cpu: str = "epyc-9654", nic: str = "100gbe",
           nics: int = 3, chassis: str = "2u-24-bay", tier: ComputeTier | None = None) -> System:
    tier = tier or ComputeTier()
    m, ch, c = cat.get("memory_module", module), cat.get("memory_channel", channel), cat.get("chassis", chassis)
    a, p = cat.get("accelerator", accelerator), cat.get("cpu", cpu)
    _fits(channels, c.memory_channels, "memory channels", f"chassis {c.name}")
    _fits(modules, 2 * channels, "modules (2 per channel)", f"chassis {c.name}")
    return System(
        name="nvdimm",
        description=f"NVDIMM appliance: {modules} x {m.name} on {channels} x {ch.name}, {a.name} on the memory bus",
        resources=[
            Resource(name="media", rate=m.read_gb_per_s * 1e9, count=modules, watts=m.watts, cost=m.price_usd,
                     memory_bytes=m.capacity_gb * 1e9),
            Resource(name="memory_channel", rate=ch.gb_per_s * 1e9, count=channels),
            Resource(name="storage_cpu", rate=p.core_speed, count=p.cores, unit="core-s", watts=p.watts / p.cores,
                     cost=p.price_usd / p.cores),
            Resource(name="storage_accel", rate=a.macs_per_s, unit="MAC", watts=a.watts, cost=a.price_usd,
                     memory_bytes=a.memory_gb * 1e9),
            _uplinks(cat, nic, nics),
            Resource(name="chassis", rate=1.0, unit="box", rack_units=c.rack_units),
            *tier.resources(cat),
        ],
        path=["media", "memory_channel"], read=["media", "memory_channel"],
        storage=Side(cpu="storage_cpu", accel="storage_accel", bytes_per_param=a.bytes_per_param),
        compute=tier.side(cat), link=["ethernet", "compute_nic"], storage_rack_units=c.rack_units,
    )


ARCHITECTURES = {"host_gpu_server": host_gpu_server, "smart_ebof": smart_ebof, "smart_nvme_2u": smart_nvme_2u,
                 "nvdimm": nvdimm}
#: the seed deck's three 2U designs
SEED_DESIGNS = {k: ARCHITECTURES[k] for k in ("smart_ebof", "smart_nvme_2u", "nvdimm")}

#: template parameter grids swept for the Pareto plots (the defaults above are one point of each)
VARIANTS: dict[str, list[dict]] = {
    "host_gpu_server": [{"drives": d} for d in (2, 4, 8)],
    "smart_ebof": [{"drives": d, "nic": n} for d in (8, 16, 24) for n in ("100gbe", "200gbe")],
    "smart_nvme_2u": [{"drives": d, "drive": c} for d in (8, 16, 24)
                      for c in ("csd-gen4-arm", "csd-gen4-fpga", "csd-gen4-npu")],
    "nvdimm": [{"module": m, "modules": k} for m in ("nvdimm-n-32", "pmem-256") for k in (1, 2)],
}
