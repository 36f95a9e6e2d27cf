"""``nearstore design --validate``: the model against published figures, computed from component specs.

Each check prints the published figure, the model's prediction, the error and
its tolerance, and says what it validates and whether the catalog was fitted
to it:

- the seed deck's per-2U storage<->compute bandwidths (38 / 150 / 19 GB/s),
  from the parts of the seed's configuration (within 5%): arithmetic of parts;
- MLPerf Training v3.0 ResNet-50 on one DGX H100 (8 x H100): images/s from
  the published time to train; the model's H100 rate comes from A100's
  measured MLPerf v2.0 rate and a memory-bound scaling, not from this result
  (within 25%);
- MLPerf Storage v1.0 per-accelerator demands of ResNet-50 and 3D U-Net on
  H100 (samples/s and bytes/s), through the model with our workloads' sample
  sizes (within 5%);
- a published MLPerf Storage v1.0 submission: how many emulated H100s DDN's
  AI400X2 Turbo fed on 3D U-Net (36), predicted from what the same system
  delivered on ResNet-50 (within 15%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nearstore.design.archs import SEED_CONFIG, SEED_DESIGNS, ComputeTier, Nics, Side, System, \
    host_gpu_server, storage_compute_bandwidth
from nearstore.design.catalog import Catalog
from nearstore.design.designer import accelerators_fed, assess, emulated_demand
from nearstore.design.workloads import load_workloads
from nearstore.model.core import Resource

__all__ = ["Check", "SEED_FIGURES_GB_PER_S", "validate", "appliance"]

#: published figures (the seed deck, "Design the right storage systems to accelerate deep learning")
SEED_FIGURES_GB_PER_S = {"smart_ebof": 38.0, "smart_nvme_2u": 150.0, "nvdimm": 19.0}

#: MLPerf Training v3.0 closed, NVIDIA dgxh100_ngc23.04_mxnet (1 x DGX H100), ResNet-50 result_0: run_start
#: 1683388931198 ms, run_stop 1683389747255 ms, 35 epochs of 1,281,167 images to 75.9% top-1
MLPERF_TRAINING_H100 = {
    "url": "https://github.com/mlcommons/training_results_v3.0/blob/main/NVIDIA/results/dgxh100_ngc23.04_mxnet/"
           "resnet/result_0.txt",
    "seconds": (1683389747255 - 1683388931198) / 1000, "epochs": 35, "images": 1281167,
}
#: MLPerf Storage v1.0, DDN AI400X2 Turbo, 3D U-Net on emulated H100: 36 accelerators at AU >= 90%
MLPERF_STORAGE_DDN = {
    "url": "https://github.com/mlcommons/storage_results_v1.0/blob/main/Closed/DDN/results/"
           "AI400X2T_24x14TiB_nvme_8xNDR200_18clients/unet3d-h100/runs/mlperf_storage_report.json",
    "accelerators": 36,
}


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
    def signed_error(self) -> float:
        return (self.computed - self.expected) / self.expected

    @property
    def ok(self) -> bool:
        return math.isfinite(self.computed) and self.error <= self.tolerance


def appliance(cat: Catalog, *, name: str = "ddn-ai400x2t", tier: ComputeTier | None = None, boxes: int = 1) -> System:
    """A storage appliance as its measured read rate (for published-benchmark checks)."""
    tier = tier or ComputeTier()
    a = cat.get("appliance", name)
    return System(
        name=f"appliance:{a.name}", description=f"{boxes} x {a.name}: {a.read_gb_per_s:g} GB/s read each",
        resources=[Resource(name="media", rate=a.read_gb_per_s * 1e9, count=boxes, memory_bytes=float("inf"),
                            group="storage"), *tier.resources(cat)],
        path=["media"], read=["media"], storage=Side(), compute=tier.side(cat), link=["compute_nic"],
        storage_rack_units=a.rack_units * boxes, boxes=boxes, servers=tier.servers(cat),
    )


def _mlperf_training(cat: Catalog) -> Check:
    wl = load_workloads()["resnet50-train"]
    pub = MLPERF_TRAINING_H100
    published = pub["epochs"] * pub["images"] / pub["seconds"]
    a = assess(host_gpu_server(cat, tier=ComputeTier(gpus=8, gpu="h100")), wl)
    return Check("MLPerf Training v3.0 ResNet-50, 1 x DGX H100: images/s", published, a.samples_per_s, 0.25,
                 f"published: {pub['epochs']} epochs x {pub['images']:,} images in {pub['seconds']:.0f} s "
                 f"({pub['url']}); predicted: host_gpu_server, 8 x h100, bound by {a.bottleneck}, preprocessing on "
                 f"{a.compute_preprocess}; h100 mfu is derived from A100's MLPerf v2.0 rate, not fitted here")


def _mlperf_demand(cat: Catalog, accel: str, workload: str) -> list[Check]:
    wl = load_workloads()[workload]
    d = emulated_demand(cat, accel)
    macs = sum(ws.macs for ws in wl.stages if ws.kind == "model")
    dev = ComputeTier(gpus=1, gpu=accel, model_macs=macs).device(cat)
    samples = dev.train_macs_per_s / macs  # what one emulated accelerator consumes, through the model's device
    src = f"published: {d['source']} ({cat.get('emulated_accelerator', accel).sources['batch, step_s, record_bytes']})"
    return [Check(f"MLPerf Storage v1.0 {workload} {accel}: samples/s per accelerator", d["samples_per_s"], samples,
                  0.05, src),
            Check(f"MLPerf Storage v1.0 {workload} {accel}: MB/s per accelerator", d["bytes_per_s"] / 1e6,
                  samples * wl.sample_bytes / 1e6, 0.05,
                  f"predicted with our workload's {wl.sample_bytes:,.0f} B per sample (MLPerf's record: "
                  f"{d['record_bytes']:,} B)")]


def _mlperf_storage_system(cat: Catalog) -> Check:
    wl = load_workloads()["unet3d-train"]
    tier = ComputeTier(nics=Nics(2, "400gbe"))
    fed = accelerators_fed(appliance, cat, wl, accelerator="h100-mlperf-unet3d", tier=tier)
    a = cat.get("appliance", "ddn-ai400x2t")
    return Check("MLPerf Storage v1.0 DDN AI400X2 Turbo, 3D U-Net: emulated H100s fed at AU >= 90%",
                 MLPERF_STORAGE_DDN["accelerators"], float(fed["fed"]), 0.15,
                 f"published: {MLPERF_STORAGE_DDN['url']}; predicted from the {a.read_gb_per_s:g} GB/s the same "
                 f"system delivered on ResNet-50 ({a.sources['read_gb_per_s'].split(' ')[0]}), limited beyond by "
                 f"{fed.get('limited_by')}")


def validate(cat: Catalog) -> list[Check]:
    checks = []
    for name, expected in SEED_FIGURES_GB_PER_S.items():
        design = SEED_DESIGNS[name](cat, **SEED_CONFIG[name])
        bw, limit = storage_compute_bandwidth(design)
        checks.append(Check(f"seed deck {name}: storage<->compute GB/s per 2U", expected, bw / 1e9, 0.05,
                            f"{design.description}; limited by {limit} (arithmetic of parts)"))
    checks.append(_mlperf_training(cat))
    checks += _mlperf_demand(cat, "h100-mlperf", "resnet50-train")
    checks += _mlperf_demand(cat, "h100-mlperf-unet3d", "unet3d-train")
    checks.append(_mlperf_storage_system(cat))
    return checks
