"""Catalog validation and the designer's checks against published figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nearstore.design import CatalogError, SEED_DESIGNS, load_catalog, storage_compute_bandwidth, validate


def test_seed_figures_from_component_specs():
    checks = validate(load_catalog())
    assert all(c.ok for c in checks) and len(checks) == 6
    got = {c.name.split(":")[0]: c.computed for c in checks[:3]}
    assert got == pytest.approx({"smart_ebof": 37.5, "smart_nvme_2u": 153.6, "nvdimm": 19.2})


def test_bottleneck_names_the_limiting_part():
    cat = load_catalog()
    assert storage_compute_bandwidth(SEED_DESIGNS["smart_ebof"](cat))[1] == "ethernet"
    bw, limit = storage_compute_bandwidth(SEED_DESIGNS["smart_ebof"](cat, drives=4))
    assert limit == "media" and bw == pytest.approx(4 * 6.4e9)
    with pytest.raises(ValueError, match="drives must be in 1..24 for chassis 2u-24-bay"):
        SEED_DESIGNS["smart_nvme_2u"](cat, drives=30)


@pytest.mark.parametrize(
    "text,match",
    [
        ("nic:\n  - name: x\n    gbit_per_s: -5\n    watts: 1\n    price_usd: 1\n    source: spec sheet\n",
         "nic 'x': field gbit_per_s: Input should be greater than 0"),
        ("nvme_ssd:\n  - name: y\n    watts: 1\n    capacity_tb: 1\n    price_usd: 1\n    source: spec sheet\n",
         "nvme_ssd 'y': field read_gb_per_s: Field required"),
        ("nic:\n  - name: z\n    gbit_per_s: 100\n    watts: 1\n    price_usd: 1\n",
         "nic 'z': field source: Field required"),
        ("nic:\n  - name: w\n    gbps: 100\n    watts: 1\n    price_usd: 1\n    source: s s s\n",
         "field gbps: Extra inputs are not permitted"),
        ("gpu_farm:\n  - name: q\n", "unknown component kind 'gpu_farm'"),
        ("nic: [\n", "not valid YAML"),
    ],
)
def test_catalog_errors_name_file_component_and_field(tmp_path, text, match):
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    with pytest.raises(CatalogError, match=match) as info:
        load_catalog(f)
    assert str(f) in str(info.value)


def test_validate_fails_when_a_spec_changes(tmp_path):
    """A slower NIC in a user catalog moves the EBOF figure off the published one: the check fails."""
    f = tmp_path / "slow.yaml"
    f.write_text("nic:\n  - name: 100gbe\n    gbit_per_s: 50\n    watts: 20\n    price_usd: 900\n"
                 "    source: a deliberately wrong entry\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "nearstore.cli.main", "design", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    ok = run("--validate", "--json", str(tmp_path / "ok.json"))
    assert ok.returncode == 0, ok.stderr
    assert all(c["ok"] for c in json.loads((tmp_path / "ok.json").read_text())["checks"])
    bad = run("--validate", "--catalog", str(f))
    assert bad.returncode == 1
    table = run("--json", str(tmp_path / "t.json"))
    rows = json.loads((tmp_path / "t.json").read_text())["designs"]
    assert {r["arch"]: round(r["gb_per_s_per_2u"], 1) for r in rows} == {
        "host_gpu_server": 51.2, "smart_ebof": 37.5, "smart_nvme_2u": 153.6, "nvdimm": 19.2}
    assert table.returncode == 0


# -- workloads, architectures, the designer ------------------------------------------------------

from nearstore.design import (ARCHITECTURES, ComputeTier, accelerators_fed, assess, emulated_demand,  # noqa: E402
                              load_workloads, pareto, splits)


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


@pytest.fixture(scope="module")
def wl():
    return load_workloads()


def test_catalog_has_every_kind_the_designer_needs(cat):
    assert {"v100", "a100", "h100", "h200", "edge-tpu", "jetson-orin-nx", "alveo-u250"} <= set(cat.accelerator)
    assert {"nvdimm-n-32", "pmem-256"} <= set(cat.memory_module) and cat.ebof and cat.computational_drive
    assert set(cat.nic) == {"25gbe", "100gbe", "200gbe", "400gbe"} and cat.cpu and cat.gpu_server
    assert all(len(c.source) > 10 for kind in ("accelerator", "cpu", "computational_drive")
               for c in getattr(cat, kind).values())


def test_mlperf_demand_is_computed_from_the_emulation(cat):
    h = emulated_demand(cat, "h100-mlperf")
    assert h["samples_per_s"] == pytest.approx(400 / 0.224) and h["bytes_per_s"] == pytest.approx(400 / 0.224 * 114660)
    assert emulated_demand(cat, "a100-mlperf")["samples_per_s"] == pytest.approx(400 / 0.435)
    assert all(c.ok for c in validate(cat)) and len(validate(cat)) == 6


def test_hand_computed_design(cat, wl):
    """8 H100 in one server with 2 x 56 cores: 112 cores / 3.0 ms per image = 37,333 images/s, CPU-bound."""
    a = assess(ARCHITECTURES["host_gpu_server"](cat), wl["resnet50-train"])
    assert a.samples_per_s == pytest.approx(112 / 0.0030)
    assert a.bottleneck == "host_cpu" and a.feasible and a.link_bytes_per_sample == 0
    gpu = 8 * 989e12 / 2 * 0.18 / (3 * 3.9e9)
    assert a.utilization["gpu"] == pytest.approx(a.samples_per_s / gpu, rel=1e-3)
    assert a.epoch_s == pytest.approx(1281167 / a.samples_per_s)
    assert a.energy_per_epoch_kwh == pytest.approx(a.watts * a.epoch_s / 3.6e6)


def test_capacity_and_memory_make_designs_infeasible_with_the_reason(cat, wl):
    a = assess(ARCHITECTURES["nvdimm"](cat), wl["resnet50-train"])
    assert not a.feasible and a.samples_per_s == 0
    assert any("resident on media, which has 32.0 GB" in r for r in a.reasons)
    big = assess(ARCHITECTURES["nvdimm"](cat, module="pmem-256", modules=2), wl["resnet50-train"])
    assert big.feasible
    # an Edge TPU on the memory bus cannot hold ResNet-50's parameters: that split is infeasible
    tiny = assess(ARCHITECTURES["nvdimm"](cat, module="pmem-256", modules=2, accelerator="edge-tpu"),
                  wl["resnet50-infer"])
    storage_model = [x for x in tiny.alternatives if "resnet50" in x["storage_side"]][0]
    assert not storage_model["feasible"] and "resident on storage_accel" in storage_model["reasons"][0]


def test_small_in_storage_accelerators_lose_to_the_gpus_on_a_big_model(cat, wl):
    a = assess(ARCHITECTURES["smart_nvme_2u"](cat, drive="csd-gen4-fpga"), wl["resnet50-infer"])
    by_side = {"+".join(x["storage_side"]): x for x in a.alternatives}
    in_storage = by_side["read+preprocess+resnet50"] if "read+preprocess+resnet50" in by_side else None
    on_host = by_side["read"]
    assert in_storage is None or in_storage["samples_per_s"] < on_host["samples_per_s"]
    assert a.storage_side == ["read"]


def test_near_storage_wins_on_large_samples(cat, wl):
    """UNet3D: cropping 140 MB volumes next to the drives sends 10.5 MB per sample instead of 140 MB."""
    u = wl["unet3d-train"]
    ebof = accelerators_fed(ARCHITECTURES["smart_ebof"], cat, u, accelerator="h100")
    smart = accelerators_fed(ARCHITECTURES["smart_nvme_2u"], cat, u, accelerator="h100")
    assert smart["fed"] > 2 * ebof["fed"] and smart["storage_side"] == ["read", "preprocess"]
    assert ebof["limited_by"] in ("ethernet", "storage_cpu")


def test_shared_preprocessing_lets_the_drives_and_the_host_work_together(cat, wl):
    """Smart 2U on ResNet-50: drives preprocess a share, the host the rest; the GPUs become the bottleneck."""
    a = assess(ARCHITECTURES["smart_nvme_2u"](cat), wl["resnet50-train"])
    gpu = 8 * 989e12 / 2 * 0.18 / (3 * 3.9e9)
    assert a.bottleneck == "gpu" and a.samples_per_s == pytest.approx(gpu)
    assert 0 < a.storage_share < 1 and a.storage_side[-1].startswith("preprocess (")
    # at that share neither side's cores bind: 24 x 8 x 0.6 drive cores and 112 host cores
    assert a.samples_per_s <= 24 * 8 * 0.6 / (a.storage_share * 0.003)
    assert a.samples_per_s <= 112 / ((1 - a.storage_share) * 0.003)
    host_only = assess(ARCHITECTURES["host_gpu_server"](cat), wl["resnet50-train"])
    assert a.samples_per_s > 1.5 * host_only.samples_per_s


def test_accelerators_fed_is_the_largest_n_at_au_90(cat, wl):
    r = accelerators_fed(ARCHITECTURES["smart_ebof"], cat, wl["resnet50-train"], accelerator="h100-mlperf")
    n = r["fed"]
    assert r["au"] >= 0.9
    more = assess(ARCHITECTURES["smart_ebof"](cat, tier=ComputeTier(gpus=n + 1, gpu="h100-mlperf",
                                                                      emulated_macs=3 * 3.9e9)), wl["resnet50-train"])
    assert more.utilization["gpu"] < 0.9
    # 37.5 GB/s of uplinks / 115 KB per image / (0.9 x 1,786 images/s per accelerator)
    assert n == int(37.5e9 / 115000 / (0.9 * 400 / 0.224))


def test_more_storage_never_lowers_throughput(cat, wl):
    for name, grid in (("smart_ebof", [{"drives": d} for d in (4, 8, 16, 24)]),
                       ("smart_nvme_2u", [{"drives": d} for d in (4, 8, 16, 24)])):
        rates = [assess(ARCHITECTURES[name](cat, **g), wl["unet3d-train"]).samples_per_s for g in grid]
        assert rates == sorted(rates), (name, rates)


def test_splits_follow_what_each_side_can_run(cat, wl):
    w = wl["features-head"]
    assert splits(ARCHITECTURES["host_gpu_server"](cat), w) == [0]
    assert splits(ARCHITECTURES["smart_ebof"](cat), w) == [0, 1]
    assert splits(ARCHITECTURES["smart_nvme_2u"](cat), w) == [0, 1, 2, 3]


def test_pareto_front():
    pts = [{"cost": 1, "samples_per_s": 1}, {"cost": 2, "samples_per_s": 3}, {"cost": 3, "samples_per_s": 2},
           {"cost": 2, "samples_per_s": 3.5}]
    assert pareto(pts, "cost") == [True, False, False, True]


def test_workload_file_errors_name_file_workload_and_field(tmp_path):
    f = tmp_path / "w.yaml"
    f.write_text("- name: mine\n  description: x\n  dataset_samples: 10\n  sample_bytes: -1\n  epochs: 1\n"
                 "  source: my notes\n  stages: []\n")
    with pytest.raises(CatalogError, match=r"w.yaml: workload 'mine': field sample_bytes: .*greater than 0"):
        load_workloads(f)


def test_design_cli_table_plot_and_fed(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "nearstore.cli.main", "design", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run("--workload", "unet3d-train", "--json", str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png"))
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "d.json").read_text())
    assert {x["arch"] for x in d["designs"]} == set(ARCHITECTURES)
    for key in ("gb_per_s_per_2u", "samples_per_s", "bottleneck", "epoch_s", "watts", "energy_per_epoch_kwh",
                "rack_units", "cost_usd", "samples_per_s_per_w", "samples_per_s_per_kusd"):
        assert all(key in x for x in d["designs"])
    assert d["verdict"]["buy"] in ARCHITECTURES and len(d["variants"]) > 10
    assert (tmp_path / "d.png").stat().st_size > 10_000
    r = run("--accelerators-fed", "--accelerator", "a100-mlperf", "--arch", "smart_ebof,smart_nvme_2u",
            "--json", str(tmp_path / "f.json"))
    assert r.returncode == 0, r.stderr
    fed = json.loads((tmp_path / "f.json").read_text())["designs"]
    assert [x["arch"] for x in fed] == ["smart_ebof", "smart_nvme_2u"] and all(x["fed"] > 100 for x in fed)
    bad = run("--arch", "warp_drive")
    assert bad.returncode == 2 and "arch must be 'all' or among" in bad.stdout + bad.stderr
