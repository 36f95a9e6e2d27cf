"""The designer: a hardware catalog, workloads and architecture templates evaluated with ``nearstore.model``.

- ``catalog``: validated, sourced component specs (YAML).
- ``workloads``: per-sample stage demands of the workloads (YAML).
- ``archs``: templates that turn catalog parts into a ``System`` (resources, sides, link).
- ``designer``: every split of a workload on a system, the best one, accelerators fed, Pareto, verdict.
- ``validate``: the model against published figures (``nearstore design --validate``).
"""

from nearstore.design.archs import ARCHITECTURES, SEED_DESIGNS, ComputeTier, Side, System, storage_compute_bandwidth
from nearstore.design.catalog import Catalog, CatalogError, load_catalog
from nearstore.design.designer import (Assessment, accelerators_fed, assess, emulated_demand, pareto, splits,
                                       stages_for, verdict)
from nearstore.design.validate import SEED_FIGURES_GB_PER_S, Check, validate
from nearstore.design.workloads import Workload, WorkloadStage, load_workloads

__all__ = ["ARCHITECTURES", "SEED_DESIGNS", "ComputeTier", "Side", "System", "storage_compute_bandwidth", "Catalog",
           "CatalogError", "load_catalog", "Assessment", "accelerators_fed", "assess", "emulated_demand", "pareto",
           "splits", "stages_for", "verdict", "SEED_FIGURES_GB_PER_S", "Check", "validate", "Workload",
           "WorkloadStage", "load_workloads"]
