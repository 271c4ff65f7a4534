"""Register results for export, as Clara's ``register-results`` operator did.

Clara's pipelines end with ``register.py --agent ClaraSCU --data '["MYPACS"]'``: the files of
its input folder become a *task* of the Results Service for an *agent* (``ClaraSCU`` sends
DICOM to the named destinations, ``DICOMweb`` posts them), which the DICOM adapter then
delivers. Here the stage writes the task as a folder of its own, self-contained::

    OUTPUT/JOB/register/task/
        task.json        # Clara's task record: taskId, jobId, agent, parameters, uris, state
        files/...        # the registered files (hard links where possible, else copies)

``uris`` are relative to ``files/`` (:mod:`dataflow.registered` owns the format). ``dataflow
run`` leaves the task there (it has no PACS to send to); the export service picks such tasks
up and delivers them with retries.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from dataflow.durable import link_or_copy
from dataflow.registered import FILES, Registration
from dataflow.stage import ParameterError, Port, Stage, StageError

__all__ = ["AGENT_RE", "RegisterResults", "register_files"]

#: Clara's rule for an agent name: alphanumerics and '-', starts with a letter, no final '-'.
AGENT_RE = re.compile(r"^[A-Za-z](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
#: A destination name (what a pipeline names, configured in the service): same alphabet.
DESTINATION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def register_files(
    folder: Path,
    out: Path,
    *,
    agent: str,
    destinations: list[str],
    job_id: str,
    job_name: str | None = None,
) -> dict:
    """Write the task for every file under ``folder`` into ``out``; returns the task record
    (``task.json``'s keys: :meth:`dataflow.registered.Registration.to_json`).
    What ``out`` held before (an earlier attempt at the same job) is replaced: the task
    lists exactly the files under ``folder``. Its ``taskId`` is new each time, so that the
    export service never takes a new registration for one it has already sent."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    if not files:
        raise StageError(f"nothing to register: the input folder {folder.name!r} has no files")
    shutil.rmtree(out / FILES, ignore_errors=True)
    uris = []
    for path in files:
        relative = path.relative_to(folder)
        link_or_copy(path, out / FILES / relative)
        uris.append(relative.as_posix())
    registration = Registration.new(
        job_id=job_id, agent=agent, destinations=destinations, uris=uris, job_name=job_name
    )
    registration.write(out)
    return registration.to_json()


class RegisterResults(Stage):
    """Registers the files of ``input`` (e.g. a SEG writer's folder) for export by ``agent``
    to the named ``destinations`` (Clara's ``--agent`` and ``--data``)."""

    inputs = {"input": Port("stream", element_type="dicom", description="files to export")}
    outputs = {"task": Port("stream", element_type="json", description="task.json + files/")}

    def __init__(self, destinations: list[str] | None = None, agent: str = "ClaraSCU"):
        if not AGENT_RE.match(agent):
            raise ParameterError(
                f"RegisterResults: agent {agent!r} must be letters, digits and '-', starting "
                "with a letter and not ending with '-' (e.g. ClaraSCU)"
            )
        names = list(destinations or [])
        bad = [d for d in names if not isinstance(d, str) or not DESTINATION_RE.match(d)]
        if bad:
            raise ParameterError(
                f"RegisterResults: destination name(s) {bad} must be 1-64 letters, digits, "
                "'.', '_' or '-'"
            )
        if agent == "ClaraSCU" and not names:
            raise ParameterError("RegisterResults: agent ClaraSCU needs at least one destination")
        self.agent, self.destinations = agent, names

    def execute(self, ctx, input: Path) -> Path:
        out = ctx.output_dir("task")
        task = register_files(
            Path(input),
            out,
            agent=self.agent,
            destinations=self.destinations,
            job_id=ctx.job_id or "",
            job_name=ctx.job_name,
        )
        ctx.log.info(
            "results_registered",
            agent=self.agent,
            destinations=self.destinations,
            files=len(task["uris"]),
        )
        return out
