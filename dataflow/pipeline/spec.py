"""A loaded pipeline as plain, frozen data (Clara PDL 0.4.0/0.5.0 plus our extensions).

Every spec knows where it was written: ``location`` is where its entry starts and
``locations`` maps each field given (``"from"``, ``"element-type"``, ...) to where its value
starts; :meth:`at` picks the best of the two for a message.

Placeholders are already filled in, imports already resolved (imported operators appear in
``PipelineSpec.operators`` in import order) and pipeline-level ``variables`` already merged
into each operator's. Nothing here is checked against Python stage classes or the graph: that
is :func:`dataflow.pipeline.validate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dataflow.pipeline.diagnostics import Diagnostic, Location
from dataflow.stage import Port

__all__ = [
    "ContainerSpec",
    "InputSpec",
    "OperatorSpec",
    "OutputSpec",
    "PipelineSpec",
    "Requests",
]

_spec = dataclasses.dataclass(frozen=True, kw_only=True)


@_spec
class _Located:
    location: Location
    locations: dict[str, Location] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def at(self, field: str) -> Location:
        """Where ``field``'s value was written, or where this entry starts."""
        return self.locations.get(field, self.location)


@_spec
class _PortSpec(_Located):
    name: str | None = None
    path: str | None = None
    type: str | None = None  # normalised: "array", "string", "stream" or a primitive ("int16")
    element_type: str | None = None
    shape: tuple[int, ...] | None = None  # 0 (Clara's other "dynamic") is stored as -1

    @property
    def typed(self) -> bool:
        return self.type is not None

    def declared_port(self) -> Port | None:
        """The :class:`Port` the YAML declares, or None when it gives no ``type`` (a 0.4.0
        untyped disk directory, or a Python stage's port taken from its class)."""
        if self.type is None:
            return None
        return Port(self.type, element_type=self.element_type, shape=self.shape)

    def describe(self) -> str:
        if self.type is None:
            return "untyped disk directory"
        if self.type == "array":
            shape = "?" if self.shape is None else ", ".join(map(str, self.shape))
            return f"array<{self.element_type or '?'}>[{shape}]"
        if self.type == "stream":
            return f"stream<{self.element_type or '?'}>"
        return self.type


@_spec
class InputSpec(_PortSpec):
    """One ``input`` entry.

    ``source`` is Clara's ``from``: the upstream operator, or None for the job's input.
    ``name`` is the upstream output it binds (Clara). ``port`` (our extension) is the Python
    stage's input port when it differs from ``name``.
    """

    source: str | None = None
    port: str | None = None

    @property
    def port_name(self) -> str | None:
        """The stage input port this entry binds: ``port``, else ``name``."""
        return self.port or self.name


@_spec
class OutputSpec(_PortSpec):
    """One ``output`` entry. ``name`` may be None when it is its operator's only output."""


@_spec
class ContainerSpec(_Located):
    """Clara's ``container``: ``image`` (``tag`` defaults to latest) and ``command``."""

    image: str | None = None
    tag: str | None = None
    command: tuple[str, ...] = ()

    @property
    def reference(self) -> str | None:
        """``image:tag`` as a container runtime wants it (``latest`` when no tag is given)."""
        if self.image is None:
            return None
        if self.tag is not None:
            return f"{self.image}:{self.tag}"
        last = self.image.rsplit("/", 1)[-1]
        return self.image if (":" in last or "@" in last) else f"{self.image}:latest"


@_spec
class Requests(_Located):
    """Clara's ``requests``: ``cpu`` cores, ``gpu`` whole GPUs, ``memory`` in MB; and our
    ``resources``: custom resources a Ray node was started with (name -> amount), which pin
    the stage's replicas to such nodes (the local executor, one machine, ignores them).

    None means "not given" (Clara's defaults: 1 shared CPU, no GPU, 512 MB).
    """

    location: Location | None = None  # type: ignore[assignment]
    cpu: float | None = None
    gpu: int | None = None
    memory: int | None = None
    resources: dict[str, float] = dataclasses.field(default_factory=dict)


@_spec
class OperatorSpec(_Located):
    """One operator: a Python ``stage`` (our extension) or a Clara ``container``."""

    name: str
    description: str = ""
    stage: str | None = None  # "package.module:ClassName"
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)
    container: ContainerSpec | None = None
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    requests: Requests = dataclasses.field(default_factory=Requests)
    variables: dict[str, str] = dataclasses.field(default_factory=dict)
    parameters: dict[str, str | None] = dataclasses.field(default_factory=dict)
    replicas: int = 1
    timeout: float | None = None  # seconds per job
    services: tuple[Any, ...] = ()  # Clara services (deprecated), kept as plain data
    models: tuple[str, ...] = ()  # Clara 0.6.0 model names, kept
    api_version: str | None = None

    @property
    def kind(self) -> str:
        """``"stage"`` or ``"container"``."""
        return "stage" if self.stage is not None else "container"


@_spec
class PipelineSpec(_Located):
    """A whole pipeline file, imports resolved and placeholders filled in."""

    name: str
    path: str  # the file as given to load_pipeline
    api_version: str | None = None
    description: str = ""
    parameters: dict[str, str | None] = dataclasses.field(default_factory=dict)
    variables: dict[str, str] = dataclasses.field(default_factory=dict)
    operators: tuple[OperatorSpec, ...] = ()
    timeout: float | None = None  # seconds per job, from its first stage to its last
    #: Warnings and notes found while loading (errors make loading fail instead).
    diagnostics: tuple[Diagnostic, ...] = dataclasses.field(default=(), compare=False)

    def operator(self, name: str) -> OperatorSpec:
        """The operator named ``name`` (names are case-insensitive); KeyError if none."""
        for op in self.operators:
            if op.name.casefold() == name.casefold():
                return op
        raise KeyError(f"pipeline {self.name!r} has no operator {name!r}")
