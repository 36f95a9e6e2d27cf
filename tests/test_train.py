"""Transfer learning: the head trainer and the separable synthetic dataset it learns from."""

from __future__ import annotations

import numpy as np
import pytest

from nearstore.core.errors import ConfigError
from nearstore.store.synth import SynthSpec, class_color
from nearstore.train import HeadTrainer


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


# the live smoke test (a node computes the features, the head trains here) is in test_nets.py: it shares that
# module's cluster
