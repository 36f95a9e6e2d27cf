"""Workloads: what one training or inference sample demands, stage by stage.

A workload reads ``sample_bytes`` per sample from storage, then runs its
stages in order: ``cpu`` stages (seconds of the reference core, output bytes)
and ``model`` stages (MACs, parameters, activations, batch). Loaded from the
packaged ``data/workloads.yaml`` plus user files, validated like the catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nearstore.design.catalog import CatalogError, read_yaml_sources, validate_item

__all__ = ["WorkloadStage", "Workload", "load_workloads"]

#: bytes of training state per parameter with mixed precision and Adam: fp16 weights and gradients,
#: fp32 master weights and two moments (2 + 2 + 4 + 4 + 4)
TRAIN_BYTES_PER_PARAM = 16


class WorkloadStage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: Literal["cpu", "model"]
    out_bytes: float = Field(ge=0)
    source: str = Field(min_length=3)
    core_s: float = Field(0.0, ge=0, description="cpu: reference-core seconds per sample")
    forward_gmacs: float = Field(0.0, ge=0)
    passes: float = Field(1.0, gt=0, description="model: forward-pass equivalents per sample (~3 to train)")
    params_m: float = Field(0.0, ge=0)
    train: bool = False
    activation_mb: float = Field(0.0, ge=0, description="model: activation memory per sample in the batch")
    batch: int = Field(1, ge=1)

    @property
    def macs(self) -> float:
        return self.forward_gmacs * 1e9 * self.passes

    def resident_bytes(self, bytes_per_param: float) -> float:
        """Memory this stage needs on the device that runs it (parameters, optimizer state, activations)."""
        per_param = TRAIN_BYTES_PER_PARAM if self.train else bytes_per_param
        return self.params_m * 1e6 * per_param + self.activation_mb * 1e6 * self.batch


class Workload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str
    dataset_samples: int = Field(ge=1)
    sample_bytes: float = Field(gt=0)
    epochs: int = Field(ge=1)
    source: str = Field(min_length=3)
    stages: list[WorkloadStage] = Field(min_length=1)

    @property
    def dataset_bytes(self) -> float:
        return self.dataset_samples * self.sample_bytes


def load_workloads(*paths: str | Path, builtin: bool = True) -> dict[str, Workload]:
    """The packaged workloads (unless ``builtin=False``) plus ``paths`` (a YAML list each); later override."""
    out: dict[str, Workload] = {}
    for origin, doc in read_yaml_sources("workloads.yaml", paths, builtin=builtin, what="workload"):
        if not isinstance(doc or [], list):
            raise CatalogError(f"{origin}: a workload file is a list of workloads")
        for i, item in enumerate(doc or []):
            w = validate_item(Workload, item, origin=origin, what="workload", index=i)
            out[w.name] = w
    return out
