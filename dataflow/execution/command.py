"""Clara ``container`` operators: a command run once per job, with its I/O on disk.

Clara ran each operator as a container whose inputs and outputs were mounted volumes. Here a
container operator's ``command`` runs as a local subprocess for each job (or, when its
``image`` is named and Docker or Podman answers, as ``ENGINE run`` of that image with the
directories mounted at the declared paths; ``DATAFLOW_CONTAINER_ENGINE=none`` turns that
off). Its inputs and outputs are directories:

- each input is the job's input folder (no ``from``) or the upstream operator's output folder;
- each output is a fresh folder ``OUTPUT_ROOT/JOB/OPERATOR/OUTPUT``.

The command finds them in the environment, as Clara's driver gave them:

| variable | value |
|---|---|
| ``NVIDIA_CLARA_INPUTPATHS`` | ``name:path`` entries joined by ``;`` (one entry per input) |
| ``NVIDIA_CLARA_OUTPUTPATHS`` | the same for outputs |
| ``NVIDIA_CLARA_INPUT`` / ``NVIDIA_CLARA_OUTPUT`` | the first input / output directory |
| ``DATAFLOW_INPUT_<NAME>``, ``DATAFLOW_OUTPUT_<NAME>`` | each directory by port name (*) |
| ``NVIDIA_CLARA_JOBID``, ``_JOBNAME``, ``_STAGENAME`` | the job and the operator |
| ``NVIDIA_CLARA_NOSYNCLOCK`` | ``1`` (no Clara driver to wait for) |

(*) upper case, ``-`` as ``_``; plus the pipeline's and the operator's ``variables``. A
subprocess is not chrooted: the declared ``path`` (e.g. ``/input``) is only honoured inside a
container engine.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dataflow.machine import container_engine
from dataflow.stage import Port, Stage, StageContext, StageError

__all__ = ["CommandStage"]

DISK = "disk"  # the element-type label of untyped (api-version 0.4.0) disk I/O


def _env_name(port: str) -> str:
    return port.upper().replace("-", "_")


class CommandStage(Stage):
    """Runs a Clara container operator's command for each job (see module docstring)."""

    def __init__(
        self,
        command: Sequence[str] = (),
        inputs: Mapping[str, str | None] | None = None,
        outputs: Mapping[str, str | None] | None = None,
        input_types: Mapping[str, str] | None = None,
        output_types: Mapping[str, str] | None = None,
        variables: Mapping[str, str] | None = None,
        image: str | None = None,
        tag: str = "latest",
        use_engine: bool = True,
    ) -> None:
        self.command = [str(c) for c in command]
        self.input_paths = dict(inputs or {})  # port -> declared path in the container
        self.output_paths = dict(outputs or {})
        self.inputs = {
            p: Port("stream", element_type=(input_types or {}).get(p) or DISK)
            for p in self.input_paths
        }
        self.outputs = {
            p: Port("stream", element_type=(output_types or {}).get(p) or DISK)
            for p in self.output_paths
        }
        self.variables = {str(k): str(v) for k, v in (variables or {}).items()}
        self.image, self.tag = image, tag
        self.engine = container_engine() if (image and use_engine) else None
        if not self.command and self.engine is None:
            what = f"image {image!r} needs Docker or Podman" if image else "it has no command"
            raise StageError(f"cannot run this container operator here: {what}")

    def execute(self, ctx: StageContext, **inputs: Any) -> dict[str, Path]:
        outputs = {port: ctx.output_dir(port) for port in self.outputs}  # type: ignore[attr-defined]
        if self.engine is None:
            seen_in, seen_out = inputs, outputs
        else:  # inside the container the directories are at the declared paths
            seen_in = {p: self.input_paths.get(p) or f"/input/{p}" for p in inputs}
            seen_out = {p: self.output_paths.get(p) or f"/output/{p}" for p in outputs}
        env = {**os.environ, **self.variables, **self._clara_env(ctx, seen_in, seen_out)}
        argv = self._argv(inputs, outputs)
        try:
            done = subprocess.run(
                argv, env=env, cwd=ctx.scratch_dir, capture_output=True, text=True,
                timeout=ctx.time_left, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except FileNotFoundError:
            raise StageError(f"command {argv[0]!r} not found") from None
        except subprocess.TimeoutExpired:
            raise StageError(f"command {argv[0]!r} ran past the stage timeout") from None
        for stream, text in (("stdout", done.stdout), ("stderr", done.stderr)):
            if text.strip():
                ctx.log.info("command_output", stream=stream, text=text[-4000:])
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-2000:]
            raise StageError(f"command {argv[0]!r} exited with code {done.returncode}: {tail}")
        return outputs

    def _clara_env(self, ctx, inputs: Mapping[str, Any], outputs: Mapping[str, Path]):
        env = {
            "NVIDIA_CLARA_INPUTPATHS": ";".join(f"{p}:{v}" for p, v in inputs.items()),
            "NVIDIA_CLARA_OUTPUTPATHS": ";".join(f"{p}:{v}" for p, v in outputs.items()),
            "NVIDIA_CLARA_JOBID": str(ctx.job_id),
            "NVIDIA_CLARA_JOBNAME": str(ctx.job_name),
            "NVIDIA_CLARA_STAGENAME": ctx.stage,
            "NVIDIA_CLARA_NOSYNCLOCK": "1",
        }
        if inputs:
            env["NVIDIA_CLARA_INPUT"] = str(next(iter(inputs.values())))
        if outputs:
            env["NVIDIA_CLARA_OUTPUT"] = str(next(iter(outputs.values())))
        env.update({f"DATAFLOW_INPUT_{_env_name(p)}": str(v) for p, v in inputs.items()})
        env.update({f"DATAFLOW_OUTPUT_{_env_name(p)}": str(v) for p, v in outputs.items()})
        return env

    def _argv(self, inputs: Mapping[str, Any], outputs: Mapping[str, Path]) -> list[str]:
        if self.engine is None:
            return list(self.command)
        argv = [self.engine, "run", "--rm", "--network", "none"]
        for port, host in inputs.items():
            target = self.input_paths.get(port) or f"/input/{port}"
            argv += ["-v", f"{host}:{target}:ro"]
        for port, host in outputs.items():
            target = self.output_paths.get(port) or f"/output/{port}"
            argv += ["-v", f"{host}:{target}"]
        for key, value in self.variables.items():
            argv += ["-e", f"{key}={value}"]
        return [*argv, f"{self.image}:{self.tag}", *self.command]
