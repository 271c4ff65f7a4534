"""The service's configuration file (``dataflow serve CONFIG``).

A YAML mapping::

    state: /var/lib/dataflow        # spool, databases, job outputs (relative: to this file)
    pipelines:                      # name -> pipeline file, kept warm
      ct-segmentation: ../pipelines/ct-segmentation.yaml
      ct-filter: {file: ../pipelines/ct-filter.yaml, params: {sigma: "2"}, replicas: {smooth: 2}}
    log: {level: info, format: json}
    retention: {succeeded: 8h, failed: 7d}   # then a job's outputs and its payload are removed
    limits: {stage-timeout: 10m, job-timeout: 30m, worker-memory: 4GiB, max-attempts: 3,
             shutdown-grace: 30s}   # the defaults; per pipeline: pipelines.NAME.limits
    api: {host: 127.0.0.1, rest-port: 8080, grpc-port: 30031,   # the platform API
          max-upload: 10GiB, disk-reserve: 1GiB}                  # (dataflow.platform)
    executor: {kind: ray, address: 10.0.0.5:6379}   # pipelines on a Ray cluster (docs/ray.md);
                                    # default: kind local (worker processes on this machine)
    dicom: {...}                    # a connector's own section (connectors.dicom)

With an ``api`` section ``pipelines`` may be empty (pipelines registered through the API);
without a ``dicom`` section the service is an API-only platform. The API listens on loopback
only: access control is not configured yet, so any other host is refused.

Every other top-level key names a *connector* (found through the ``dataflow.connectors``
entry points; ``connectors.dicom`` registers ``dicom``), whose section only it reads.

Values may use ``${NAME}`` or ``${NAME:-default}`` to read the environment, and any value can
be overridden from the command line with ``--set key.path=value`` (a YAML scalar or list;
a list item by its index: ``--set 'dicom.receivers[0].port=11113'``,
``--set dicom.destinations.PACS.port=4242``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dataflow.errors import ConfigError
from dataflow.hints import unknown_keys
from dataflow.units import parse_bytes

__all__ = [
    "ApiConfig",
    "ConfigError",
    "ExecutorConfig",
    "JobLimits",
    "PipelineEntry",
    "Retention",
    "ServiceConfig",
    "apply_overrides",
    "key_path",
    "load_config",
    "parse_duration",
    "parse_key_path",
]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_KEY_PATH = re.compile(r"[^.\[\]=\s]+(\[\d+\])*(\.[^.\[\]=\s]+(\[\d+\])*)*")
_KEY_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
#: the service's own keys; the rest name connectors
SERVICE_KEYS = ("state", "pipelines", "log", "retention", "limits", "api", "executor")
_RETENTION_KEYS = ("succeeded", "failed", "interval")
_PIPELINE_KEYS = ("file", "params", "replicas", "limits")
_LIMIT_KEYS = ("stage-timeout", "job-timeout", "worker-memory", "max-attempts", "shutdown-grace")
#: the platform API's roles, each allowing what the one before allows (dataflow.platform.auth)
ROLE_NAMES = ("read", "operator", "admin")
_API_KEYS = ("host", "rest-port", "grpc-port", "max-upload", "disk-reserve", "start-pipelines",
             "idle-stop", "tokens", "tls", "patient-details")  # fmt: skip
_EXECUTOR_KEYS = ("kind", "address", "placement")
EXECUTOR_KINDS = ("local", "ray")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


@dataclasses.dataclass(frozen=True)
class JobLimits:
    """What one job may take before the service stops it (``limits:`` in the service file,
    overridden per pipeline by ``pipelines.NAME.limits``). None: no limit."""

    stage_timeout: float | None = 600.0  # seconds one stage may take over one job
    job_timeout: float | None = 1800.0  # seconds from a job's first stage to its result
    worker_memory: int | None = 4 * 1024**3  # bytes per worker when a stage declares none
    max_attempts: int = 3  # attempts cut short (shutdown, crash) before a job is failed
    shutdown_grace: float = 30.0  # seconds jobs in flight get to finish on SIGTERM


@dataclasses.dataclass(frozen=True)
class PipelineEntry:
    name: str
    file: Path
    params: dict[str, str]
    replicas: dict[str, int]
    limits: JobLimits = JobLimits()


@dataclasses.dataclass(frozen=True)
class Retention:
    """How long a finished job's outputs and payload are kept (seconds; None = for ever),
    and how often the service looks (``interval``)."""

    succeeded: float | None = None
    failed: float | None = None
    interval: float = 600.0

    def keep(self, state: str) -> float | None:
        return self.succeeded if state == "succeeded" else self.failed


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    """The platform API (``api:``): where REST and gRPC listen (port 0: any free port; the
    ports taken are written to ``STATE/api.json``; ``grpc_port`` None: no gRPC), the most
    bytes one payload may hold, and the free disk an upload must leave."""

    host: str = "127.0.0.1"
    rest_port: int = 8080
    grpc_port: int | None = 30031
    max_upload: int = 10 * 1024**3
    disk_reserve: int = 1024**3
    #: pipelines registered through the API: their workers start at registration
    #: ("registration") or at their first job ("first-job"); ``idle_stop``: seconds without a
    #: job after which their workers stop until the next job (None: never)
    start_pipelines: str = "registration"
    idle_stop: float | None = None
    #: every call needs an API token (``dataflow tokens create``), but /healthz and /readyz
    tokens: bool = False
    #: TLS for REST and gRPC: (certificate chain, private key) files, or None
    tls: tuple[Path, Path] | None = None
    #: the least role that sees patients' names, IDs and birth dates in the console (None:
    #: nobody; needs ``tokens``)
    patient_details: str | None = None


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """Where the pipelines run (``executor:``): ``local`` worker processes on this machine,
    or ``ray``, on the Ray cluster at ``address`` (None: a Ray runtime started on this
    machine for the service), its pipelines' replicas reserved together in a Ray placement
    group of strategy ``placement`` when given (docs/ray.md, "Placement")."""

    kind: str = "local"
    address: str | None = None
    placement: str | None = None


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    path: Path
    state: Path
    pipelines: dict[str, PipelineEntry]
    connectors: dict[str, dict[str, Any]]  # connector name -> its section
    log_level: str = "info"
    log_format: str = "console"
    retention: Retention = Retention()
    limits: JobLimits = JobLimits()
    api: ApiConfig | None = None
    executor: ExecutorConfig = ExecutorConfig()


def parse_duration(value: Any, where: str) -> float | None:
    """Seconds from ``90``, ``"30s"``, ``"10m"``, ``"8h"``, ``"7d"``; None for ``null`` or
    ``"never"``; ConfigError naming ``where`` otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("never", "none")):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not a duration (e.g. 90, 30s, 10m, 8h, 7d)")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ConfigError(
                f"{where}: {value!r} is not a duration (e.g. 90, 30s, 10m, 8h, 7d, never)"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ConfigError(f"{where}: {value!r} is negative")
    return seconds


