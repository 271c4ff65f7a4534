"""One job through one stage: inputs bound, ``execute`` called, outputs published — the same
code in a stage worker and in :mod:`dataflow.testing`.

Where the inputs come from and where the outputs go is the only difference, and it is behind
:class:`Edges`, two methods: the worker's implementation reads store objects and publishes into
the store (:class:`dataflow.execution.worker.StoreEdges`), the test harness's takes the values
the author gave and keeps what the stage returned (:class:`dataflow.testing.DictEdges`).
Everything else — the metadata each input carries, the context's job, the stream outputs'
default folders, the outputs checked against the ports, the metadata an array output carries
downstream (:func:`dataflow.stage.output_values`) — is here, once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from dataflow.stage import Port, Stage, StageContext, collect_outputs, output_values

__all__ = ["Edges", "job_log_path", "job_scope", "run_job"]


class Edges(Protocol):
    """What a job's inputs are read from and its outputs written to."""

    def read(self, port: str, ref: Any, spec: Port) -> tuple[Any, Mapping[str, Any] | None]:
        """The value the stage gets for input ``port`` given what travelled on its edge, and
        the metadata that value carries (None: it carries none: not an array)."""
        ...

    def write(self, port: str, value: Any, spec: Port) -> Any:
        """Publish output ``port``'s value (an array output as a :class:`Tensor` with the
        metadata it carries downstream; a stream as its folder); returns what travels on."""
        ...


def run_job(
    instance: Stage,
    ctx: StageContext,
    edges: Edges,
    inputs: Mapping[str, Any],
    *,
    job_id: str,
    job_name: str,
    payload_dir: Path | None = None,
    timeout: float | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one job: returns (the outputs as the stage returned them, checked against its
    ports; what :meth:`Edges.write` returned for each)."""
    values: dict[str, Any] = {}
    metadata: dict[str, Mapping[str, Any]] = {}
    specs = instance.inputs
    for port, ref in inputs.items():
        value, meta = edges.read(port, ref, specs[port])
        values[port] = value
        if meta is not None:
            metadata[port] = meta
    ctx.begin_job(job_id, job_name, payload_dir=payload_dir, metadata=metadata, timeout=timeout,
                  provenance=provenance)  # fmt: skip
    result = instance.execute(ctx, **values)
    outputs = instance.outputs
    defaults = {port: ctx.output_dir(port) for port, p in outputs.items() if p.type == "stream"}
    collected = collect_outputs(instance, result, ctx.stage, defaults=defaults)
    published = {
        port: edges.write(port, value, outputs[port])
        for port, value in output_values(instance, collected, metadata).items()
    }
    return collected, published


def job_log_path(output_root: str | Path, job_name: str, stage: str, keep: bool) -> Path | None:
    """Where a stage's log of one job is kept (``OUTPUT_ROOT/<job>/.logs/<stage>.log``), or
    None when its executor keeps no job logs (``job_logs``)."""
    return Path(output_root) / job_name / ".logs" / f"{stage}.log" if keep else None


@contextlib.contextmanager
def job_scope(payload: Path | None, log: Path | None) -> Iterator[None]:
    """While a worker (a process, or a Ray actor) runs one job: the patient identifiers of
    the job's folder ``payload`` (read only if something is logged) redacted by value from
    whatever it logs or prints; with ``log``, all of that also kept in that file (the job's
    log of this stage, which ``dataflow serve`` keeps beside the job's outputs)."""
    from dataflow.identifiers import identifiers_of
    from dataflow.logs import identifying, job_log

    with contextlib.ExitStack() as scope:
        if payload is not None:
            scope.enter_context(identifying(functools.partial(identifiers_of, payload)))
        if log is not None:
            scope.enter_context(job_log(log))
        yield
