"""Test a stage — or a whole pipeline — in a few lines, in this process.

>>> from dataflow.testing import run_stage
>>> out = run_stage(WindowLevel, {"image": volume}, arguments={"low": -100})  # doctest: +SKIP
>>> out["image"].max()                                                          # doctest: +SKIP

``run_stage`` goes through the same life-cycle the platform uses (constructor arguments checked
against the signature, ``prepare``, ``execute`` with a real :class:`StageContext`, outputs
checked against the ports, ``cleanup``), without processes or a store, so a failure points at
the stage's own code. ``run_pipeline`` runs a pipeline's jobs through the executor's real
scheduling core, every stage in this process.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataflow.execution import state
from dataflow.execution.binding import run_job
from dataflow.stage import Port, Stage, StageContext, StageError, Tensor
from dataflow.tensors import dtype_of

__all__ = ["Outputs", "run_pipeline", "run_stage"]


def run_stage(
    stage: type[Stage] | Stage,
    inputs: Mapping[str, Any],
    *,
    arguments: Mapping[str, Any] | None = None,
    name: str | None = None,
    job_id: str = "test-job",
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run one job through one stage; returns ``{output port: value}``.

    ``inputs`` maps input ports to values: NumPy arrays (or :class:`Tensor` to give metadata),
    strings, numbers, paths. Stream outputs the stage leaves out default to directories under
    ``output_dir`` (a temporary directory if not given).
    """
    instance, cls = _instantiate(stage, arguments)
    stage_name = name or cls.__name__
    with tempfile.TemporaryDirectory(prefix="dataflow-test-") as tmp:
        root = Path(output_dir) if output_dir is not None else Path(tmp)
        ctx = _context(stage_name, root, job_id, instance)
        instance.prepare(ctx)
        try:
            return _execute(instance, stage_name, ctx, inputs, job_id)
        finally:
            instance.cleanup(ctx)


def _instantiate(stage: type[Stage] | Stage, arguments: Mapping[str, Any] | None):
    if isinstance(stage, Stage):
        if arguments:
            raise TypeError("pass arguments with the class, not with an instance")
        return stage, type(stage)
    params = stage.check_parameters(arguments or {})
    return stage(**params), stage


