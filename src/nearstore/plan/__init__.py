"""The planner: the performance model fed by measurements of a running cluster, choosing the split.

``measure`` profiles the nodes (their ``profile`` action), the host (the same
stages run here), the link and the machine; ``predict`` turns the
measurements into model resources and stages for every valid split and
evaluates them with ``nearstore.model``; ``plan`` does both and picks the
split with a one-line reason. ``Loader(split="auto")`` calls ``plan``.
"""

from nearstore.plan.planner import Measurements, Plan, SplitPrediction, measure, plan, predict

__all__ = ["Measurements", "Plan", "SplitPrediction", "measure", "plan", "predict"]
