"""The designer: hand-computed designs, power by utilization, topology, page cache, accelerators fed, training."""

from __future__ import annotations

import pytest

from nearstore.core.errors import ConfigError
from nearstore.design import (ARCHITECTURES, ComputeTier, Nics, accelerators_fed, assess, boxes_for,
                              emulated_demand, load_catalog, load_workloads, parse_nics, pareto, splits, stages_for,
                              validate)
from nearstore.design.designer import _search
from nearstore.model import Resource, evaluate


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


@pytest.fixture(scope="module")
def wl():
    return load_workloads()


def test_hand_computed_host_design(cat, wl):
    """8 H100: 989 TFLOP/s x 0.132 / 2 / (3 x 3.9 GMAC) each; 112 host cores at 2.5 ms per image."""
    a = assess(ARCHITECTURES["host_gpu_server"](cat), wl["resnet50-train"])
    gpu = 8 * 989e12 * 0.132 / 2 / (3 * 3.9e9)
    assert a.samples_per_s == pytest.approx(gpu) and a.bottleneck == "gpu" and a.accelerator_util == pytest.approx(1)
    assert a.utilization["host_cpu"] == pytest.approx(gpu * 0.0025 / 112, rel=1e-3)
    assert a.epoch_s == pytest.approx(1281167 / gpu)
    assert a.train_s == pytest.approx(a.epoch_s + 89 * 1281167 / a.later_samples_per_s)
    # slower cores: the host CPUs bind, and DALI on the GPUs' JPEG decoders takes over the preprocessing
    slow = assess(ARCHITECTURES["host_gpu_server"](cat), wl["resnet50-train"].with_core_s(0.005))
    assert slow.samples_per_s == pytest.approx(gpu, rel=0.03) and "GPUs" in slow.compute_preprocess
    cpu_only = assess(ARCHITECTURES["host_gpu_server"](cat, tier=ComputeTier(gpu_decode=False)),
                      wl["resnet50-train"].with_core_s(0.005))
    assert cpu_only.samples_per_s == pytest.approx(112 / 0.005) and cpu_only.bottleneck == "host_cpu"


def test_power_is_weighted_by_utilization():
    r = Resource(name="gpu", rate=1, count=8, watts=700, idle_watts=70)
    assert r.power(0) == 8 * 70 and r.power(1) == 8 * 700 and r.power(0.5) == pytest.approx(8 * 385)
    with pytest.raises(ConfigError, match="idle_watts must be in 0..watts"):
        Resource(name="x", rate=1, watts=10, idle_watts=20)
    ev = evaluate([Resource(name="a", rate=1, watts=100, idle_watts=10, group="storage"),
                   Resource(name="b", rate=4, watts=100, idle_watts=10, group="compute")], [])
    assert ev.watts == 20 and ev.peak_watts == 200 and ev.watts_by_group == {"storage": 10, "compute": 10}


def test_idle_gpus_are_not_charged_full_power_when_storage_does_the_work(cat, wl):
    a = assess(ARCHITECTURES["smart_nvme_2u"](cat), wl["preprocess-only"])
    gpus = next(r for r in ARCHITECTURES["smart_nvme_2u"](cat).resources if r.name == "gpu")
    assert "gpu" not in a.utilization and a.watts < a.peak_watts - 8 * (700 - 70) + 1
    assert gpus.power(0) == 8 * 70


def test_storage_only_cost_power_per_tb_per_gbps_and_tco(cat, wl):
    from nearstore.design import Economics
    econ = Economics(years=3, usd_per_kwh=0.2, pue=1.5)
    a = assess(ARCHITECTURES["smart_ebof"](cat), wl["resnet50-train"], econ)
    e = cat.ebof["ebof-24"]
    storage = 24 * cat.nvme_ssd["em6"].price_usd + 3 * cat.nic["100gbe"].price_usd + e.price_usd
    assert a.storage_cost_usd == pytest.approx(storage)
    assert a.usd_per_tb == pytest.approx(storage / (24 * 3.84))
    assert a.usd_per_gb_per_s == pytest.approx(storage / 37.5)
    assert a.tco_usd == pytest.approx(a.cost_usd + a.watts * 1.5 * 3 * 8766 / 1000 * 0.2)
    assert 0 < a.storage_watts < a.watts and a.storage_tco_usd < a.tco_usd


