"""QIDO-RS and WADO-RS against one DICOMweb server (dicomweb-client): the DICOMweb side of
:mod:`connectors.dicom.query.scu`.

A :class:`WebSource` is a PACS's DICOMweb base URL (e.g. Orthanc's ``.../dicom-web``);
:func:`qido` searches studies or series (QIDO-RS), :func:`wado` retrieves a study or one of its
series into a folder (WADO-RS, ``application/dicom`` parts). The same failures as the DIMSE
calls, with the same bounded :class:`~connectors.dicom.query.scu.Retry`:

- :class:`PacsUnavailableError`: no connection, a time-out, HTTP 429 or 5xx: retried, then
  raised naming the server;
- :class:`NotFoundError`: the study (series) is not there (QIDO-RS matches nothing, or WADO-RS
  answers 404);
- :class:`QueryError`: any other HTTP error (401/403: credentials, 400...), not retried.

dicomweb-client's own retries are off: :class:`Retry` counts the attempts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import structlog
from pydicom.dataset import Dataset

from .scu import (
    NotFoundError,
    PacsUnavailableError,
    QueryError,
    RetrieveError,
    RetrieveResult,
    Retry,
)

__all__ = ["WebSource", "qido", "wado", "web_source_from"]

log = structlog.get_logger("connectors.dicom.query")

_KEYS = {"protocol", "url", "timeout", "token-env", "tls"}


@dataclass(frozen=True)
class WebSource:
    """A DICOMweb server: ``url`` (its base, under which ``/studies`` is), ``timeout`` (seconds,
    each request's connection and each read), ``token_env`` (the name of an environment
    variable holding a bearer token: the token itself is never in a setting), ``tls_ca`` (a CA
    bundle for https)."""

    name: str
    url: str
    timeout: float = 30.0
    token_env: str | None = None
    tls_ca: str | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.url})"

    def client(self, session: requests.Session):
        """A dicomweb-client over ``session`` (the caller closes it), its own retries off."""
        from dicomweb_client.api import DICOMwebClient

        if self.tls_ca:
            session.verify = self.tls_ca
        headers = {}
        if self.token_env:
            token = os.environ.get(self.token_env)
            if not token:
                raise QueryError(f"{self.describe()}: the environment variable "
                                 f"{self.token_env} (token-env) is not set")  # fmt: skip
            headers["Authorization"] = f"Bearer {token}"
        client = DICOMwebClient(self.url, session=session, headers=headers or None,
                                timeout=self.timeout)  # fmt: skip
        client.set_http_retry_params(retry=False)
        return client


def web_source_from(settings: Mapping[str, Any], name: str = "pacs") -> WebSource:
    """A :class:`WebSource` from a stage's ``pacs`` mapping: ``protocol: dicomweb``, ``url``,
    ``timeout`` (30 s), ``token-env``, ``tls`` (``ca``)."""
    unknown = sorted(set(settings) - _KEYS)
    if unknown:
        raise QueryError(f"{name}: unknown key(s) {unknown} for a DICOMweb source; known: "
                         f"{sorted(_KEYS)}")  # fmt: skip
    url = str(settings.get("url") or "").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise QueryError(f"{name}: url {url!r} must be an http:// or https:// URL")
    tls = settings.get("tls") or {}
    if not isinstance(tls, Mapping) or set(tls) - {"ca"}:
        raise QueryError(f"{name}: tls of a DICOMweb source has one key, ca")
    try:
        timeout = float(settings.get("timeout", 30))
    except (TypeError, ValueError):
        raise QueryError(f"{name}: timeout {settings.get('timeout')!r} is not seconds") from None
    if not 0 < timeout <= 3600:
        raise QueryError(f"{name}: timeout {timeout} must be 0..3600 seconds")
    token_env = settings.get("token-env")
    return WebSource(name=name, url=url, timeout=timeout,
                     token_env=str(token_env) if token_env else None,
                     tls_ca=str(tls["ca"]) if tls.get("ca") else None)  # fmt: skip


def _call(source: WebSource, what: str, call) -> Any:
    """``call(client)``, with its failures as query errors (see the module docstring)."""
    session = requests.Session()
    try:
        return call(source.client(session))
    except (requests.ConnectionError, requests.Timeout) as exc:
        kind = "time-out" if isinstance(exc, requests.Timeout) else "no connection"
        raise PacsUnavailableError(f"{source.describe()}: {what}: {kind}") from None
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status == 404:
            raise NotFoundError(f"{source.describe()}: {what}: HTTP 404") from None
        if status == 429 or status >= 500:
            raise PacsUnavailableError(f"{source.describe()}: {what}: HTTP {status}") from None
        raise QueryError(f"{source.describe()}: {what}: HTTP {status}") from None
    finally:
        session.close()


def _fields(keys: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """QIDO-RS search filters (the keys with a value) and the fields asked back (all keys)."""
    filters = {k: v for k, v in keys.items() if v not in (None, "")}
    return filters, list(keys)


def qido(
    source: WebSource,
    level: str,
    keys: Mapping[str, Any],
    *,
    retry: Retry = Retry(),
    cancel: Any = None,
) -> list[Dataset]:
    """QIDO-RS: the studies (``STUDY``) or series (``SERIES``; ``StudyInstanceUID`` among the
    keys names the study) matching ``keys`` (keywords -> values; an empty value asks for that
    attribute back), as datasets like a C-FIND's identifiers. ``PATIENT``: one dataset per
    PatientID of the matching studies (QIDO-RS has no patient level)."""
    filters, fields = _fields(keys)

    def search(client) -> list[dict]:
        if level in ("STUDY", "PATIENT"):
            return client.search_for_studies(search_filters=filters, fields=fields,
                                             get_remaining=True)  # fmt: skip
        if level == "SERIES":
            study = filters.pop("StudyInstanceUID", None)
            return client.search_for_series(study_instance_uid=study, search_filters=filters,
                                            fields=fields, get_remaining=True)  # fmt: skip
        raise QueryError(f"QIDO-RS level {level!r} must be PATIENT, STUDY or SERIES")

    found = retry.run(f"QIDO-RS {level}", lambda: _call(source, f"QIDO-RS {level}", search),
                      cancel)  # fmt: skip
    datasets = [Dataset.from_json(item) for item in found or []]
    if level != "PATIENT":
        return datasets
    patients: dict[str, Dataset] = {}
    for ds in datasets:
        patient = Dataset()
        patient.PatientID = ds.get("PatientID", "")
        if "PatientName" in ds:
            patient.PatientName = ds.PatientName
        patients.setdefault(str(patient.PatientID), patient)
    return list(patients.values())


def _check_there(source: WebSource, study_uid, series_uid, retry, cancel) -> None:
    found = qido(source, "STUDY", {"StudyInstanceUID": study_uid}, retry=retry, cancel=cancel)
    if found and series_uid:
        found = qido(source, "SERIES",
                     {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid},
                     retry=retry, cancel=cancel)  # fmt: skip
    if not found:
        what = f"series {series_uid} of study {study_uid}" if series_uid else f"study {study_uid}"
        raise NotFoundError(f"{what} is not on {source.describe()}")


def _write(folder: Path, ds: Dataset, files: list[Path]) -> None:
    uid = str(ds.get("SOPInstanceUID", "")).strip()
    if not uid or "/" in uid or uid.startswith("."):
        raise QueryError(f"WADO-RS returned an instance without a usable SOP Instance UID: {uid!r}")
    path = folder / f"{uid}.dcm"
    part = path.with_suffix(".part")
    with open(part, "wb") as out:
        ds.save_as(out, enforce_file_format=True)
        out.flush()
        os.fsync(out.fileno())
    part.replace(path)
    if path not in files:
        files.append(path)


def wado(
    source: WebSource,
    study_uid: str,
    folder: str | Path,
    *,
    series_uid: str | None = None,
    retry: Retry = Retry(),
    cancel: Any = None,
) -> RetrieveResult:
    """WADO-RS: a study (or one series) into ``folder``, each instance as
    ``<SOP Instance UID>.dcm`` (fsynced, renamed into place). A QIDO-RS first says whether it
    is there (:class:`NotFoundError`). An attempt that breaks off part way is retried whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_there(source, study_uid, series_uid, retry, cancel)
    files: list[Path] = []

    def fetch(client) -> None:
        if series_uid:
            instances = client.iter_series(study_uid, series_uid)
        else:
            instances = client.iter_study(study_uid)
        for ds in instances:
            _write(folder, ds, files)

    retry.run("WADO-RS", lambda: _call(source, "WADO-RS", fetch), cancel)
    if not files:
        raise RetrieveError(f"{source.describe()}: WADO-RS of study {study_uid} retrieved "
                            "nothing")  # fmt: skip
    return RetrieveResult(0x0000, completed=len(files), files=sorted(files))
