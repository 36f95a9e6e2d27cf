"""One performance model for the runtime planner and the storage designer (resources, stages, evaluate)."""

from nearstore.model.core import Evaluation, GridResult, Resource, Stage, evaluate, evaluate_grid

__all__ = ["Evaluation", "GridResult", "Resource", "Stage", "evaluate", "evaluate_grid"]