def test_links_lanes_and_drives_are_parameters(cat, wl):
    assert parse_nics("4x200gbe") == Nics(4, "200gbe")
    with pytest.raises(ConfigError, match="COUNTxMODEL"):
        parse_nics("fast")
    ok = ARCHITECTURES["smart_nvme_2u"](cat, drive="csd-gen4-arm", nics=Nics(4, "100gbe"))
    assert not ok.problems  # 64 switch uplink lanes + 4 x 16 NIC lanes = 128 = the EPYC's lanes
    two = ARCHITECTURES["smart_nvme_2u"](cat, drive="orin-e3s", nics=Nics(4, "400gbe"))
    assert not two.problems  # 16 x 4 drive lanes + 4 x 16 = 128
    a = assess(ARCHITECTURES["smart_nvme_2u"](cat, drive="csd-gen4-arm", drives=24), wl["resnet50-train"])
    assert a.gb_per_s_per_2u == pytest.approx(153.6)
    over = ARCHITECTURES["smart_nvme_2u"](cat, drive="orin-e3s", drives=16,
                                          chassis="2u-16-e3s", nics=Nics(4, "100gbe"))
    assert not over.problems
    ebof = ARCHITECTURES["smart_ebof"](cat, nics=Nics(6, "200gbe"))
    assert assess(ebof, wl["resnet50-train"]).gb_per_s_per_2u == pytest.approx(24 * 2.7)  # drives bind, not uplinks
    with pytest.raises(ValueError, match="an EBOF holds Ethernet SSDs"):
        ARCHITECTURES["smart_ebof"](cat, drive="p5510")
    with pytest.raises(ValueError, match="nics must be in 1..4"):
        ARCHITECTURES["smart_nvme_2u"](cat, nics=Nics(5, "100gbe"))


def test_pcie_lanes_bind_and_fault(cat, tmp_path):
    f = tmp_path / "wide.yaml"
    f.write_text("chassis:\n  - name: 2u-24-u2\n    source: no switch\n    sources: {'*': 'assumption: a test chassis "
                 "with drives straight on the CPU'}\n    rack_units: 2\n    drive_bays: 24\n    form_factor: u.2\n"
                 "    nic_slots: 4\n    cpu: epyc-9354p\n    cpu_sockets: 1\n    switch_downstream_lanes: 0\n"
                 "    switch_upstream_lanes: 0\n    watts: 300\n    idle_watts: 100\n    price_usd: 1\n    max_watts: 2000\n")
    c2 = load_catalog(f)
    s = ARCHITECTURES["smart_nvme_2u"](c2, drive="csd-gen4-arm", nics=Nics(3, "100gbe"))
    assert any("PCIe lanes: 96 for drives + 3 x 16 for NICs = 144 > the 128 lanes" in p for p in s.problems)
    a = assess(s, load_workloads()["resnet50-train"])
    assert not a.feasible and "PCIe lanes" in a.reasons[0]


def test_host_centric_spread_crosses_the_network(cat, wl):
    big = wl["unet3d-train"].with_dataset(400_000)  # 58.6 TB: more than one server's 8 x 3.84 TB
    s = ARCHITECTURES["host_gpu_server"](cat, tier=ComputeTier(gpus=32))
    st = stages_for(s, big, 0)
    assert st[0].demands["compute_nic"] == pytest.approx(3 / 4 * big.sample_bytes)
    small = stages_for(s, wl["unet3d-train"], 0)
    assert "compute_nic" not in small[0].demands  # a copy per server


