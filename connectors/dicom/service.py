"""The DICOM connector of ``dataflow serve``: the ``dicom:`` section of the service file.

Registered as the ``dicom`` entry point of ``dataflow.connectors`` (pyproject.toml), so the
engine finds it by name and never imports it. It maps the YAML section (docs/service.md,
examples/service.yaml) onto the receiver's and the exporter's own configuration, then:

- each completed group becomes one job per route (pipeline) through ``host.submit``, keyed by
  receiver, group and pipeline so that a group handed over twice (a crash between recording
  the jobs and marking the group dispatched) gives the same jobs; then the group is marked
  dispatched;
- each registered result of agent ``ClaraSCU`` becomes one outbox task per destination, keyed
  by the registration's task id and the destination (handed over twice: queued once).
- with ``stow:``, STOW-RS requests on the platform's REST port (``http_routes``) are stored
  by a receiver as its associations are (:mod:`connectors.dicom.receive.stow`);
- ``sources:`` are the PACS an order ("run pipeline P on study S from source X", the
  platform's ``POST /api/v1/jobs`` with ``order``) may name: ``order_sources()`` gives each
  one's settings, which the platform writes into the ordered job's ``order.json`` for its
  first stage (``operators.dicom.priors:FetchStudy``).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from connectors.dicom.config import CalledAE, Peer, ReceiverConfig, TLSConfig
from connectors.dicom.export.exporter import EXPORT_STATE, EXPORT_STATES, Exporter, OutboxAdmin
from connectors.dicom.export.outbox import Outbox, RetryPolicy
from connectors.dicom.export.sender import Destination
from connectors.dicom.export.stow import WebDestination
from connectors.dicom.query import QueryError, source_from
from connectors.dicom.receive.groups import Group
from connectors.dicom.receive.receiver import Receiver
from connectors.dicom.receive.stow import Stow, StowConfig
from dataflow.errors import ConfigError
from dataflow.hints import unknown_keys

__all__ = ["DicomConfigError", "DicomConnector", "parse_section", "parse_sources", "parse_stow"]

log = structlog.get_logger("connectors.dicom")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_SECTION_KEYS = {
    "receivers",
    "ae-titles",
    "allow",
    "allow-unknown-peers",
    "limits",
    "duplicates",
    "destinations",
    "export",
    "stow",
    "sources",
}


_RECEIVER_KEYS = {"name", "enabled", "host", "port", "tls", "reuse-port", "processes", "journal"}


#: the ``dicom`` section of the service configuration is wrong (the key is named): the one
#: configuration error of the service file (kept under this name for its importers)
DicomConfigError = ConfigError


def _size(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :]
    if not number or unit not in _UNITS:
        raise DicomConfigError(f"dicom.{where}: {value!r} is not a size (e.g. 2GiB, 500MB)")
    return int(float(number) * _UNITS[unit])


def _keys(data: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """``data`` as a dict, after checking it is a mapping of ``allowed`` keys; ``where`` is
    its key path inside the section ("" for the section itself)."""
    at = f"dicom.{where}" if where else "dicom"
    if not isinstance(data, Mapping):
        raise DicomConfigError(f"{at}: expected a mapping")
    unknown = set(data) - allowed
    if unknown:
        raise DicomConfigError(f"{at}: {unknown_keys(unknown, allowed)}")
    return dict(data)


def _list(value: Any) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _called_aes(section: Mapping[str, Any], pipelines: tuple[str, ...]) -> list[CalledAE]:
    titles = section.get("ae-titles")
    if not isinstance(titles, Mapping) or not titles:
        raise DicomConfigError("dicom.ae-titles: at least one called AE title is needed")
    out = []
    for title, entry in titles.items():
        where = f"ae-titles.{title}"
        keys = {"pipelines", "group-by", "timeout", "complete-on-release", "late",
                "ignored-sop-classes"}  # fmt: skip
        entry = _keys(entry or {}, keys, where)
        routes = entry.get("pipelines") or []
        if isinstance(routes, str):
            routes = [routes]
        missing = [r for r in routes if r not in pipelines]
        if missing or not routes:
            raise DicomConfigError(
                f"dicom.{where}.pipelines: {missing or 'none'} not among the configured "
                f"pipelines ({', '.join(pipelines)})"
            )
        out.append(
            CalledAE(
                ae_title=str(title),
                routes=list(routes),
                group_by=entry.get("group-by", "study"),
                timeout=float(entry.get("timeout", 5)),
                complete_on_release=bool(entry.get("complete-on-release", False)),
                late=entry.get("late", "new-job"),
                ignored_sop_classes=_list(entry.get("ignored-sop-classes")),
            )
        )
    return out


def _web_destination(name: str, entry: Mapping[str, Any], base: Path, where: str):
    """A DICOMweb (STOW-RS) destination: ``url`` and its options."""
    keys = {"url", "username", "password", "token", "max-associations", "batch-files",
            "batch-size", "timeout", "tls"}  # fmt: skip
    entry = _keys(entry, keys, where)
    t = _keys(entry.get("tls") or {}, {"ca"}, f"{where}.tls")
    try:
        return WebDestination(
            name=name,
            url=str(entry["url"]),
            username=str(entry["username"]) if entry.get("username") else None,
            password=str(entry["password"]) if entry.get("password") else None,
            token=str(entry["token"]) if entry.get("token") else None,
            tls_ca=str(base / t["ca"]) if t.get("ca") else None,
            max_associations=int(entry.get("max-associations", 1)),
            batch_files=int(entry.get("batch-files", 50)),
            batch_bytes=_size(entry.get("batch-size", "64MiB"), f"{where}.batch-size"),
            timeout=float(entry.get("timeout", 120)),
        )
    except ValueError as exc:
        raise DicomConfigError(f"dicom.{where}: {exc}") from None


def _seconds(value: Any, where: str) -> float:
    """A number of seconds, or a string like ``10s``."""
    try:
        return float(str(value).strip().removesuffix("s"))
    except ValueError:
        raise DicomConfigError(f"dicom.{where}: {value!r} is not seconds (e.g. 10s)") from None


def parse_section(
    section: Mapping[str, Any], *, pipelines: tuple[str, ...], state: Path, base: Path
) -> tuple[list[ReceiverConfig], dict[str, Destination], RetryPolicy]:
    """The receivers, destinations and retry policy the ``dicom`` section describes."""
    section = _keys(section, _SECTION_KEYS, "")
    called = _called_aes(section, pipelines)
    peers = []
    for i, entry in enumerate(section.get("allow") or []):
        entry = _keys(entry, {"ae", "host"}, f"allow[{i}]")
        peers.append(Peer(str(entry["ae"]), entry.get("host")))
    limits = _keys(
        section.get("limits") or {},
        {
            "max-associations",
            "reserved-associations",
            "artim-timeout",
            "max-pdu",
            "max-instance-size",
            "disk-reserve",
            "disk-reserve-percent",
        },
        "limits",
    )
    receivers = []
    for i, entry in enumerate(section.get("receivers") or []):
        where = f"receivers[{i}]"
        entry = _keys(entry, _RECEIVER_KEYS, where)
        if not entry.get("enabled", True):
            continue
        name = str(entry.get("name") or f"receiver-{i}")
        tls = None
        if entry.get("tls"):
            t = _keys(entry["tls"], {"cert", "key", "ca"}, f"{where}.tls")
            tls = TLSConfig(
                base / t["cert"], base / t["key"], base / t["ca"] if t.get("ca") else None
            )
            for path in (tls.cert, tls.key, tls.ca):
                if path is not None and not path.is_file():
                    raise DicomConfigError(f"dicom.{where}.tls: {path} does not exist")
        try:  # int('abc') and validate(): the key path in the message
            config = ReceiverConfig(
                spool=state / "spool" / name,
                called_aes=[CalledAE(**vars(c)) for c in called],
                host=str(entry.get("host", "127.0.0.1")),
                port=int(entry.get("port", 104)),
                peers=[Peer(p.ae_title, p.host) for p in peers],
                allow_unknown_peers=bool(section.get("allow-unknown-peers", False)),
                duplicates=section.get("duplicates", "overwrite"),
                max_associations=int(limits.get("max-associations", 25)),
                reserved_associations=int(limits.get("reserved-associations", 2)),
                artim_timeout=_seconds(limits.get("artim-timeout", 10), "limits.artim-timeout"),
                max_pdu_size=_size(limits.get("max-pdu", 4 * 1024**2), "limits.max-pdu"),
                max_instance_size=_size(
                    limits.get("max-instance-size", "2GiB"), "limits.max-instance-size"
                ),
                min_free_bytes=_size(limits.get("disk-reserve", 0), "limits.disk-reserve"),
                min_free_percent=float(limits.get("disk-reserve-percent", 0)),
                tls=tls,
                reuse_port=bool(entry.get("reuse-port", False)),
                processes=int(entry.get("processes", 1)),
                journal=entry.get("journal", True),
            )
            receivers.append(config.validate())
        except ValueError as exc:  # the receiver's own checks name no section: say where
            said = str(exc)
            raise DicomConfigError(
                said if said.startswith("dicom.") else f"dicom.{where}: {said}"
            ) from None
    if not receivers:
        raise DicomConfigError("dicom.receivers: no receiver is enabled")
    destinations = {}
    for name, entry in (section.get("destinations") or {}).items():
        where = f"destinations.{name}"
        if isinstance(entry, Mapping) and "url" in entry:
            destinations[str(name)] = _web_destination(str(name), entry, base, where)
            continue
        entry = _keys(
            entry,
            {"ae", "host", "port", "calling-ae", "max-associations", "transfer-syntax", "tls"},
            where,
        )
        t = _keys(entry.get("tls") or {}, {"cert", "key", "ca"}, f"{where}.tls")
        try:
            destinations[str(name)] = Destination(
                name=str(name),
                ae_title=str(entry["ae"]),
                host=str(entry["host"]),
                port=int(entry["port"]),
                calling_ae_title=str(entry.get("calling-ae", "DATAFLOW")),
                max_associations=int(entry.get("max-associations", 1)),
                transfer_syntax=entry.get("transfer-syntax", "stored"),
                tls_cert=str(base / t["cert"]) if t.get("cert") else None,
                tls_key=str(base / t["key"]) if t.get("key") else None,
                tls_ca=str(base / t["ca"]) if t.get("ca") else None,
            )
        except KeyError as exc:
            raise DicomConfigError(f"dicom.{where}: {exc.args[0]!r} is missing") from None
        except ValueError as exc:
            raise DicomConfigError(f"dicom.{where}: {exc}") from None
    export = _keys(
        section.get("export") or {},
        {"retry-initial", "retry-max", "deadline", "max-attempts"},
        "export",
    )
    policy = RetryPolicy(
        initial_delay=float(export.get("retry-initial", 5)),
        max_delay=float(export.get("retry-max", 300)),
        deadline=float(export.get("deadline", 24 * 3600)),
        max_attempts=export.get("max-attempts"),
    )
    return receivers, destinations, policy


def parse_stow(section: Mapping[str, Any], receivers: list[ReceiverConfig]) -> StowConfig | None:
    """``dicom.stow`` (STOW-RS on the REST port), or None where it is absent or disabled;
    ``receivers``: the enabled receivers (of :func:`parse_section`)."""
    if section.get("stow") is None:
        return None
    entry = _keys(section["stow"], {"enabled", "receiver", "ae-title", "max-request-size"},
                  "stow")  # fmt: skip
    if not entry.get("enabled", True):
        return None
    names = [r.spool.name for r in receivers]
    name = str(entry.get("receiver", names[0]))
    if name not in names:
        raise DicomConfigError(
            f"dicom.stow.receiver: {name!r} is not an enabled receiver ({', '.join(names)})"
        )
    config = receivers[names.index(name)]
    title = str(entry.get("ae-title", config.called_aes[0].ae_title))
    if config.called(title) is None:
        titles = ", ".join(c.ae_title for c in config.called_aes)
        raise DicomConfigError(f"dicom.stow.ae-title: {title!r} is not among dicom.ae-titles "
                               f"({titles})")  # fmt: skip
    size = _size(entry.get("max-request-size", "4GiB"), "stow.max-request-size")
    return StowConfig(receiver=name, ae_title=title, max_request_size=size)


def parse_sources(section: Mapping[str, Any], base: Path) -> dict[str, dict[str, Any]]:
    """``dicom.sources``: name -> the settings of a PACS an order may fetch from, as a stage's
    ``pacs`` argument (:func:`connectors.dicom.query.source_from`: DIMSE ``ae``, ``host``,
    ``port``...; or DICOMweb ``url``), checked now, TLS paths made absolute (relative to the
    service file). No credential is held here: a DICOMweb token is named by ``token-env``."""
    sources = section.get("sources") or {}
    if not isinstance(sources, Mapping):
        raise DicomConfigError("dicom.sources: expected a mapping of names to PACS settings")
    out = {}
    for name, entry in sources.items():
        where = f"dicom.sources.{name}"
        if not isinstance(entry, Mapping):
            raise DicomConfigError(f"{where}: expected a mapping (ae, host, port or url)")
        entry = dict(entry)
        if isinstance(entry.get("tls"), Mapping):
            entry["tls"] = {k: str(base / v) for k, v in entry["tls"].items()}
        try:
            source_from(entry, str(name))
        except QueryError as exc:
            raise DicomConfigError(f"{where}: {str(exc).removeprefix(f'{name}: ')}") from None
        out[str(name)] = entry
    return out


class DicomConnector:
    """DICOM in (receivers) and out (the exporter) for the service."""

    agents = frozenset({"ClaraSCU"})

    def __init__(self, section: Mapping[str, Any], host: Any) -> None:
        # pynetdicom logs every request at INFO: our own events say what matters
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        self.host = host
        configs, destinations, policy = parse_section(
            section,
            pipelines=host.pipelines,
            state=host.state_dir,
            base=Path(host.config_path).parent,
        )
        # the service owns its outbox (an OS lock): another process only reads and asks
        self.outbox = Outbox(host.state_dir / "outbox", policy=policy, owner=True)
        self.exporter = Exporter(self.outbox, destinations, on_progress=self._progress)
        self.receivers = [
            Receiver(config, lambda group, name=config.spool.name: self._group(name, group))
            for config in configs
        ]
        self._by_name = {r.config.spool.name: r for r in self.receivers}
        stow = parse_stow(section, configs)
        self.stow = None if stow is None else Stow(self._by_name[stow.receiver], stow)
        self.sources = parse_sources(section, Path(host.config_path).parent)

    def order_sources(self) -> dict[str, dict[str, Any]]:
        """The PACS an order may name (``dicom.sources``): name -> settings (the ``pacs``
        argument of the order's first stage; see :func:`parse_sources`)."""
        return {name: dict(entry) for name, entry in self.sources.items()}

    def http_routes(self) -> list:
        """STOW-RS (``dicom.stow``): the routes the platform mounts on its REST app."""
        return self.stow.routes() if self.stow is not None else []

    @classmethod
    def admin(cls, section: Mapping[str, Any], state_dir: Path, config_path: Path) -> OutboxAdmin:
        """The outbox of the service whose connector state is ``state_dir``, from another
        process (``dataflow exports``): list it, re-send a dead letter (asked of the running
        service, or done at once when none runs)."""
        titles = section.get("ae-titles") if isinstance(section, Mapping) else None
        routes = {
            str(route)
            for entry in (titles.values() if isinstance(titles, Mapping) else ())
            if isinstance(entry, Mapping)
            for route in _list(entry.get("pipelines"))
        }
        _, destinations, policy = parse_section(
            section, pipelines=tuple(routes), state=Path(state_dir), base=Path(config_path).parent
        )
        return OutboxAdmin(Path(state_dir) / "outbox", destinations, policy)

    def _progress(self, task_id: str, destination: str, state: str, detail: str) -> None:
        report = getattr(self.host, "export_progress", None)  # an older host has none
        if report is not None:
            report(task_id, destination, state, detail)

    def health(self) -> dict[str, list]:
        """Problems in words (a destination down) and metrics: outbox tasks by destination
        and state, the oldest pending task's age, failed attempts, the receivers' figures."""
        problems, metrics = [], []

        def metric(name: str, help: str, value: float, kind: str = "gauge", **labels) -> None:
            metrics.append(
                {"name": name, "help": help, "type": kind, "labels": labels, "value": value}
            )

        summary = self.outbox.summary()
        now = self.outbox.clock()
        names = sorted({*self.exporter.destinations, *(row[0] for row in summary)})
        counts = {(name, state): 0 for name in names for state in EXPORT_STATES}
        oldest: dict[str, float] = dict.fromkeys(names, 0.0)
        for destination, state, count, first in summary:
            counts[destination, EXPORT_STATE[state]] += count
            if state == "pending":
                oldest[destination] = max(oldest[destination], now - first)
        for (destination, state), count in counts.items():
            metric("dataflow_dicom_outbox_tasks", "DICOM export tasks by destination and state",
                   count, destination=destination, state=state)  # fmt: skip
        for destination, age in oldest.items():
            metric("dataflow_dicom_outbox_oldest_pending_seconds",
                   "age of the oldest export task waiting for its destination", age,
                   destination=destination)  # fmt: skip
        for destination, status in self.exporter.destination_status().items():
            metric("dataflow_dicom_destination_up", "0 while a destination's attempts keep "
                   "failing", float(not status["down"]), destination=destination)  # fmt: skip
            metric("dataflow_dicom_export_attempts_failed", "failed export attempts",
                   status["failed_total"], "counter", destination=destination)  # fmt: skip
            if status["down"]:
                since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status["since"]))
                problems.append(
                    f"destination {destination} is down: {status['attempts']} failed attempts "
                    f"in a row since {since} (last: {status['error']})"
                )
        for disk in self.disks():
            if disk["below"]:
                problems.append(
                    f"receiver {disk['receiver']} is below its disk reserve: "
                    f"{disk['free'] / 2**20:.0f} MiB free, {disk['reserve'] / 2**20:.0f} MiB "
                    f"kept free on {disk['path']}; new instances are refused"
                )
        for name, receiver in self._by_name.items():  # the spool: every listener process's
            try:
                figures = receiver.store.figures()
            except Exception as exc:  # stopping: the figures of the next report
                log.debug("spool_figures_unread", receiver=name, error=repr(exc))
                figures = {}
            for state, count in figures.get("groups", {}).items():
                metric("dataflow_dicom_groups", "received groups (studies or series) by state",
                       count, receiver=name, state=state)  # fmt: skip
            for state, count in figures.get("instances", {}).items():
                metric("dataflow_dicom_group_instances", "instances received, by the state of "
                       "their group", count, receiver=name, state=state)  # fmt: skip
            for outcome, count in figures.get("associations", {}).items():
                metric("dataflow_dicom_associations", "associations in the spool's history "
                       "(the last 10,000) by outcome", count,
                       receiver=name, outcome=outcome)  # fmt: skip
            for status, count in figures.get("stored", {}).items():
                metric("dataflow_dicom_association_instances", "instances of the "
                       "associations in the history, by status", count,
                       receiver=name, status=status)  # fmt: skip
            stats = getattr(receiver, "stats", None)
            for key, value in (stats() if stats is not None else {}).items():
                if key == "associations":
                    metric("dataflow_dicom_receiver_associations",
                           "associations holding a slot now", value, receiver=name)  # fmt: skip
                elif key == "fast_path":
                    metric("dataflow_dicom_receiver_fast_path", "1 while pynetdicom's fast "
                           "path is on (0: see the dicom_fast_path_off warning)", value,
                           receiver=name)  # fmt: skip
                else:
                    metric(f"dataflow_dicom_receiver_{key}", f"receiver: {key.replace('_', ' ')}"
                           " since its start", value, "counter", receiver=name)  # fmt: skip
        return {"problems": problems, "metrics": metrics}

    def routing(self) -> dict[str, list[dict[str, Any]]]:
        """What the service file set, for people to read (the platform's DICOM page): each
        receiver (where it listens, TLS or not, its processes) with its AE titles and the
        pipelines each routes to; each destination (AE title and address, or DICOMweb URL;
        never credentials) and whether it is down now."""
        status = self.exporter.destination_status()
        receivers = [{
            "receiver": name, "host": r.config.host, "port": r.port,
            "tls": r.config.tls is not None, "processes": r.config.processes,
            "ae_titles": [{"ae_title": c.ae_title, "pipelines": list(c.routes),
                           "group_by": c.group_by, "timeout": c.timeout, "late": c.late}
                          for c in r.config.called_aes],
        } for name, r in self._by_name.items()]  # fmt: skip
        destinations = []
        for name, d in self.exporter.destinations.items():
            url = getattr(d, "url", None)
            if url:  # no user, password or query: the address only
                parts = urllib.parse.urlsplit(url)
                port = f":{parts.port}" if parts.port else ""
                where = f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
            else:
                where = f"{d.ae_title}@{d.host}:{d.port}"
            destinations.append({"destination": name, "kind": "DICOMweb" if url else "DIMSE",
                                 "address": where,
                                 "down": bool(status.get(name, {}).get("down"))})  # fmt: skip
        return {"receivers": receivers, "destinations": destinations}

    def disks(self) -> list[dict[str, Any]]:
        """Each receiver's spool file system: free, total, the reserve it keeps and whether it
        is below it (the platform's overview)."""
        out = []
        for name, receiver in self._by_name.items():
            try:
                out.append({"receiver": name, **receiver.disk()})
            except OSError as exc:  # the spool's file system gone: said, not raised
                log.warning("spool_disk_unread", receiver=name, error=exc.strerror)
        return out

    def studies(self, state: str | None = None) -> list[dict[str, Any]]:
        """The groups (studies or series) the receivers hold, newest first, each with the
        keys of the jobs made of it (the platform's ``GET /api/v1/dicom/studies``)."""
        out = []
        for name, receiver in self._by_name.items():
            for g in receiver.groups(state):
                out.append({
                    "receiver": name, "group": g.id, "group_by": g.kind, "uid": g.uid,
                    "called_ae": g.called_ae, "calling_ae": g.calling_ae,
                    "peer_host": g.peer_host, "state": g.state, "instances": g.instances,
                    "first_arrival": g.first_arrival, "last_arrival": g.last_arrival,
                    "late_of": g.late_of, "pipelines": list(g.routes),
                    "job_keys": [f"dicom:{name}:{g.id}:{p}" for p in g.routes],
                })  # fmt: skip
        return sorted(out, key=lambda study: study["last_arrival"], reverse=True)

    def associations(self, limit: int = 100) -> list[dict[str, Any]]:
        """The receivers' last associations, newest first: who called which AE title from
        where, how it ended (released, aborted, rejected with the reason), what was stored."""
        out = []
        for name, receiver in self._by_name.items():
            out += [{"receiver": name, **row} for row in receiver.store.associations(limit)]
        return sorted(out, key=lambda row: row["ended"], reverse=True)[:limit]

    def start(self) -> None:
        self.exporter.report_all()  # what a crash may have left unsaid
        self.exporter.start()
        for receiver in self.receivers:
            receiver.start()

    def stop_intake(self) -> None:
        """No new studies (the pipelines then finish theirs and hand their results over)."""
        for receiver in self.receivers:
            receiver.stop()
        self.receivers = []

    def stop(self) -> None:
        self.stop_intake()
        self.exporter.stop()
        self.outbox.close()

    @property
    def ports(self) -> dict[str, int]:
        """Receiver name -> the port it listens on."""
        return {name: r.port for name, r in self._by_name.items()}

    def _group(self, receiver: str, group: Group) -> None:
        source = {
            "receiver": receiver,
            "called_ae": group.called_ae,
            "calling_ae": group.calling_ae,
            "peer_host": group.peer_host,
            "group_by": group.kind,
            "group_uid": group.uid,
            "instances": group.instances,
            "group": group.id,
            "late_of": group.late_of,
        }
        for pipeline in group.routes:
            self.host.submit(
                pipeline, group.folder, source=source, key=f"dicom:{receiver}:{group.id}:{pipeline}"
            )
        self._by_name[receiver].mark_dispatched(group.id)

    def release(self, payload: Path, source: Mapping[str, Any]) -> None:
        """Every job over a group is past its retention: the group's files go."""
        receiver = self._by_name.get(str(source.get("receiver")))
        group = source.get("group")
        if receiver is None or not isinstance(group, int) or receiver.stopping:
            log.warning("release_unknown_group", receiver=source.get("receiver"), group=group)
            return
        receiver.reclaim(group)

    def export(self, task_dir: Path, task: Mapping[str, Any], job: Any) -> None:
        """One outbox task per destination (idempotent: ``<taskId>-<destination>``)."""
        for queued in self.exporter.enqueue_registered(task_dir, job_id=job.id):
            log.info("export_queued", job_id=job.id, destination=queued.destination,
                     files=queued.files, state=queued.state)  # fmt: skip
