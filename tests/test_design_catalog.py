"""The catalog: every figure sourced, real parts within their real limits, errors that name file, line and field."""

from __future__ import annotations

import pytest

from nearstore.design import CatalogError, load_catalog
from nearstore.design.catalog import KINDS, _source_ok, sourced_fields


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


def test_every_figure_of_every_part_has_a_url_or_a_reasoned_assumption(cat):
    checked = 0
    for kind in KINDS:
        for comp in getattr(cat, kind).values():
            assert "*" not in comp.sources, f"{kind} {comp.name}: the packaged catalog sources each field"
            cover = {f.strip(): text for key, text in comp.sources.items() for f in key.split(",")}
            for f in sourced_fields(type(comp)):
                assert f in cover and _source_ok(cover[f]), (kind, comp.name, f)
                checked += 1
    assert checked > 300
    assert not _source_ok("assumption: cheap") and _source_ok("see https://example.com/x")


def test_real_parts_stay_within_real_limits(cat):
    for d in cat.computational_drive.values():  # within its form factor's power
        assert d.watts <= cat.form_factor[d.form_factor].max_watts, d.name
    assert cat.computational_drive["smartssd"].interface == "pcie3"
    assert cat.computational_drive["orin-e3s"].form_factor == "e3.s-2t"  # 39 W does not fit U.2's 25 W
    assert all(cat.nvme_ssd[n].interface.startswith("ethernet") for n in ("em6",))
    assert cat.cpu["xeon-8280"].memory == "ddr4" and "nvdimm-n" in cat.cpu["xeon-8280"].persistent_memory
    assert cat.accelerator["alveo-u250"].bus == "pcie" and cat.accelerator["alveo-u250"].pcie_gen == 3
    assert cat.nic["400gbe"].gb_per_s == 50 and cat.nic["25gbe"].gb_per_s == 3.125


@pytest.mark.parametrize(
    "text,match",
    [
        ("nic:\n  - name: x\n    gbit_per_s: -5\n", "nic 'x': .*field gbit_per_s: Input should be greater than 0"),
        ("nic:\n  - name: z\n    source: s s s\n    sources: {'*': 'assumption: figures from my own lab notes'}\n"
         "    gbit_per_s: 100\n    pcie_gen: 4\n    pcie_lanes: 16\n    watts: 20\n    idle_watts: 10\n",
         "nic 'z': field price_usd: Field required"),
        ("nic:\n  - name: w\n    source: s s s\n    sources: {gbit_per_s: 'my guess'}\n    gbit_per_s: 100\n"
         "    pcie_gen: 4\n    pcie_lanes: 16\n    watts: 20\n    idle_watts: 10\n    price_usd: 1\n",
         "the source of field gbit_per_s .* is neither a URL nor 'assumption"),
        ("nic:\n  - name: v\n    source: s s s\n    sources: {gbit_per_s: 'https://x.org'}\n    gbit_per_s: 100\n"
         "    pcie_gen: 4\n    pcie_lanes: 16\n    watts: 20\n    idle_watts: 10\n    price_usd: 1\n",
         "field pcie_gen has no entry in sources"),
        ("gpu_farm:\n  - name: q\n", "unknown component kind 'gpu_farm'"),
        ("nic:\n  - name: a\n    gbit_per_s: [1, 2\n  - name: b\n", r"mine.yaml: line 4, column \d+: not valid YAML"),
    ],
)
def test_catalog_errors_name_file_line_component_and_field(tmp_path, text, match):
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    with pytest.raises(CatalogError, match=match) as info:
        load_catalog(f)
    assert str(f) in str(info.value)


def test_a_drive_over_its_form_factor_power_is_refused(tmp_path):
    f = tmp_path / "hot.yaml"
    f.write_text("computational_drive:\n  - name: hot\n    source: a drive too hot for U.2\n"
                 "    sources: {'*': 'assumption: a deliberately impossible drive for the test'}\n"
                 "    form_factor: u.2\n    interface: pcie4\n    read_gb_per_s: 6\n    capacity_tb: 4\n    cores: 8\n"
                 "    core_speed: 0.3\n    accel_fp16_tflops: 7\n    accel_int8_tops: 50\n    accel_memory_gb: 16\n"
                 "    accel_mfu: 0.3\n    watts: 39\n    idle_watts: 9\n    price_usd: 1\n")
    with pytest.raises(CatalogError, match="'hot' draws 39 W, more than its form factor u.2 delivers"):
        load_catalog(f)


def test_unknown_accelerator_lists_every_valid_name_emulated_included(cat):
    with pytest.raises(CatalogError) as info:
        cat.get("accelerator", "tpu-v9")
    msg = str(info.value)
    assert all(n in msg for n in ("h100", "v100-16gb", "jetson-orin-nx", "h100-mlperf (emulated, resnet50-train)",
                                  "h100-mlperf-unet3d (emulated, unet3d-train)"))
