"""The performance model: hand-computed cases, properties over random mappings, grid = scalar."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearstore.core.errors import ConfigError
from nearstore.model import Resource, Stage, evaluate, evaluate_grid

MB = 1e6


def two_resource(link_mb_s: float = 100, cores: float = 2) -> tuple[list[Resource], list[Stage]]:
    resources = [Resource(name="link", rate=link_mb_s * MB, watts=10),
                 Resource(name="host_cpu", rate=1.0, count=cores, unit="core-s", watts=50, cost=1000)]
    stages = [Stage(name="transfer", demands={"link": 110e3}),
              Stage(name="decode", demands={"host_cpu": 0.004})]
    return resources, stages


def test_hand_computed_two_resource_pipeline():
    # CPU: 2 cores / 4 ms = 500 samples/s; link: 100 MB/s / 110 KB = 909 samples/s -> CPU binds
    ev = evaluate(*two_resource())
    assert ev.samples_per_s == pytest.approx(500)
    assert ev.bottleneck == "host_cpu"
    assert ev.utilization["host_cpu"] == pytest.approx(1.0)
    assert ev.utilization["link"] == pytest.approx(500 * 110e3 / 100e6)
    assert ev.watts == 110 and ev.cost == 2000
    assert ev.joules_per_sample == pytest.approx(110 / 500)
    assert ev.seconds_for(1.28e6) == pytest.approx(1.28e6 / 500)
    # a tight link moves the bottleneck
    ev = evaluate(*two_resource(link_mb_s=25))
    assert ev.bottleneck == "link" and ev.samples_per_s == pytest.approx(25e6 / 110e3)


def test_memory_is_a_constraint():
    acc = Resource(name="gpu", rate=100e12, unit="MAC", memory_bytes=16e9)
    fits = Stage(name="train", demands={"gpu": 3 * 3.9e9}, memory={"gpu": 25.6e6 * 16 + 8e9})
    ev = evaluate([acc], [fits])
    assert ev.feasible and ev.samples_per_s == pytest.approx(100e12 / (3 * 3.9e9))
    too_big = Stage(name="train", demands={"gpu": 1.0}, memory={"gpu": 40e9})
    ev = evaluate([acc], [too_big])
    assert not ev.feasible and ev.samples_per_s == 0
    assert "needs 40.00 GB resident on gpu, which has 16.0 GB" in ev.reasons[0]


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="resource link: rate must be > 0"):
        Resource(name="link", rate=0)
    with pytest.raises(ConfigError, match="demands 'nvme', which is not a resource"):
        evaluate([Resource(name="link", rate=1)], [Stage(name="read", demands={"nvme": 1})])
    with pytest.raises(ConfigError, match="demand on link must be >= 0"):
        Stage(name="s", demands={"link": -1})


resource_sets = st.lists(st.tuples(st.floats(1e3, 1e12), st.floats(0.0, 1e6), st.integers(1, 64)),
                         min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(spec=resource_sets, factor=st.floats(1.0, 100.0))
def test_adding_capacity_to_the_bottleneck_never_lowers_throughput(spec, factor):
    resources = [Resource(name=f"r{i}", rate=rate, count=count) for i, (rate, _, count) in enumerate(spec)]
    stage = Stage(name="s", demands={f"r{i}": d for i, (_, d, _) in enumerate(spec)})
    before = evaluate(resources, [stage])
    if before.bottleneck is None:
        return
    bigger = [Resource(name=r.name, rate=r.rate * (factor if r.name == before.bottleneck else 1), count=r.count)
              for r in resources]
    after = evaluate(bigger, [stage])
    assert after.samples_per_s >= before.samples_per_s * (1 - 1e-12)
    assert all(u <= 1 + 1e-9 for u in after.utilization.values())


@settings(max_examples=100, deadline=None)
@given(nodes=st.integers(1, 64), rate=st.floats(1e6, 1e10), host=st.floats(1e2, 1e6))
def test_scaling_nodes_scales_storage_side_capacity(nodes, rate, host):
    def design(n: int):
        return evaluate([Resource(name="node_cpu", rate=rate, count=n), Resource(name="host", rate=host * 1e6)],
                        [Stage(name="decode", demands={"node_cpu": 1e6}), Stage(name="step", demands={"host": 1e6})])
    one, many = design(1), design(nodes)
    assert many.samples_per_s >= one.samples_per_s
    assert many.samples_per_s == pytest.approx(min(nodes * rate, host * 1e6) / 1e6)


def test_grid_matches_scalar_evaluation():
    rng = np.random.default_rng(0)
    names = ["media", "link", "node_cpu", "gpu"]
    cap = rng.uniform(1, 1e3, size=(500, 4))
    load = rng.uniform(0, 2, size=(500, 4))
    load[::7, 2] = 0  # some points put nothing on the node CPU
    grid = evaluate_grid(names, cap, load)
    for i in range(0, 500, 37):
        ev = evaluate([Resource(name=n, rate=c) for n, c in zip(names, cap[i])],
                      [Stage(name="all", demands=dict(zip(names, load[i])))])
        assert grid.samples_per_s[i] == pytest.approx(ev.samples_per_s)
        assert names[grid.bottleneck[i]] == ev.bottleneck
    big = evaluate_grid(names, rng.uniform(1, 10, size=(100_000, 4)), np.array([1.0, 0.5, 0.0, 2.0]))
    assert big.samples_per_s.shape == (100_000,) and (big.utilization <= 1 + 1e-9).all()
    assert set(np.unique(big.bottleneck)) <= {0, 1, 3}
