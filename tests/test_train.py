"""Transfer learning end to end: a frozen backbone on a real node, a head trained on the host; its loss falls."""

from __future__ import annotations

import numpy as np
import pytest

from nearstore import Pipeline
from nearstore.bench.accel import emulated_training
from nearstore.core.errors import ConfigError
from nearstore.node import LocalCluster
from nearstore.ops import network_ops
from nearstore.store.ingest import ingest
from nearstore.store.synth import SynthSpec, class_color, synth_folder
from nearstore.train import HeadTrainer

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NEARSTORE_CACHE", str(tmp_path_factory.getbasetemp() / "nets-cache"))


def test_class_colors_are_distinct_and_off_by_default():
    colors = [class_color(c, 4) for c in range(4)]
    assert min(np.abs(a - b).max() for i, a in enumerate(colors) for b in colors[i + 1:]) > 60
    assert SynthSpec(n=1).class_colors is False


def test_head_trainer_checks_its_input():
    with pytest.raises(ConfigError, match="classes >= 2"):
        HeadTrainer(8, 1)
    t = HeadTrainer(8, 3)
    with pytest.raises(ConfigError, match="labels must lie in 0..2"):
        t.step(np.zeros((4, 8), np.float32), np.array([0, 1, 2, 3]))


def test_frozen_backbone_on_the_node_trains_a_head_on_the_host(tmp_path):
    synth_folder(tmp_path / "img", SynthSpec(n=48, seed=3, classes=4, class_colors=True), workers=1)
    ingest(tmp_path / "img", tmp_path / "store", nodes=1, shard_size=1 << 20)
    pipe = Pipeline(["decode_jpeg", {"op": "random_resized_crop", "size": 64, "scale": [0.5, 1.0]}, "flip",
                     "to_uint8_chw", *network_ops("resnet18", "pooled", dtype="float16", engine="pytorch")])
    trainer = HeadTrainer(512, 4, lr=1e-2, seed=0)
    with LocalCluster(tmp_path / "store", workers_per_node=1) as cluster:
        res = emulated_training(cluster.spec, pipeline=pipe, split="node", step_time=0.0, samples=160,
                                batch_size=16, workers=1, step=trainer)
    first, last = trainer.loss_fell()
    assert last < 0.6 * first, trainer.losses
    assert res["step"] == "real" and res["samples"] >= 160 and 0 < res["au"] <= 1
    assert res["bytes_per_sample"] < 512 * 2 + 200  # fp16 features and a row's framing, not a 12 KB crop
    assert "network" in res["node_stage_seconds"] and not res["host_stage_seconds"].get("network")
