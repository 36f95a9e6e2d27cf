"""The command line as a user runs it: real subprocesses, JSON outputs, clear errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nearstore.cli.main", *args], capture_output=True, text=True,
                          timeout=240, check=check)


def test_synth_ingest_info(tmp_path):
    run("synth", str(tmp_path / "img"), "--n", "12", "--classes", "3", "--seed", "1", "--json", str(tmp_path / "s.json"))
    assert json.loads((tmp_path / "s.json").read_text())["images"] == 12
    run("ingest", str(tmp_path / "img"), str(tmp_path / "store"), "--nodes", "2", "--replicas", "2",
        "--shard-size", "300000", "--json", str(tmp_path / "i.json"))
    assert json.loads((tmp_path / "i.json").read_text())["samples"] == 12
    out = run("info", str(tmp_path / "store"), "--json", str(tmp_path / "info.json"))
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["samples"] == 12 and info["classes"] == 3 and info["replicas"] == 2
    assert all(len(nodes) == 2 for nodes in info["placement"].values())
    assert "shards per node" in out.stdout


@pytest.mark.parametrize(
    "args,match",
    [
        (["info", "/nonexistent/store"], "no store at /nonexistent/store"),
        (["ingest", "/nonexistent/src", "/tmp/x"], "source /nonexistent/src does not exist"),
        (["synth", "/tmp/x", "--n", "0"], "n must be >= 1"),
    ],
)
def test_errors_are_one_clear_line(args, match):
    r = run(*args, check=False)
    assert r.returncode == 2
    assert match in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(600)
def test_bench_writes_json(tmp_path, store):
    r = run("bench", "--local", str(store), "--n", "32", "--rounds", "1", "--no-dali", "--overhead-samples", "2000",
            "--json", str(tmp_path / "b.json"))
    res = json.loads((tmp_path / "b.json").read_text())
    host = res["host_pipeline"]
    assert host["median_images_per_s"]["nearstore"] > 0 and host["median_images_per_s"]["torch_dataloader_pillow"] > 0
    assert "vs_torch" in host["median_ratio"] and host["dali_note"]
    assert res["loader_overhead"]["median_samples_per_s"] > 0 and res["loader_overhead"]["samples"] == 2000
    assert "nearstore" in r.stdout


def test_demo_ends_with_the_designers_verdict(tmp_path):
    import io

    from rich.console import Console

    from nearstore.cli.demo import design_demo

    buf = io.StringIO()
    res = design_demo(tmp_path, console=Console(file=buf, width=200))
    assert [d["arch"] for d in res["designs"]] == ["host_gpu_server", "smart_ebof", "smart_nvme_2u", "nvdimm"]
    # ImageNet fits the DGX's page cache and the GPUs bind: the cheapest storage wins; NVDIMM cannot hold ImageNet
    assert res["verdict"]["buy"] == "host_gpu_server"
    assert "verdict:" in buf.getvalue() and "infeasible" in buf.getvalue() and "cache-only" in buf.getvalue()
    assert (tmp_path / "design.png").stat().st_size > 10_000


@pytest.mark.long  # ~1-2 min: two emulated-training runs and a plan over a capped link (make demo runs it too)
def test_demo_features_at_storage(store):
    import io

    from rich.console import Console

    from nearstore.cli.demo import features_demo

    buf = io.StringIO()
    res = features_demo(store, console=Console(file=buf, width=200), samples=32)
    host, nodes = res["runs"]
    assert host["split"] == len(res["pipeline"]) - 1 and nodes["split"] == "node"
    # pooled fp16 MobileNetV2 features (1280 x 2 B) against 3 x 112 x 112 uint8 crops
    assert nodes["bytes_per_sample"] < host["bytes_per_sample"] / 10
    assert all(r["samples_per_s"] > 0 and 0 < r["au"] <= 1 for r in res["runs"])
    text = buf.getvalue()
    assert "nodes, features sent" in text and "host, crops sent" in text and "planner" in text
    assert " ".join(res["plan"]["reason"].split()) in " ".join(text.split())  # the choice and its reason
