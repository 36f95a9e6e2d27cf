"""Workloads: what one training or inference sample demands, stage by stage.

A workload reads ``sample_bytes`` per sample from storage, then runs its
stages in order: ``cpu`` stages (seconds of the reference server core, output
bytes; a JPEG stage may instead run on the GPU server's JPEG decoder and GPU,
as DALI does) and ``model`` stages (MACs, parameters, activations per sample
in the batch per device, optimizer). Loaded from the packaged
``data/workloads.yaml`` plus user files, validated like the catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nearstore.design.catalog import CatalogError, read_yaml_sources, validate_item
from nearstore.model.placement import StageCost

__all__ = ["GpuOffload", "WorkloadStage", "Workload", "load_workloads", "TRAIN_BYTES_PER_PARAM"]

#: bytes of training state per parameter with mixed precision (AMP): fp32 master weights and fp32 gradients
#: (4 + 4), an fp16 working copy (2), and the optimizer's fp32 state: SGD momentum 4, Adam two moments 8
TRAIN_BYTES_PER_PARAM = {"sgd": 14, "adam": 18}


class GpuOffload(BaseModel):
    """What a JPEG stage costs when DALI runs it on the GPU server (hardware decoder, CUDA, host residue)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    aug_gmacs: float = Field(ge=0, description="GPU work of crop/resize/flip/normalize, in MAC-equivalents")
    cuda_decode_gmacs: float = Field(ge=0, description="GPU work of a decode on CUDA cores (no hardware decoder)")
    host_core_s: float = Field(ge=0, description="host core-seconds per image with the hardware decoder")
    huffman_core_s: float = Field(ge=0, description="host core-seconds per image when CUDA decodes (Huffman on CPU)")
    source: str = Field(min_length=3)


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
    activation_mb: float = Field(0.0, ge=0, description="model: fp16 activation memory per sample in the batch")
    batch: int = Field(1, ge=1, description="model: samples per device per step")
    optimizer: Literal["sgd", "adam"] = "sgd"
    workspace_gb: float = Field(0.0, ge=0, description="model: framework context and kernel workspace per device")
    gpu: GpuOffload | None = None

    @property
    def macs(self) -> float:
        return self.forward_gmacs * 1e9 * self.passes

    @property
    def where(self) -> tuple[str, ...]:
        """Where it can run, in the ops' vocabulary (``Spec.where``): cpu stages on CPUs, model stages on
        accelerators."""
        return ("cpu",) if self.kind == "cpu" else ("accelerator",)

    def cost(self, bytes_per_param: float) -> StageCost:
        """This stage in the one vocabulary the planner shares (``model.StageCost``), on a device that holds
        parameters in ``bytes_per_param`` bytes."""
        per_param = TRAIN_BYTES_PER_PARAM[self.optimizer] if self.train else bytes_per_param
        return StageCost(name=self.name, out_bytes=self.out_bytes, where=self.where, core_s=self.core_s,
                         macs=self.macs, param_bytes=self.params_m * 1e6 * per_param + self.workspace_gb * 1e9,
                         resident_bytes=self.activation_mb * 1e6, batch=self.batch)

    def resident_bytes(self, bytes_per_param: float) -> float:
        """Memory this stage needs on one device: parameters (training state with AMP), activations, workspace."""
        per_param = TRAIN_BYTES_PER_PARAM[self.optimizer] if self.train else bytes_per_param
        return self.params_m * 1e6 * per_param + self.activation_mb * 1e6 * self.batch + self.workspace_gb * 1e9

    def gradient_bytes(self) -> float:
        """Bytes one data-parallel all-reduce moves per step and device (fp16 gradients; 0 when not training)."""
        return self.params_m * 1e6 * 2 if self.train else 0.0


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

    def with_dataset(self, samples: int) -> "Workload":
        """The same workload over ``samples`` samples (to size a dataset larger than host memory)."""
        return self.model_copy(update={"dataset_samples": samples})

    def with_core_s(self, core_s: float) -> "Workload":
        """The same workload with its first cpu stage costing ``core_s`` reference-core seconds per sample."""
        stages = list(self.stages)
        for i, st in enumerate(stages):
            if st.kind == "cpu":
                stages[i] = st.model_copy(update={"core_s": core_s})
                break
        return self.model_copy(update={"stages": stages})


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
