"""Catalog validation and the designer's checks against published figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nearstore.design import CatalogError, SEED_DESIGNS, load_catalog, storage_compute_bandwidth, validate


def test_seed_figures_from_component_specs():
    checks = validate(load_catalog())
    assert [c.ok for c in checks] == [True, True, True]
    got = {c.name.split(":")[0]: c.computed for c in checks}
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
    assert {r["design"]: round(r["gb_per_s"], 1) for r in rows} == {"smart_ebof": 37.5, "smart_nvme_2u": 153.6,
                                                                    "nvdimm": 19.2}
    assert table.returncode == 0
