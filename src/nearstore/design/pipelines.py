"""A designer workload from a pipeline's declared stages: the designer and the runtime planner on the same numbers.

``workload_of(pipeline, spec)`` turns the stages of a ``Pipeline`` (image ops,
network layers up to a cut) into a ``Workload`` whose stages carry what the
ops declare (``Pipeline.declare_stages``: output bytes, MACs, parameter bytes,
where they can run): a stage that may run on an accelerator and declares MACs
is a ``model`` stage, the others ``cpu`` stages (their seconds measured, or
given). The planner reads the same declarations, so for every cut both say
the same bytes per sample on the link and the same operations per sample.
"""

from __future__ import annotations

from typing import Any, Sequence

from nearstore.core.errors import ConfigError
from nearstore.design.workloads import Workload, WorkloadStage

__all__ = ["workload_of"]

#: parameter bytes the ops declare are read as fp32 weights when a stage is given to the designer
DECLARED_BYTES_PER_PARAM = 4.0


def workload_of(pipeline: Any, spec: Any, *, name: str, dataset_samples: int, epochs: int = 1,
                core_s: Sequence[float] | None = None, batch: int = 1) -> Workload:
    """The workload of ``pipeline`` on samples of ``spec`` (its input spec; ``spec.bytes`` per sample stored).

    ``core_s``: reference-core seconds per sample of each stage (cpu stages), e.g. from a profile.
    """
    declared = pipeline.declare_stages(spec)
    if core_s is not None and len(core_s) != len(declared):
        raise ConfigError(f"core_s has {len(core_s)} entries for {len(declared)} stages of {pipeline!r}")
    stages = []
    for i, (st, d) in enumerate(zip(pipeline.stages, declared)):
        model = "accelerator" in d.where and d.macs > 0
        stages.append(WorkloadStage(
            name=st.name, kind="model" if model else "cpu", out_bytes=d.bytes,
            source="declared by the pipeline's ops (Pipeline.declare_stages)",
            core_s=0.0 if model or core_s is None else float(core_s[i]),
            forward_gmacs=d.macs / 1e9 if model else 0.0,
            params_m=d.param_bytes / DECLARED_BYTES_PER_PARAM / 1e6 if model else 0.0,
            activation_mb=d.resident_bytes / 1e6 if model else 0.0, batch=batch))
    return Workload(name=name, description=f"the stages of {pipeline!r}", dataset_samples=dataset_samples,
                    sample_bytes=spec.bytes, epochs=epochs, source="a pipeline's declared stages", stages=stages)
