"""``nearstore design`` end to end: table, plot, fed, scale, sensitivity, validate, and options that clash."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nearstore.cli.main", "design", *args], capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "200", **__import__("os").environ})


def test_design_table_plot_and_economics(tmp_path):
    r = run("--workload", "unet3d-train", "--dataset-samples", "50000", "--years", "3", "--usd-per-kwh", "0.2",
            "--json", str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png"))
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "d.json").read_text())
    assert {x["arch"] for x in d["designs"]} == {"host_gpu_server", "smart_ebof", "smart_nvme_2u", "nvdimm"}
    for key in ("samples_per_s", "later_samples_per_s", "cache_hit", "storage_cost_usd", "storage_watts",
                "usd_per_tb", "usd_per_gb_per_s", "tco_usd", "compute_preprocess", "peak_watts"):
        assert all(key in x for x in d["designs"])
    assert d["economics"] == {"years": 3.0, "usd_per_kwh": 0.2, "pue": 1.3} and d["workload"]["dataset_samples"] == 50000
    assert d["verdict"]["buy"] and len(d["variants"]) > 10 and (tmp_path / "d.png").stat().st_size > 10_000


def test_fed_scale_and_sensitivity(tmp_path):
    r = run("--accelerators-fed", "--accelerator", "h100-mlperf", "--arch", "smart_ebof,nvdimm",
            "--json", str(tmp_path / "f.json"))
    assert r.returncode == 0, r.stderr
    fed = {x["arch"]: x for x in json.loads((tmp_path / "f.json").read_text())["designs"]}
    assert fed["smart_ebof"]["fed"] > 100 and fed["nvdimm"]["fed"] == 0 and fed["nvdimm"]["bandwidth_only"]["fed"] > 50
    r = run("--scale", "--gpus", "64", "--workload", "unet3d-train", "--dataset-samples", "50000",
            "--arch", "smart_ebof,host_gpu_server", "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    assert all("boxes" in x for x in json.loads((tmp_path / "s.json").read_text())["designs"])
    r = run("--sensitivity", "--json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png"))
    assert r.returncode == 0, r.stderr
    t = json.loads((tmp_path / "t.json").read_text())
    assert {x["parameter"] for x in t["rows"]} >= {"mfu of the compute accelerator", "per-core preprocessing rate",
                                                  "storage part prices", "accelerator price"}
    assert (tmp_path / "t.png").stat().st_size > 5_000


def test_validate_passes_and_fails_when_a_spec_changes(tmp_path):
    r = run("--validate", "--json", str(tmp_path / "v.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(c["ok"] for c in json.loads((tmp_path / "v.json").read_text())["checks"])
    f = tmp_path / "slow.yaml"
    f.write_text("nic:\n  - name: 100gbe\n    source: a deliberately wrong entry\n"
                 "    sources: {'*': 'assumption: a deliberately wrong NIC for the test'}\n    gbit_per_s: 50\n"
                 "    pcie_gen: 4\n    pcie_lanes: 16\n    watts: 20\n    idle_watts: 10\n    price_usd: 900\n")
    assert run("--validate", "--catalog", str(f)).returncode == 1


@pytest.mark.parametrize("args,match", [
    (("--accelerator", "h100-mlperf"), "--accelerator only makes sense with --accelerators-fed"),
    (("--validate", "--scale"), "--validate and --scale are separate questions"),
    (("--scale", "--boxes", "2"), "--scale finds the number of boxes itself"),
    (("--drives", "8"), "--drives applies to host_gpu_server, smart_ebof, smart_nvme_2u, not to nvdimm"),
    (("--arch", "warp_drive"), "arch must be 'all' or among"),
    (("--nics", "lots"), "nics must look like COUNTxMODEL"),
    (("--gpu", "tpu-v9"), "no accelerator named 'tpu-v9'; accelerators: .*h100-mlperf \\(emulated"),
    (("--accelerators-fed", "--accelerator", "h100-mlperf", "--workload", "unet3d-train"),
     "h100-mlperf emulates resnet50-train"),
])
def test_bad_options_say_what_and_how(args, match):
    import re
    r = run(*args)
    assert r.returncode == 2 and re.search(match, " ".join((r.stdout + r.stderr).split())), r.stdout + r.stderr