def _retention(section: Any, path: Path) -> Retention:
    if section is None:
        return Retention()
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'retention' must be a mapping (succeeded, failed, interval)")
    unknown = set(section) - set(_RETENTION_KEYS)
    if unknown:
        raise ConfigError(f"{path}: retention: {unknown_keys(unknown, _RETENTION_KEYS)}")
    interval = parse_duration(section.get("interval", 600), f"{path}: retention.interval")
    if not interval:
        raise ConfigError(f"{path}: retention.interval must be a positive duration")
    return Retention(
        succeeded=parse_duration(section.get("succeeded"), f"{path}: retention.succeeded"),
        failed=parse_duration(section.get("failed"), f"{path}: retention.failed"),
        interval=interval,
    )


def _api(section: Any, path: Path) -> ApiConfig | None:
    if section is None:
        return None
    where = f"{path}: api"
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: must be a mapping ({', '.join(_API_KEYS)})")
    unknown = set(section) - set(_API_KEYS)
    if unknown:
        raise ConfigError(f"{where}: {unknown_keys(unknown, _API_KEYS)}")
    host = str(section.get("host", "127.0.0.1"))
    tokens = section.get("tokens", False)
    if not isinstance(tokens, bool):
        raise ConfigError(f"{where}.tokens: {tokens!r}: true (every call needs an API token) "
                          "or false")  # fmt: skip
    tls = _api_tls(section.get("tls"), f"{where}.tls", path)
    if host not in _LOOPBACK and not host.startswith("127.") and not tokens:
        # TLS alone would let anyone who reaches the port do anything, over https
        raise ConfigError(
            f"{where}.host: {host!r} is not a loopback address: beyond this machine the API "
            "needs tokens: true (dataflow tokens create), with tls: {cert: ..., key: ...} so "
            "that tokens do not travel in clear; or listen on 127.0.0.1 (reach it through an "
            "SSH tunnel or a reverse proxy that authenticates)"
        )
    ports: dict[str, int | None] = {}
    for key, default in (("rest-port", 8080), ("grpc-port", 30031)):
        value = section.get(key, default)
        if value is None and key == "grpc-port":
            ports[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            raise ConfigError(f"{where}.{key}: {value!r} is not a port number (0 to 65535)")
        ports[key] = value
    sizes = {}
    for key, default in (("max-upload", "10GiB"), ("disk-reserve", "1GiB")):
        value = section.get(key, default)
        try:
            sizes[key] = parse_bytes(value) if not isinstance(value, bool) else -1
        except ValueError:
            sizes[key] = -1
        if sizes[key] < 0:
            raise ConfigError(f"{where}.{key}: {value!r} is not a size (e.g. 10GiB, 500MiB)")
    start = section.get("start-pipelines", "registration")
    if start not in ("registration", "first-job"):
        raise ConfigError(
            f"{where}.start-pipelines: {start!r}: 'registration' (the workers of a pipeline "
            "registered through the API start at once) or 'first-job'"
        )
    idle = parse_duration(section.get("idle-stop"), f"{where}.idle-stop")
    details = section.get("patient-details", False)
    if details is not False and details not in ROLE_NAMES:
        roles = ", ".join(ROLE_NAMES)
        raise ConfigError(f"{where}.patient-details: {details!r}: false (nobody sees them, "
                          f"the default) or the least role that does: {roles}")  # fmt: skip
    if details and not tokens:
        raise ConfigError(f"{where}.patient-details: {details!r} needs tokens: true (a token's "
                          "role decides who sees patient details)")  # fmt: skip
    return ApiConfig(host, ports["rest-port"] or 0, ports["grpc-port"], sizes["max-upload"],
                     sizes["disk-reserve"], start, idle or None, tokens, tls,
                     details or None)  # fmt: skip


def _executor(section: Any, path: Path) -> ExecutorConfig:
    if section is None:
        return ExecutorConfig()
    where = f"{path}: executor"
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: must be a mapping (kind: local or ray; address)")
    unknown = set(section) - set(_EXECUTOR_KEYS)
    if unknown:
        raise ConfigError(f"{where}: {unknown_keys(unknown, _EXECUTOR_KEYS)}")
    kind = section.get("kind", "local")
    if kind not in EXECUTOR_KINDS:
        from dataflow.hints import suggest

        close = suggest(str(kind), EXECUTOR_KINDS)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ConfigError(f"{where}.kind: {kind!r}: expected local (worker processes on this "
                          f"machine) or ray (a Ray cluster: docs/ray.md){hint}")  # fmt: skip
    address, placement = section.get("address"), section.get("placement")
    for key, value in (("address", address), ("placement", placement)):
        if value is not None and kind != "ray":
            raise ConfigError(f"{where}.{key}: the Ray cluster's {key}: give it with kind: ray")
    from dataflow.execution.rayexec import address_problem, placement_problem

    if placement is not None and placement_problem(str(placement)):
        raise ConfigError(f"{where}.placement: {placement!r}: {placement_problem(str(placement))}")
    if address is not None and address_problem(str(address)):
        raise ConfigError(f"{where}.address: {address!r}: {address_problem(str(address))}")
    return ExecutorConfig(
        kind,
        None if address is None else str(address),
        None if placement is None else str(placement),
    )


def _api_tls(section: Any, where: str, path: Path) -> tuple[Path, Path] | None:
    """``tls: {cert: FILE, key: FILE}`` (relative to the service file) -> the two paths."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: a mapping of cert (the certificate chain, PEM) and key "
                          "(its private key, PEM)")  # fmt: skip
    unknown = set(section) - {"cert", "key"}
    if unknown:
        raise ConfigError(f"{where}: {unknown_keys(unknown, ('cert', 'key'))}")
    out = []
    for key in ("cert", "key"):
        value = section.get(key)
        if not value:
            raise ConfigError(f"{where}.{key}: missing (a PEM file)")
        file = Path(str(value)).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise ConfigError(f"{where}.{key}: {file} is not a file")
        out.append(file)
    return out[0], out[1]


def _limits(section: Any, where: str, base: JobLimits, *, service_wide: bool) -> JobLimits:
    """``base`` with the keys of a ``limits`` section applied (``where`` names it in errors)."""
    if section is None:
        return base
    allowed = _LIMIT_KEYS if service_wide else _LIMIT_KEYS[:-1]
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: must be a mapping ({', '.join(allowed)})")
    unknown = set(section) - set(allowed)
    if unknown:
        hint = " (shutdown-grace is service-wide: set it under the top-level limits)" if (
            "shutdown-grace" in unknown and not service_wide) else ""  # fmt: skip
        raise ConfigError(f"{where}: {unknown_keys(unknown, allowed)}{hint}")
    changes: dict[str, Any] = {}
    for key in ("stage-timeout", "job-timeout", "shutdown-grace"):
        if key in section:
            seconds = parse_duration(section[key], f"{where}.{key}")
            if seconds == 0 or (seconds is None and key == "shutdown-grace"):
                raise ConfigError(f"{where}.{key}: {section[key]!r}: give a positive duration"
                                  + ("" if key == "shutdown-grace" else " or never"))  # fmt: skip
            changes[key.replace("-", "_")] = seconds
    if "worker-memory" in section:
        value = section["worker-memory"]
        if value is None or str(value).strip().lower() in ("none", "never"):
            changes["worker_memory"] = None
        else:
            try:
                size = parse_bytes(value) if not isinstance(value, bool) else -1
            except ValueError:
                size = -1
            if size < 1024**2:
                raise ConfigError(
                    f"{where}.worker-memory: {value!r} is not a memory size of at least 1 MiB "
                    "(e.g. 4GiB, 512MiB, none)"
                )
            changes["worker_memory"] = size
    if "max-attempts" in section:
        value = section["max-attempts"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.max-attempts: {value!r} is not a whole number >= 1")
        changes["max_attempts"] = value
    return dataclasses.replace(base, **changes)


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"{where}: environment variable {name} is not set (and no default)")
        return default

    text = _ENV.sub(substitute, value)
    whole = _ENV.fullmatch(value.strip())
    return yaml.safe_load(text) if whole and text.strip() else text  # ${PORT} -> an int


def key_path(parts: Sequence[str | int]) -> str:
    """How messages print a key path: ``dicom.receivers[0].port``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def parse_key_path(key: str) -> list[str | int]:
    """``dicom.receivers[0].port`` -> ``["dicom", "receivers", 0, "port"]``; ValueError
    unless it is names joined by dots, each followed by any ``[N]`` indexes."""
    if not _KEY_PATH.fullmatch(key):
        raise ValueError(f"{key!r} is not a key path (e.g. dicom.receivers[0].port)")
    return [m[0] if m[0] else int(m[1]) for m in _KEY_PART.findall(key)]


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str) -> None:
    """``key.path=value`` items, each value parsed as YAML, set into ``data``; a path may
    index a list (``dicom.receivers[0].port=11113``). A missing mapping on the way is
    made; a missing list item is an error."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.path=value")
        try:
            parts = parse_key_path(key.strip())
        except ValueError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from None
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = key_path(parts[:i])
            if isinstance(part, int):
                if not isinstance(node, list):
                    raise ConfigError(f"--set {item!r}: {where} in {source} is not a list")
                if part >= len(node):
                    raise ConfigError(
                        f"--set {item!r}: {where} in {source} has {len(node)} item(s): "
                        f"[{part}] is not one of them"
                    )
            elif not isinstance(node, dict):
                kind = "a list: index it, e.g. [0]" if isinstance(node, list) else "not a mapping"
                raise ConfigError(f"--set {item!r}: {where} in {source} is {kind}")
            if last:
                break
            child = node[part] if isinstance(part, int) else node.get(part)
            if child is None and isinstance(part, str) and isinstance(parts[i + 1], str):
                child = node[part] = {}
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> ServiceConfig:
    """Read, expand and check a service configuration; ConfigError names what is wrong."""
    path = Path(path).resolve()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping")
    apply_overrides(data, overrides, str(path))
    data = _expand(data, path.name)
    base = path.parent
    if "state" not in data:
        raise ConfigError(f"{path}: 'state' (the folder for the spool, databases and outputs) "
                          "is missing")  # fmt: skip
    state = Path(str(data["state"])).expanduser()
    state = state if state.is_absolute() else (base / state).resolve()
    limits = _limits(data.get("limits"), f"{path}: limits", JobLimits(), service_wide=True)
    api = _api(data.get("api"), path)
    pipelines = _pipelines(data.get("pipelines"), base, path, limits, empty_ok=api is not None)
    log = data.get("log") or {}
    if not isinstance(log, dict):
        raise ConfigError(f"{path}: 'log' must be a mapping (level, format)")
    if set(log) - {"level", "format"}:
        raise ConfigError(
            f"{path}: log: {unknown_keys(set(log) - {'level', 'format'}, ('level', 'format'))}"
        )
    connectors = {}
    for key, section in data.items():
        if key in SERVICE_KEYS:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping")
        connectors[key] = section
    return ServiceConfig(
        path=path,
        state=state,
        pipelines=pipelines,
        connectors=connectors,
        log_level=str(log.get("level", "info")),
        log_format=str(log.get("format", "console")),
        retention=_retention(data.get("retention"), path),
        limits=limits,
        api=api,
        executor=_executor(data.get("executor"), path),
    )


def _pipelines(
    section: Any, base: Path, path: Path, limits: JobLimits, *, empty_ok: bool = False
) -> dict[str, PipelineEntry]:
    if empty_ok and section is None:
        return {}
    if not isinstance(section, dict) or not (section or empty_ok):
        raise ConfigError(f"{path}: 'pipelines' must map at least one name to a pipeline file")
    out = {}
    for name, entry in section.items():
        where = f"{path}: pipelines.{name}"
        if isinstance(entry, str):
            entry = {"file": entry}
        if not isinstance(entry, dict) or "file" not in entry:
            raise ConfigError(f"{where}: expected a file name or a mapping with 'file'")
        unknown = set(entry) - set(_PIPELINE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: {unknown_keys(unknown, _PIPELINE_KEYS)}")
        file = Path(str(entry["file"])).expanduser()
        file = file if file.is_absolute() else (base / file).resolve()
        if not file.is_file():
            raise ConfigError(f"{where}: pipeline file {file} does not exist")
        params, replicas = entry.get("params") or {}, entry.get("replicas") or {}
        if not isinstance(params, Mapping) or not isinstance(replicas, Mapping):
            raise ConfigError(f"{where}: 'params' and 'replicas' must be mappings")
        try:
            counts = {str(k): int(v) for k, v in replicas.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.replicas: counts must be whole numbers") from None
        out[str(name)] = PipelineEntry(
            str(name), file, {str(k): str(v) for k, v in params.items()}, counts,
            _limits(entry.get("limits"), f"{where}.limits", limits, service_wide=False),
        )  # fmt: skip
    return out
