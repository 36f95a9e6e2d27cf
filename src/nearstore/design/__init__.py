"""The designer: a hardware catalog and architecture templates evaluated with ``nearstore.model``.

Built so far: the catalog (validated, sourced), the seed's three 2U designs
and ``validate`` against the seed's bandwidth figures. Workloads, the design
table, plots and the planner are not built yet.
"""

from nearstore.design.archs import SEED_DESIGNS, Design, storage_compute_bandwidth
from nearstore.design.catalog import Catalog, CatalogError, load_catalog
from nearstore.design.validate import SEED_FIGURES_GB_PER_S, Check, validate

__all__ = ["SEED_DESIGNS", "Design", "storage_compute_bandwidth", "Catalog", "CatalogError", "load_catalog",
           "SEED_FIGURES_GB_PER_S", "Check", "validate"]