def _context(stage_name: str, root: Path, job_id: str, instance: Stage) -> StageContext:
    def allocate(port: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        spec = instance.outputs.get(port)
        if spec is None or spec.type != "array":
            raise ValueError(f"stage {stage_name!r} has no array output {port!r} to allocate")
        return np.empty(shape, dtype=dtype_of(dtype or spec.element_type))

    def output_dir(port: str) -> Path:
        path = root / (ctx.job_name or job_id) / stage_name / port
        path.mkdir(parents=True, exist_ok=True)
        return path

    ctx = StageContext(
        stage=stage_name,
        scratch_dir=root / ".scratch" / stage_name,
        allocator=allocate,
        output_dirs=output_dir,
    )
    ctx.scratch_dir.mkdir(parents=True, exist_ok=True)
    return ctx


def _execute(instance, stage_name, ctx, inputs, job_id) -> Outputs:
    missing = set(instance.inputs) - set(inputs)
    unknown = set(inputs) - set(instance.inputs)
    if missing or unknown:
        raise ValueError(
            f"stage {stage_name!r} takes inputs {sorted(instance.inputs)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    collected, published = run_job(
        instance, ctx, DictEdges(stage_name), inputs, job_id=job_id, job_name=ctx.job_name or job_id
    )
    return Outputs(collected, published)


class DictEdges:
    """The harness's :class:`dataflow.execution.binding.Edges`: inputs are the values the
    author gave (checked against the ports; a :class:`Tensor` gives its metadata; arrays are
    read-only views with metadata, as from the store), outputs are kept as they are."""

    def __init__(self, stage_name: str) -> None:
        self.stage_name = stage_name

    def read(self, port: str, value: Any, spec: Port) -> tuple[Any, Mapping[str, Any] | None]:
        metadata = None
        if isinstance(value, Tensor):
            value, metadata = value.array, dict(value.metadata)
        if isinstance(value, np.ndarray):
            metadata = {} if metadata is None else metadata  # every array has metadata
            value = value.view()
            value.flags.writeable = False  # stages get read-only views, as from the store
        spec.check_value(value, f"stage {self.stage_name!r} input {port!r}")
        return value, metadata

    def write(self, port: str, value: Any, spec: Port) -> Any:
        return value


class Outputs(dict):
    """A stage's outputs as :func:`run_stage` returns them: ``{port: value}`` as the stage
    returned them (``out["mask"].max()``), and ``metadata[port]`` the metadata each array
    output carries downstream (its Tensor's, or inherited from an input by the same rule as
    the workers: :func:`dataflow.stage.output_values`); ``tensors[port]`` both together."""

    def __init__(self, values: Mapping[str, Any], published: Mapping[str, Any]) -> None:
        super().__init__(values)
        self.tensors = {k: v for k, v in published.items() if isinstance(v, Tensor)}
        self.metadata = {k: v.metadata for k, v in self.tensors.items()}


def run_pipeline(
    pipeline: str | Path | Sequence[Any],
    jobs: Mapping[str, Any],
    *,
    output_dir: str | Path | None = None,
    params: Mapping[str, str] | None = None,
) -> dict[str, dict[tuple[str, str], Any]]:
    """Run jobs through a pipeline in this process, scheduled by the executor's core.

    ``pipeline``: the pipeline's YAML file, as ``dataflow run`` takes it (loaded, validated
    and its stages found next to it the same way; ``params`` its arguments), or
    :class:`dataflow.execution.local.StageDef` items. ``jobs``: job ID -> the job's input (a
    payload directory, or any value for inputs bound to the job). Returns job ID ->
    ``{(stage, output): value}`` for the pipeline's results (array outputs as plain arrays);
    a failed job raises the stage's exception. Array values pass from stage to stage with
    their metadata, as through the store.
    """
    from dataflow.execution.worker import resolve_stage

    stages = _stage_defs(pipeline, params) if isinstance(pipeline, str | Path) else pipeline
    with tempfile.TemporaryDirectory(prefix="dataflow-test-") as tmp:
        root = Path(output_dir) if output_dir is not None else Path(tmp)
        graph = state.Graph(
            {s.name: state.StageNode(s.name, dict(s.inputs), tuple(s.outputs)) for s in stages}
        )
        runners = {}
        for s in stages:
            instance, _cls = _instantiate(resolve_stage(s.stage_ref), s.arguments)
            ctx = _context(s.name, root, "", instance)
            instance.prepare(ctx)
            runners[s.name] = (instance, ctx)
        core = state.Core(graph, state.Limits(max_jobs=1))
        actions = list(core.start(0.0))
        for wid in list(core.workers):
            actions += core.worker_ready(wid, 0.0)
        for job_id, payload in jobs.items():
            actions += core.submit(job_id, state.Value(payload), 0.0)
        results: dict[str, dict[tuple[str, str], Any]] = {}
        try:
            while actions:
                action = actions.pop(0)
                if isinstance(action, state.Dispatch):
                    instance, ctx = runners[action.stage]
                    ctx.job_name = action.job
                    inputs = {p: v.ref for p, v in action.inputs.items()}
                    try:
                        out = _execute(instance, action.stage, ctx, inputs, action.job)
                    except Exception as exc:
                        raise StageError(
                            f"job {action.job!r} failed in stage {action.stage!r}: "
                            f"{type(exc).__name__}: {exc}"
                        ) from exc
                    passed = {**out, **out.tensors}  # arrays with their metadata
                    values = {p: state.Value(v) for p, v in passed.items()}
                    actions += core.job_done(action.worker, action.job, values, 0.0)
                elif isinstance(action, state.JobSucceeded):
                    results[action.job] = {
                        k: v.ref.array if isinstance(v.ref, Tensor) else v.ref
                        for k, v in action.outputs.items()
                    }
        finally:
            for instance, ctx in runners.values():
                instance.cleanup(ctx)
        return results


def _stage_defs(path: str | Path, params: Mapping[str, str] | None) -> list[Any]:
    """The StageDefs of a pipeline file, as ``dataflow run`` builds them (validated; stage
    modules found next to the file)."""
    import sys

    from dataflow.execution.build import plan_pipeline, stage_defs
    from dataflow.pipeline import load_graph, stage_search_path

    sys.path.extend(f for f in stage_search_path(path) if f not in sys.path)
    graph, plan = plan_pipeline(load_graph(str(path), dict(params or {})))
    return stage_defs(graph, plan)