def test_page_cache_first_and_later_epochs(cat, wl):
    a = assess(ARCHITECTURES["smart_ebof"](cat, nics=Nics(1, "25gbe")), wl["resnet50-train"])
    assert a.cache_hit == 1 and a.bottleneck == "ethernet" and a.later_bottleneck == "gpu"
    assert a.later_samples_per_s > 1.5 * a.samples_per_s
    assert any(w.startswith("cache-only after epoch 1") for w in a.warnings)
    big = wl["resnet50-train"].with_dataset(1281167 * 40)  # 5.9 TB, > 1.5 TB of page cache
    b = assess(ARCHITECTURES["smart_ebof"](cat, nics=Nics(1, "25gbe")), big)
    assert 0.2 < b.cache_hit < 0.3 and not any(w.startswith("cache-only") for w in b.warnings)
    assert b.later_samples_per_s == pytest.approx(b.samples_per_s / (1 - b.cache_hit), rel=0.01)


def test_accelerators_fed_searches_the_real_function(cat, wl):
    """A dense scan of AU(n) agrees with the search; AU rises again when a new server brings host CPUs."""
    w = wl["resnet50-train"].with_core_s(0.004)  # 112 cores per 8 GPUs feed 5 GPUs' worth: the host CPUs bind
    tier = ComputeTier(gpu_decode=False)
    from nearstore.design.designer import _tier_for, _no_cache
    au = {}
    for n in range(1, 41):
        a = assess(_no_cache(ARCHITECTURES["smart_ebof"](cat, tier=_tier_for(cat, w, "h100", n, tier))), w)
        au[n] = a.accelerator_util if a.feasible else 0
    assert au[8] < 0.9 <= au[9]  # the saw-tooth: a 2nd server's CPUs lift AU again
    r = accelerators_fed(ARCHITECTURES["smart_ebof"], cat, w, accelerator="h100", tier=tier, limit=40)
    assert r["fed"] == max(n for n in au if au[n] >= 0.9) == 11
    assert {p["accelerators"]: p["au"] for p in r["curve"]}[9] == pytest.approx(au[9], abs=1e-3)


def test_search_handles_blocks():
    table = {n: (1.0 if n % 8 in (1, 2) else 0.5) if n < 30 else 0.1 for n in range(1, 100)}
    got = _search(lambda n: (table[n], type("A", (), {"bottleneck": "x", "samples_per_s": 1, "storage_side": [],
                                                    "compute_preprocess": ""})()), 0.9, 99, 8)
    assert got["fed"] == 26


def test_storage_does_all_the_work_reports_what_it_delivers(cat, wl):
    r = accelerators_fed(ARCHITECTURES["smart_nvme_2u"], cat, wl["preprocess-only"], accelerator="h100")
    assert r["fed"] is None and r["delivered_samples_per_s"] > 10_000 and r["delivered_gb_per_s"] > 1


def test_emulated_accelerators_belong_to_their_workload(cat, wl):
    with pytest.raises(ConfigError, match="h100-mlperf emulates resnet50-train.*use h100-mlperf-unet3d"):
        accelerators_fed(ARCHITECTURES["smart_ebof"], cat, wl["unet3d-train"], accelerator="h100-mlperf")
    r = accelerators_fed(ARCHITECTURES["smart_ebof"], cat, wl["unet3d-train"], accelerator="h100-mlperf-unet3d")
    # the uplinks bind; the DPU crops part of the volumes next to the drives, so more than raw bytes allow
    assert r["fed"] > int(37.5e9 / (0.9 * 7 / 0.323 * 146600628)) and "preprocess" in r["storage_side"][-1]
    h = emulated_demand(cat, "h100-mlperf")
    assert h["samples_per_s"] == pytest.approx(400 / 0.224)


def test_capacity_limited_design_also_says_what_bandwidth_alone_feeds(cat, wl):
    r = accelerators_fed(ARCHITECTURES["nvdimm"], cat, wl["resnet50-train"], accelerator="h100-mlperf")
    assert r["fed"] == 0 and "resident on media" in r["reasons"][0]
    assert r["bandwidth_only"]["fed"] == int(19.2e9 / (0.9 * 400 / 0.224 * 115000))


