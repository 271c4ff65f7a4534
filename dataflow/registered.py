"""Registered results: the ``task.json`` that a register-results stage writes beside the files
it registers, and the one place that reads and writes it.

A registration is a folder of its own, as Clara's Results Service kept a *task*::

    task/
        task.json        # taskId, jobId, jobName, agent, parameters, destinations, state,
        files/...        #   retries, uris (relative to files/)

``parameters`` is Clara's JSON-encoded string (``'["MYPACS"]'`` for the ClaraSCU agent);
``destinations`` is the same list, decoded. :meth:`Registration.read` checks every field it
uses and raises :class:`RegistrationError` naming the file and the field;
:meth:`Registration.write` writes what Clara wrote, key for key. The stage that writes one is
``operators.register``; the service (which hands it to the connector serving its agent) and
the DICOM exporter (which queues its files) read it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dataflow.errors import DataflowError

__all__ = ["FILES", "TASK_FILE", "Registration", "RegistrationError"]

TASK_FILE = "task.json"
FILES = "files"


class RegistrationError(DataflowError, ValueError):
    """A ``task.json`` that cannot be used (the message names the file and the field)."""


@dataclass(frozen=True)
class Registration:
    """One registration: what to export (``uris`` under ``files/``), for which ``agent`` and
    ``destinations``, on behalf of which job."""

    task_id: str
    job_id: str
    agent: str
    destinations: tuple[str, ...]
    uris: tuple[str, ...]
    job_name: str | None = None
    parameters: str = "[]"
    state: str = "Pending"
    retries: int = 0

    @classmethod
    def new(
        cls,
        *,
        job_id: str,
        agent: str,
        destinations: Iterable[str],
        uris: Iterable[str],
        job_name: str | None = None,
    ) -> Registration:
        """A fresh registration, with a new ``task_id`` (so that an exporter never takes it
        for one it has already sent)."""
        names = tuple(destinations)
        return cls(
            task_id=uuid.uuid4().hex,
            job_id=job_id,
            agent=agent,
            destinations=names,
            uris=tuple(uris),
            job_name=job_name,
            parameters=json.dumps(list(names)),  # Clara: a JSON-encoded string
        )

    # -- the folder ------------------------------------------------------------------------
    @staticmethod
    def present(folder: str | Path) -> bool:
        """Whether ``folder`` holds a registration (a ``task.json``)."""
        return (Path(folder) / TASK_FILE).is_file()

    @classmethod
    def read(cls, folder: str | Path) -> Registration:
        """The registration in ``folder``; :class:`RegistrationError` when its ``task.json`` is
        missing, not JSON, or a field is wrong. A record without ``taskId`` is named after
        its folder."""
        path = Path(folder) / TASK_FILE
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise RegistrationError(f"{path}: cannot be read ({exc.strerror})") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise RegistrationError(f"{path}: not JSON ({exc})") from None
        return cls.from_json(data, source=path)

    def write(self, folder: str | Path) -> Path:
        """Write ``folder/task.json`` (the folder's ``files/`` are the caller's); its path."""
        path = Path(folder) / TASK_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def files(self, folder: str | Path) -> list[tuple[Path, str]]:
        """(file, its URI) for each registered file of the registration in ``folder``."""
        base = Path(folder) / FILES
        return [(base / uri, uri) for uri in self.uris]

    # -- the record ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The record as Clara's Results Service kept it (the keys of ``task.json``)."""
        return {
            "taskId": self.task_id,
            "jobId": self.job_id,
            "jobName": self.job_name,
            "agent": self.agent,
            "parameters": self.parameters,
            "destinations": list(self.destinations),
            "state": self.state,
            "retries": self.retries,
            "uris": list(self.uris),
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str | Path) -> Registration:
        """Check and take the record ``data`` read from ``source`` (named in errors)."""
        if not isinstance(data, Mapping):
            raise RegistrationError(f"{source}: must be a JSON object; got {type(data).__name__}")

        def bad(field: str, wanted: str) -> RegistrationError:
            got = data[field]
            shown = repr(got) if len(repr(got)) <= 60 else f"{type(got).__name__} ..."
            return RegistrationError(f"{source}: field {field!r} must be {wanted}; got {shown}")

        def text(field: str, default: str | None) -> str | None:
            value = data.get(field)
            if value is None or value == "":
                return default
            if not isinstance(value, str):
                raise bad(field, "a string")
            return value

        def names(field: str) -> tuple[str, ...] | None:
            value = data.get(field)
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad(field, "a list of strings")
            return tuple(value)

        if "uris" not in data:
            raise RegistrationError(f"{source}: field 'uris' is missing (the registered files)")
        uris = names("uris") or ()
        for k, uri in enumerate(uris):
            parts = PurePosixPath(uri)
            if not uri or parts.is_absolute() or ".." in parts.parts or "\\" in uri:
                raise RegistrationError(
                    f"{source}: field 'uris' item {k} ({uri!r}) must be a path inside {FILES}/"
                )
        parameters = text("parameters", None)
        destinations = names("destinations")
        if not destinations and parameters:  # a record that only Clara's string names them in
            try:
                decoded = json.loads(parameters)
            except ValueError:
                decoded = None
            if isinstance(decoded, list) and all(isinstance(v, str) for v in decoded):
                destinations = tuple(decoded)
        retries = data.get("retries", 0)
        if not isinstance(retries, int) or isinstance(retries, bool):
            raise bad("retries", "a whole number")
        return cls(
            task_id=text("taskId", None) or Path(source).parent.name,
            job_id=text("jobId", "") or "",
            agent=text("agent", "") or "",
            destinations=destinations or (),
            uris=uris,
            job_name=text("jobName", None),
            parameters=parameters if parameters is not None else "[]",
            state=text("state", "Pending") or "Pending",
            retries=retries,
        )
