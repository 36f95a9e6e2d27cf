"""The designer: a hardware catalog, workloads and architecture templates evaluated with ``nearstore.model``.

- ``catalog``: validated component specs, every figure with a URL or a stated assumption (YAML).
- ``workloads``: per-sample stage demands of the workloads (YAML).
- ``archs``: templates that turn catalog parts into a ``System`` (resources, sides, links, lanes, idle power).
- ``designer``: every placement of a workload on a system (first and later epochs), accelerators fed,
  boxes needed, Pareto, verdict.
- ``sensitivity``: how the verdict moves with mfu, the per-core preprocessing rate and prices (tornado).
- ``validate``: the model against published measurements (``nearstore design --validate``).
"""

from nearstore.design.archs import (ARCHITECTURES, SEED_CONFIG, SEED_DESIGNS, ComputeTier, Nics, Side, System,
                                    parse_nics, storage_compute_bandwidth)
from nearstore.design.catalog import Catalog, CatalogError, load_catalog
from nearstore.design.designer import (Assessment, Economics, accelerators_fed, assess, boxes_for, emulated_demand,
                                       pareto, resolve_accelerator, splits, stages_for, verdict)
from nearstore.design.validate import SEED_FIGURES_GB_PER_S, Check, validate
from nearstore.design.workloads import Workload, WorkloadStage, load_workloads

__all__ = ["ARCHITECTURES", "SEED_CONFIG", "SEED_DESIGNS", "ComputeTier", "Nics", "Side", "System", "parse_nics",
           "storage_compute_bandwidth", "Catalog", "CatalogError", "load_catalog", "Assessment", "Economics",
           "accelerators_fed", "assess", "boxes_for", "emulated_demand", "pareto", "resolve_accelerator", "splits",
           "stages_for", "verdict", "SEED_FIGURES_GB_PER_S", "Check", "validate", "Workload", "WorkloadStage",
           "load_workloads"]
