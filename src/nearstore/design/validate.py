"""``nearstore design --validate``: the model against published figures, computed from component specs.

The seed's figures for storage-to-compute bandwidth per 2U: NVMe-oF EBOF
about 38 GB/s, NVMe smart 2U about 150 GB/s, NVDIMM about 19 GB/s. Each check
computes the figure from the catalog through the model and passes within 5%.
"""

from __future__ import annotations

from dataclasses import dataclass

from nearstore.design.archs import SEED_DESIGNS, storage_compute_bandwidth
from nearstore.design.catalog import Catalog

__all__ = ["Check", "SEED_FIGURES_GB_PER_S", "validate"]

#: published figures (the seed deck, "Design the right storage systems to accelerate deep learning")
SEED_FIGURES_GB_PER_S = {"smart_ebof": 38.0, "smart_nvme_2u": 150.0, "nvdimm": 19.0}


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
    return checks
