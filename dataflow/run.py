"""``dataflow run``: every job found under an input folder, streamed through a pipeline.

Jobs: if the input folder has sub-folders, each sub-folder is one job (named after it, in
sorted order); otherwise the folder itself is one job. A job's folder is the pipeline's job
input (what Clara's DICOM adapter uploaded as the payload).

Outputs, under ``--output`` (default ``./output``), per job ``JOB/``:

- ``OPERATOR/OUTPUT/`` — the folder a stream output wrote (any operator, consumed or not);
- ``OPERATOR/OUTPUT.npy`` and ``.json`` — an array result (an output nobody consumes) and its
  metadata; strings and numbers go to ``JOB/results.json``;

and ``summary.json``: every job's status, time, input (folder, number of files) and outputs
(files, relative to ``--output``), and the failing stage and reason.

A re-run replaces each job's folder as a whole once the job is done, never mixing two runs'
files; a non-empty ``--output`` that no earlier run wrote is refused unless ``overwrite``
(:mod:`dataflow.output`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dataflow.errors import MissingFile
from dataflow.execution.build import plan_pipeline, stage_defs
from dataflow.execution.local import JobResult, LocalExecutor
from dataflow.execution.state import Limits
from dataflow.output import SUMMARY, OutputError, RunOutput, count_files

__all__ = [
    "OutputError",
    "RunSummary",
    "build_executor",
    "check_jobs",
    "find_jobs",
    "run_pipeline_file",
    "write_result",
]


@dataclasses.dataclass
class RunSummary:
    pipeline: str
    output: Path
    results: list[JobResult]
    seconds: float
    stage_jobs: dict[str, int]
    stage_seconds: dict[str, float]
    inputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    outputs: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if not r.ok]


def find_jobs(input_path: str | Path) -> list[tuple[str, Path]]:
    """``(job name, folder)`` pairs under ``input_path`` (see the module docstring)."""
    root = Path(input_path)
    if not root.is_dir():
        raise MissingFile(f"--input {input_path}: not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        return [(p.name, p.resolve()) for p in subdirs]
    return [(root.resolve().name or "job", root.resolve())]


def check_jobs(input_path: str | Path, jobs: list[tuple[str, Path]]) -> dict[str, int]:
    """The number of files each job's folder holds. MissingFile (a FileNotFoundError) at once
    (before any worker starts) when ``--input`` holds no file, or some job folders are empty
    (named)."""
    counts = {name: count_files(folder) for name, folder in jobs}
    empty = [name for name, n in counts.items() if n == 0]
    if len(empty) == len(counts):
        raise MissingFile(
            f"--input {input_path}: holds no files (hidden ones are skipped); give a study "
            "folder of DICOM files, or a folder of such study folders"
        )
    if empty:
        shown = ", ".join(empty[:4]) + (f" and {len(empty) - 4} more" if len(empty) > 4 else "")
        raise MissingFile(
            f"--input {input_path}: {len(empty)} of {len(counts)} job folder(s) hold no "
            f"files: {shown}; remove them or add their studies' files"
        )
    return counts


def write_result(output: Path, result: JobResult) -> None:
    """Write a job's array and value results under ``output/JOB``."""
    job_dir = output / result.job
    values: dict[str, Any] = {}
    for (stage, port), value in result.outputs.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], np.ndarray):
            array, meta = value
            (job_dir / stage).mkdir(parents=True, exist_ok=True)
            np.save(job_dir / stage / f"{port}.npy", array)
            (job_dir / stage / f"{port}.json").write_text(json.dumps(meta, indent=2) + "\n")
        elif isinstance(value, Path):
            continue  # a stream output: already written in place
        elif isinstance(value, (str, int, float, bool)) or value is None:
            values[f"{stage}.{port}"] = value
    if values:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "results.json").write_text(json.dumps(values, indent=2) + "\n")


def run_pipeline_file(
    path: str | Path,
    input_path: str | Path,
    *,
    output: str | Path = "output",
    overwrite: bool = False,
    params: Mapping[str, str] | None = None,
    replicas: Mapping[str, int] | None = None,
    limits: Limits | None = None,
    store_budget: str | int = "1GiB",
    log_format: str = "console",
    on_start: Callable[[list[tuple[str, Path]], Any, LocalExecutor], None] | None = None,
    on_result: Callable[[JobResult], None] | None = None,
    executor: str = "local",
    address: str | None = None,
    placement: str | None = None,
) -> RunSummary:
    """Load, validate, place and run a pipeline over every job under ``input_path``
    (``executor``: ``local``, or ``ray`` on the Ray cluster at ``address``, its replicas
    reserved together with ``placement`` when given: docs/ray.md).

    Each job's folder under ``output`` is replaced by this run's once the job is done;
    ``overwrite`` allows a non-empty ``output`` that no earlier run wrote (else OutputError)."""
    jobs = find_jobs(input_path)
    files = check_jobs(input_path, jobs)
    with RunOutput(output, overwrite=overwrite).open(Path(input_path)) as out:
        assert out.staging is not None
        graph, runner = build_executor(
            path, out.staging, params=params, replicas=replicas, limits=limits,
            store_budget=store_budget, log_format=log_format, executor=executor,
            address=address, placement=placement,
        )  # fmt: skip
        summary = RunSummary(
            pipeline=graph.spec.name, output=out.root, results=[], seconds=0.0,
            stage_jobs={}, stage_seconds={},
            inputs={name: {"folder": str(folder), "files": files[name]} for name, folder in jobs},
        )  # fmt: skip
        if on_start is not None:
            on_start(jobs, graph, runner)

        def record(result: JobResult) -> None:
            write_result(out.staging, result)
            summary.outputs[result.job] = out.commit(result.job)
            if not result.ok:  # a path in the message names where the file now is
                staged = str(out.staging)
                result.reason = result.reason.replace(staged, str(out.root))
                result.details = result.details.replace(staged, str(out.root))
            summary.results.append(result)
            _write_summary(summary, complete=False)
            if on_result is not None:
                on_result(result)

        t0 = time.monotonic()
        runner.run(jobs, record)
        summary.seconds = time.monotonic() - t0
        summary.stage_jobs = dict(runner.stage_jobs)
        summary.stage_seconds = dict(runner.stage_seconds)
        _write_summary(summary)
    return summary