def test_in_storage_training_memory_precision_and_allreduce(cat, wl):
    rn = wl["resnet50-train"].stages[1]
    assert rn.resident_bytes(2) == pytest.approx(25.6e6 * 14 + 46e6 * 256 + 1e9)  # AMP + SGD momentum
    v100 = assess(ARCHITECTURES["host_gpu_server"](cat, tier=ComputeTier(gpu="v100-16gb", server="dgx-a100")),
                  wl["resnet50-train"])
    assert v100.feasible  # NVIDIA's recipe: batch 256 per 16 GB V100 with AMP
    s = ARCHITECTURES["smart_nvme_2u"](cat)  # 16 Orin drives: train at 7.5 fp16 TFLOP/s, not 50 int8 TOP/s
    assert s.storage.accel.train_macs_per_s == pytest.approx(7.5e12 / 2 * 0.3)
    st = stages_for(s, wl["resnet50-train"], 2)
    model = st[2]
    assert model.demands["storage_accel"] == pytest.approx(3 * 3.9e9 / (7.5e12 / 2 * 0.3))
    assert model.demands["drive_links"] == pytest.approx(2 * 15 * 25.6e6 * 2 / (16 * 256))
    a = assess(s, wl["resnet50-train"])
    trained = [x for x in a.alternatives if "resnet50" in x["storage_side"]][0]
    assert trained["feasible"] and trained["samples_per_s"] < a.samples_per_s / 10  # moving the data wins
    assert 2 not in splits(ARCHITECTURES["smart_nvme_2u"](cat, drive="smartssd"), wl["resnet50-train"])  # int8 only


def test_scale_boxes_for_n_accelerators(cat, wl):
    w = wl["unet3d-train"].with_dataset(50_000)
    tier = ComputeTier(gpus=64, gpu="h100-mlperf-unet3d", model_macs=3e12)
    r = boxes_for(ARCHITECTURES["smart_ebof"], cat, w, tier=tier)
    assert r["reaches_au"] and r["storage_cost_usd"] > 0 and r["bottleneck"] == "gpu"
    fewer = assess(ARCHITECTURES["smart_ebof"](cat, tier=tier, boxes=r["boxes"] - 1), w)
    assert fewer.accelerator_util < 0.9 and fewer.bottleneck == "ethernet"
    assert r["storage_cost_usd"] == pytest.approx(r["boxes"] * assess(ARCHITECTURES["smart_ebof"](cat, tier=tier), w)
                                                  .storage_cost_usd)


def test_validation_passes_and_covers_published_measurements(cat):
    checks = validate(cat)
    assert len(checks) == 9 and all(c.ok for c in checks)
    names = " ".join(c.name for c in checks)
    assert "MLPerf Training v3.0" in names and "DDN AI400X2 Turbo" in names and "unet3d" in names


def test_pareto_front():
    pts = [{"cost": 1, "samples_per_s": 1}, {"cost": 2, "samples_per_s": 3}, {"cost": 3, "samples_per_s": 2},
           {"cost": 2, "samples_per_s": 3.5}]
    assert pareto(pts, "cost") == [True, False, False, True]


def test_the_host_splits_its_jpegs_between_cpus_and_gpus(cat, wl):
    """Inference is light on the GPUs: the host decodes part of the images on its CPUs and part with DALI."""
    w = wl["resnet50-infer"]
    s = ARCHITECTURES["host_gpu_server"](cat)
    a = assess(s, w)
    cpu_only = evaluate(s.resources, stages_for(s, w, 0)).samples_per_s
    gpu_only = max(evaluate(s.resources, stages_for(s, w, 0, gpu_decode=h)).samples_per_s for h in (0.0, 0.5, 1.0))
    assert "host CPUs" in a.compute_preprocess and "GPUs" in a.compute_preprocess
    assert a.samples_per_s > 1.1 * max(cpu_only, gpu_only)


def test_training_across_boxes_pays_the_allreduce_on_their_uplinks(cat, wl):
    s = ARCHITECTURES["smart_nvme_2u"](cat, boxes=4)  # 64 Orin drives in 4 boxes
    model = stages_for(s, wl["resnet50-train"], 2)[2]
    g = 25.6e6 * 2
    assert model.demands["drive_links"] == pytest.approx(2 * 63 * g / (64 * 256))
    assert model.demands["ethernet"] == pytest.approx(2 * 3 * g / (64 * 256))
    assert "ethernet" not in stages_for(ARCHITECTURES["smart_nvme_2u"](cat), wl["resnet50-train"], 2)[2].demands
