"""Architecture templates over the catalog, evaluated with the one performance model.

Each template builds the resources on the path between storage and compute
for one 2U system; the bandwidth between them is the model's throughput for a
stage that moves one byte across that path (its bottleneck names the part
that limits it). The seed's three designs:

- ``smart_ebof``: an NVMe-oF EBOF, Ethernet SSDs behind a switch, shared by
  several orchestrators over its uplinks (3 x 100 GbE in a 2U).
- ``smart_nvme_2u``: a 2U appliance of computational NVMe drives, an
  accelerator per drive, so storage-to-compute runs at the drives' rate.
- ``nvdimm``: an accelerator on the memory bus next to NVDIMM-N, load/store
  access over one DDR4-2400 channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from nearstore.core.errors import ConfigError
from nearstore.design.catalog import Catalog, NvmeSsd
from nearstore.model.core import Resource, Stage, evaluate

__all__ = ["Design", "smart_ebof", "smart_nvme_2u", "nvdimm", "storage_compute_bandwidth", "SEED_DESIGNS"]


@dataclass(frozen=True)
class Design:
    name: str
    description: str
    resources: list[Resource]
    path: list[str]  # resources a byte crosses between storage and compute
    rack_units: int


def storage_compute_bandwidth(design: Design) -> tuple[float, str]:
    """Bytes/s between storage and compute, and the resource that limits it."""
    ev = evaluate(design.resources, [Stage(name="move one byte", demands={r: 1.0 for r in design.path})])
    return ev.samples_per_s, ev.bottleneck or ""


def _fits(count: int, limit: int, what: str, chassis: str) -> None:
    if not 1 <= count <= limit:
        raise ConfigError(f"{what} must be in 1..{limit} for chassis {chassis} (got {count})")


def _media(d: NvmeSsd, drives: int) -> Resource:
    return Resource(name="media", rate=d.read_gb_per_s * 1e9, count=drives, watts=d.watts, cost=d.price_usd)


def smart_ebof(cat: Catalog, *, drive: str = "gen4-x4", drives: int = 24, nic: str = "100gbe", nics: int = 3,
               chassis: str = "2u-24-bay") -> Design:
    d, n, c = cat.get("nvme_ssd", drive), cat.get("nic", nic), cat.get("chassis", chassis)
    _fits(drives, c.drive_bays, "drives", c.name)
    _fits(nics, c.nic_slots, "nics", c.name)
    return Design(
        name="smart_ebof",
        description=f"NVMe-oF EBOF: {drives} x {d.name} behind {nics} x {n.name} uplinks",
        resources=[
            _media(d, drives),
            Resource(name="ethernet", rate=n.gb_per_s * 1e9, count=nics, watts=n.watts, cost=n.price_usd),
        ],
        path=["media", "ethernet"],
        rack_units=c.rack_units,
    )


def smart_nvme_2u(cat: Catalog, *, drive: str = "gen4-x4", drives: int = 24, chassis: str = "2u-24-bay") -> Design:
    d, c = cat.get("nvme_ssd", drive), cat.get("chassis", chassis)
    _fits(drives, c.drive_bays, "drives", c.name)
    return Design(
        name="smart_nvme_2u",
        description=f"NVMe smart 2U: {drives} x {d.name}, an accelerator per drive",
        resources=[_media(d, drives)],
        path=["media"],
        rack_units=c.rack_units,
    )


def nvdimm(cat: Catalog, *, channel: str = "ddr4-2400", channels: int = 1, chassis: str = "2u-24-bay") -> Design:
    m, c = cat.get("memory_channel", channel), cat.get("chassis", chassis)
    _fits(channels, c.memory_channels, "memory channels", c.name)
    return Design(
        name="nvdimm",
        description=f"NVDIMM appliance: accelerator on {channels} x {m.name} channel(s), load/store access",
        resources=[Resource(name="memory_channel", rate=m.gb_per_s * 1e9, count=channels)],
        path=["memory_channel"],
        rack_units=c.rack_units,
    )


SEED_DESIGNS = {"smart_ebof": smart_ebof, "smart_nvme_2u": smart_nvme_2u, "nvdimm": nvdimm}