def build_executor(
    path: str | Path,
    output_root: Path,
    *,
    params: Mapping[str, str] | None = None,
    replicas: Mapping[str, int] | None = None,
    limits: Limits | None = None,
    store_budget: str | int = "1GiB",
    log_format: str = "console",
    stage_timeout: float | None = None,
    job_timeout: float | None = None,
    memory_limit: int | None = None,
    executor: str = "local",
    address: str | None = None,
    placement: str | None = None,
) -> tuple[Any, Any]:
    """Load, validate and place a pipeline; (graph, an executor for it, not yet started).
    Raises PipelineError or PlacementError before anything starts.

    Defaults a pipeline's own settings override: ``stage_timeout`` (seconds) for operators
    without ``timeout:``, ``job_timeout`` (seconds) unless the pipeline sets ``timeout:``,
    ``memory_limit`` (bytes) per worker of an operator without ``requests.memory``. Given
    ``limits``, these replace its fields when not None. ``executor="ray"``: a
    :class:`dataflow.execution.rayexec.RayExecutor` on the cluster at ``address`` instead,
    the pipeline refused if the cluster's nodes cannot hold it (``placement``: every replica
    reserved at once in a Ray placement group of that strategy)."""
    from dataflow.pipeline import load_graph, stage_search_path

    # Stage classes travel to the (spawned) workers by reference, and a spawned process
    # unpickles them before any code of ours runs: it imports from the sys.path it inherits.
    folders = stage_search_path(path)
    sys.path.extend(f for f in folders if f not in sys.path)
    graph = load_graph(str(path), dict(params or {}))  # PipelineError on any error
    limits = limits or Limits()
    job_timeout = graph.spec.timeout if graph.spec.timeout is not None else job_timeout
    if job_timeout is not None:
        limits = dataclasses.replace(limits, job_timeout=job_timeout)
    if stage_timeout is not None:
        limits = dataclasses.replace(limits, stage_timeout=stage_timeout)
    if executor == "ray":
        from dataflow.execution.rayexec import build_ray_executor

        output_root.mkdir(parents=True, exist_ok=True)
        return build_ray_executor(
            graph, output_root, address=address, replicas=replicas, limits=limits,
            memory_limit=memory_limit, extra_sys_path=folders, placement=placement,
            store_budget=store_budget,
        )  # fmt: skip
    graph, plan = plan_pipeline(graph, replicas=replicas)  # PlacementError before anything runs
    output_root.mkdir(parents=True, exist_ok=True)
    executor = LocalExecutor(
        stage_defs(graph, plan, memory_limit=memory_limit),
        output_root=output_root,
        limits=limits,
        store_budget=store_budget,
        log_format=log_format,
        extra_sys_path=folders,
        progress_context={"pipeline": graph.spec.name},  # stage_starting ... pipeline_ready
    )
    return graph, executor


def _write_summary(summary: RunSummary, *, complete: bool = True) -> None:
    """``summary.json`` (rewritten after each job, so an interrupted run leaves one too)."""
    data = {
        "pipeline": summary.pipeline,
        "complete": complete,
        "seconds": round(summary.seconds, 3),
        "jobs": len(summary.inputs) or len(summary.results),
        "failed": len(summary.failed),
        "results": [
            {
                "job": r.job,
                "ok": r.ok,
                "seconds": round(r.seconds, 3),
                **({} if r.ok else {"stage": r.stage, "reason": r.reason, "details": r.details}),
                "input": summary.inputs.get(r.job, {}),
                "outputs": summary.outputs.get(r.job, []),
            }
            for r in summary.results
        ],
        "stages": {
            name: {
                "jobs": summary.stage_jobs[name],
                "busy_seconds": round(summary.stage_seconds[name], 3),
            }
            for name in summary.stage_jobs
        },
    }
    target = summary.output / SUMMARY
    partial = target.with_name(f".{SUMMARY}.partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, target)
