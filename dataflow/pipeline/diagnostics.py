"""Where a problem in a pipeline file is, how bad it is, and how it prints.

Every finding is a :class:`Diagnostic`: a severity (``error``, ``warning``, ``note``), a
:class:`Location` (``FILE:LINE:COLUMN``, 1-based), the operator and the field it concerns, and a
message. One prints as::

    pipelines/x.yaml:12:7: error: operator 'seg' field 'input[0].from': no operator named 'reder'

Loading raises :class:`PipelineError` carrying every error found; validating returns a
:class:`Report`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from dataflow.errors import DataflowError

if TYPE_CHECKING:
    from dataflow.pipeline.graph import Graph

__all__ = ["SEVERITIES", "Diagnostic", "Location", "PipelineError", "Report"]

#: Severities, most serious first.
SEVERITIES = ("error", "warning", "note")


@dataclasses.dataclass(frozen=True)
class Location:
    """A place in a file; ``line`` and ``column`` count from 1."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclasses.dataclass(frozen=True)
class Diagnostic:
    """One finding about a pipeline file."""

    severity: str
    location: Location
    message: str
    operator: str | None = None
    field: str | None = None

    def format(self) -> str:
        """``FILE:LINE:COL: error: operator 'x' field 'y': message``."""
        subject = []
        if self.operator is not None:
            subject.append(f"operator {self.operator!r}")
        if self.field is not None:
            subject.append(f"field {self.field!r}")
        head = f"{' '.join(subject)}: " if subject else ""
        return f"{self.location}: {self.severity}: {head}{self.message}"

    def __str__(self) -> str:
        return self.format()


class PipelineError(DataflowError):
    """A pipeline file cannot be used. The message holds one line per error, each starting
    with ``FILE:LINE:COLUMN:``; ``diagnostics`` holds every finding (warnings and notes too)."""

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        errors = [d for d in self.diagnostics if d.severity == "error"]
        super().__init__("\n".join(d.format() for d in errors or self.diagnostics))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]


@dataclasses.dataclass
class Report:
    """What validating a pipeline found; ``graph`` is the validated DAG when there is no error."""

    diagnostics: list[Diagnostic] = dataclasses.field(default_factory=list)
    graph: Graph | None = None

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]

    @property
    def notes(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "note"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings and notes allowed)."""
        return not self.errors

    def format(self, *, notes: bool = True) -> str:
        """One line per diagnostic: errors, then warnings, then notes (each in file order)."""
        shown = [*self.errors, *self.warnings, *(self.notes if notes else [])]
        return "\n".join(d.format() for d in shown)

    def raise_for_errors(self) -> None:
        """Raise :class:`PipelineError` if there is any error."""
        if self.errors:
            raise PipelineError(self.diagnostics)


class Collector(list[Diagnostic]):
    """Gathers diagnostics while loading or validating (internal)."""

    def add(
        self,
        severity: str,
        location: Location,
        message: str,
        *,
        operator: str | None = None,
        field: str | None = None,
    ) -> None:
        self.append(Diagnostic(severity, location, message, operator, field))

    def error(self, location: Location, message: str, **where: str | None) -> None:
        self.add("error", location, message, **where)

    def warning(self, location: Location, message: str, **where: str | None) -> None:
        self.add("warning", location, message, **where)

    def note(self, location: Location, message: str, **where: str | None) -> None:
        self.add("note", location, message, **where)

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self)

    def error_count(self) -> int:
        return sum(d.severity == "error" for d in self)
