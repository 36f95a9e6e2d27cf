"""``nearstore design --validate``: the model against published figures, computed from component specs.

- The seed's storage-to-compute bandwidth per 2U: NVMe-oF EBOF about 38 GB/s,
  NVMe smart 2U about 150 GB/s, NVDIMM about 19 GB/s (within 5%).
- MLPerf Storage's ResNet-50 per-accelerator demand: H100 emulation about
  1,786 samples/s and 205 MB/s, A100 about 920 samples/s (within 10%),
  computed from the emulated accelerators' batch, step time and record size.
"""

from __future__ import annotations

from dataclasses import dataclass

from nearstore.design.archs import SEED_DESIGNS, storage_compute_bandwidth
from nearstore.design.catalog import Catalog
from nearstore.design.designer import emulated_demand

__all__ = ["Check", "SEED_FIGURES_GB_PER_S", "validate"]

#: published figures (the seed deck, "Design the right storage systems to accelerate deep learning")
SEED_FIGURES_GB_PER_S = {"smart_ebof": 38.0, "smart_nvme_2u": 150.0, "nvdimm": 19.0}
#: MLPerf Storage ResNet-50 per-accelerator demand (issue #5): name -> (samples/s, MB/s or None)
MLPERF_DEMAND = {"h100-mlperf": (1786.0, 205.0), "a100-mlperf": (920.0, None)}


@dataclass(frozen=True)
class Check:
    name: str
    expected: float
    computed: float
    tolerance: float
    detail: str

    @property
    def error(self) -> float:
        return abs(self.computed - self.expected) / self.expected

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def validate(cat: Catalog) -> list[Check]:
    checks = []
    for name, expected in SEED_FIGURES_GB_PER_S.items():
        design = SEED_DESIGNS[name](cat)
        bw, limit = storage_compute_bandwidth(design)
        checks.append(Check(f"{name}: storage<->compute GB/s per 2U", expected, bw / 1e9, 0.05,
                            f"{design.description}; limited by {limit}"))
    for name, (samples, mb) in MLPERF_DEMAND.items():
        d = emulated_demand(cat, name)
        checks.append(Check(f"{name}: ResNet-50 samples/s per accelerator", samples, d["samples_per_s"], 0.10,
                            d["source"]))
        if mb is not None:
            checks.append(Check(f"{name}: ResNet-50 MB/s per accelerator", mb, d["bytes_per_s"] / 1e6, 0.10,
                                d["source"]))
    return checks
