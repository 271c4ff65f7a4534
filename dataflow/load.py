"""``dataflow load``: a load generator against a running ``dataflow serve`` (Clara's
``cpload``), and the results file it writes (docs/load.md).

Two ways in:

- over DICOM, N simulated modalities (threads, each on its own associations) send a study
  with fresh UIDs ``count`` times, at a set rate or as fast as they can; the DICOM side lives
  in the connector (``connectors/dicom/load.py``), found by entry point;
- over the REST API (:class:`~dataflow.platform.client.ApiClient`), jobs with payloads and
  priorities, as ``cpload generate`` made them (count, sequence, delay, priority).

Every study is then followed through the REST API until its job ended and (over DICOM) its
result reached the PACS: its job (found by its study UID), the job's times, each stage's run
(the job's timeline) and its export records. One JSON line per study goes to the results
file, after a line that says how the run was made and before one with the summary
(:func:`summarize`: throughput, latency percentiles, failures by reason). UIDs never go into
it: a study is its index and its job id.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dataflow.errors import DataflowError, UsageError

__all__ = ["LoadPlan", "Study", "percentiles", "run_load", "summarize"]

ENDED = ("succeeded", "failed", "cancelled")
EXPORT_ENDED = ("sent", "dead")
POLL = 0.25  # seconds between two looks at the run's jobs
RESULTS_VERSION = 1


@dataclass
class Submitted:
    """What a sender did with one study: ``key`` finds its job (a study UID, kept in memory
    only) unless ``job_id`` is already known; times are seconds since the epoch."""

    key: str | None
    job_id: str | None
    began: float
    sent: float
    instances: int = 0
    bytes: int = 0
    reason: str = ""  # why it was not sent, as the summary counts it (no UIDs, no counts)


class Sender(Protocol):
    """One modality or API client: ``prepare(index)`` makes study ``index`` ready before it
    is due (a copy with fresh UIDs), ``submit(index, prepared)`` sends it when it is."""

    name: str

    def prepare(self, index: int) -> Any: ...

    def submit(self, index: int, prepared: Any) -> Submitted: ...


@dataclass
class Study:
    """One study of the run, as the results file holds it (see docs/load.md)."""

    index: int
    sender: str
    offered: float
    priority: str | None = None
    key: str | None = field(default=None, repr=False)  # never written
    began: float | None = None
    sent: float | None = None
    instances: int = 0
    bytes: int = 0
    job_id: str | None = None
    pipeline: str | None = None
    state: str = "sending"
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    exports: list[dict[str, Any]] = field(default_factory=list)
    pacs: float | None = None
    reason: str | None = None
    done: bool = False

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("key", "done")}
        out["record"] = "study"
        out["ok"] = self.done and self.reason is None
        if not self.done:
            out["reason"] = "not finished"  # the run was stopped (Ctrl-C, the API gone)
        out["latency"] = _span(self.sent, self.pacs if self.pacs is not None else self.finished)
        out["grouping_wait"] = _span(self.sent, self.created)
        out["queued"] = _span(self.created, self.started)
        out["ran"] = _span(self.started, self.finished)
        out["export"] = _span(self.finished, self.pacs)
        return out


def _span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 6)


@dataclass
class LoadPlan:
    """How many studies, how often (``interval`` seconds between two offers, 0: as fast as
    the senders go), whether to wait for each result to reach the PACS, and for how long a
    study may take after it was sent before it counts as failed (``timeout``)."""

    count: int
    interval: float = 0.0
    wait_export: bool = True
    timeout: float = 600.0
    priorities: Sequence[str] = ("normal",)


# ---------------------------------------------------------------------------- the pure parts


def percentiles(values: Iterable[float], points: Sequence[int] = (50, 90, 95, 99)) -> dict:
    """``{"p50": ..., "max": ..., "mean": ..., "n": ...}`` of ``values`` (linear
    interpolation between closest ranks); empty without values."""
    data = sorted(values)
    if not data:
        return {}
    out: dict[str, float] = {}
    for p in points:
        rank = (len(data) - 1) * p / 100
        low = int(rank)
        high = min(low + 1, len(data) - 1)
        out[f"p{p}"] = round(data[low] + (data[high] - data[low]) * (rank - low), 6)
    out["max"] = round(data[-1], 6)
    out["mean"] = round(sum(data) / len(data), 6)
    out["n"] = len(data)
    return out


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The summary of study records (as :meth:`Study.record` writes them, so that it can be
    computed again from a results file): studies done and failed, failures by reason, the
    span from the first send to the last result, throughput over it, and the percentiles of
    each latency (seconds)."""
    done = [r for r in records if r["ok"]]
    failures = Counter(r["reason"] for r in records if not r["ok"])
    began = [r["began"] for r in records if r.get("began") is not None]
    ends = [r["pacs"] or r["finished"] for r in done if (r["pacs"] or r["finished"]) is not None]
    span = max(ends) - min(began) if began and ends else None
    return {
        "record": "summary",
        "studies": len(records),
        "done": len(done),
        "failed": len(records) - len(done),
        "failures": dict(sorted(failures.items())),
        "instances": sum(r["instances"] for r in records),
        "bytes": sum(r["bytes"] for r in records),
        "seconds": None if span is None else round(span, 6),
        "studies_per_hour": None if not span else round(len(done) / span * 3600, 3),
        "latency": {
            name: percentiles(r[name] for r in done if r[name] is not None)
            for name in ("latency", "grouping_wait", "queued", "ran", "export")
        },
    }


def machine() -> dict[str, Any]:
    """The machine the generator ran on (the service's may differ)."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}  # fmt: skip


# ---------------------------------------------------------------------------- senders


def dicom_module() -> Any:
    """The DICOM connector's load module: the ``dicom`` entry point of ``dataflow.load``,
    else the ``load`` module beside the one the ``dicom`` connector's entry point names."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group="dataflow.load")}
    if "dicom" in found:
        return found["dicom"].load()
    connectors = importlib.metadata.entry_points(group="dataflow.connectors")
    for ep in connectors:
        if ep.name == "dicom":
            return importlib.import_module(ep.module.rpartition(".")[0] + ".load")
    raise UsageError("--dicom: no DICOM connector is installed (entry point dataflow.connectors: "
                     "dicom)")  # fmt: skip


class DicomSender:
    """A simulated modality: each study a fresh copy of ``studies``, C-STOREd."""

    def __init__(self, name: str, modality: Any, studies: Any) -> None:
        self.name, self._modality, self._studies = name, modality, studies

    def prepare(self, index: int) -> tuple[str, list[Path]]:
        return self._studies.fresh()

    def submit(self, index: int, prepared: tuple[str, list[Path]]) -> Submitted:
        uid, files = prepared
        try:
            sent = self._modality.send(uid, files)
        finally:
            self._studies.discard(files)
        reason = ""
        if sent.failed == sent.instances:
            reason = "send failed: no instance taken"
        elif sent.failed:
            reason = "send failed: instances refused"
        return Submitted(uid, None, sent.began, sent.last, sent.instances, sent.bytes, reason)


class ApiSender:
    """Jobs of ``pipeline`` through the REST API, each with one of ``inputs`` (a list of
    (name, path) files; in turn) and one of ``priorities`` (in turn)."""

    def __init__(self, name: str, client: Any, pipeline: str,
                 inputs: Sequence[Sequence[tuple[str, Path]]], prefix: str) -> None:  # fmt: skip
        self.name, self._client, self._pipeline = name, client, pipeline
        self._inputs, self._prefix = inputs, prefix
        self.priorities: Sequence[str] = ("normal",)

    def prepare(self, index: int) -> None:
        return None

    def submit(self, index: int, prepared: None) -> Submitted:
        from dataflow.platform.client import ApiError

        began = time.time()
        files = self._inputs[index % len(self._inputs)] if self._inputs else []
        priority = self.priorities[index % len(self.priorities)]
        body = {"pipeline": self._pipeline, "name": f"{self._prefix}-{index + 1}",
                "priority": priority, "metadata": {}}  # fmt: skip
        try:
            made = self._client.call("POST", "/api/v1/jobs", json=body)
            for name, path in files:
                self._client.upload(made["payload_id"], name, path)
            self._client.call("POST", f"/api/v1/jobs/{made['job_id']}/start")
        except ApiError as exc:
            why = f"HTTP {exc.status}" if exc.status else "no answer"
            return Submitted(None, None, began, time.time(), reason=f"send failed: API {why}")
        size = sum(path.stat().st_size for _, path in files)
        return Submitted(None, made["job_id"], began, time.time(), len(files), size)


def api_inputs(path: Path | None, sequence: bool) -> list[list[tuple[str, Path]]]:
    """cpload's payloads: none (an empty payload); a file; a folder whole; or, with
    ``sequence``, each child of the folder (a file, or a sub-folder whole) as the input of
    one job in turn."""
    from dataflow.platform.client import _input_files

    if path is None:
        return []
    if not sequence:
        return [_input_files(path)]
    if not path.is_dir():
        raise UsageError(f"--sequence needs a folder as --input ({path} is not one)")
    children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not children:
        raise UsageError(f"--input {path}: the folder is empty")
    return [_input_files(child) for child in children]


# ---------------------------------------------------------------------------- the run


class Run:
    """The studies of one run and the threads that send and follow them."""

    def __init__(self, plan: LoadPlan, senders: Sequence[Sender], client: Any) -> None:
        self.plan, self.senders, self.client = plan, senders, client
        self.studies: list[Study] = []
        self._next = 0
        self._lock = threading.Lock()
        self._sending = len(senders)
        self.began = 0.0

    # the senders

    def _take(self) -> Study | None:
        with self._lock:
            if self._next >= self.plan.count:
                return None
            index = self._next
            self._next += 1
            study = Study(index, "", self.began + index * self.plan.interval)
            self.studies.append(study)
            return study

    def _send(self, sender: Sender) -> None:
        try:
            while (study := self._take()) is not None:
                study.sender = sender.name
                priorities = getattr(sender, "priorities", ())
                if priorities:
                    study.priority = priorities[study.index % len(priorities)]
                try:
                    prepared = sender.prepare(study.index)
                    delay = study.offered - time.time()
                    if delay > 0:
                        time.sleep(delay)
                    got = sender.submit(study.index, prepared)
                except (DataflowError, OSError) as exc:  # the copy could not be made, say
                    why, now = f"send failed: {type(exc).__name__}", time.time()
                    got = Submitted(None, None, now, now, reason=why)
                except BaseException:
                    self._end(study, "send failed: a bug", "failed")  # its traceback follows
                    raise
                study.key, study.job_id = got.key, got.job_id
                study.began, study.instances, study.bytes = got.began, got.instances, got.bytes
                if got.reason:
                    self._end(study, got.reason, "failed")
                else:
                    study.state = "sent"
                study.sent = got.sent  # last: the follower takes it from here
        finally:
            with self._lock:
                self._sending -= 1

    # following each study

    def _end(self, study: Study, reason: str | None, state: str | None = None) -> None:
        study.reason = reason
        if state:
            study.state = state
        study.done = True

    def _follow(self, study: Study, listed: dict[str, dict[str, Any]]) -> None:
        """One look at a sent study's job (``listed``: the run's jobs by id, as the job list
        gives them; a job still on its way is not asked for more) and its exports; ends the
        study when there is no more to see, or when it ran past the plan's timeout."""
        from dataflow.platform.client import ApiError

        if study.job_id is None:
            found = self.client.call("GET", "/api/v1/jobs", params={"find": study.key, "limit": 5})
            if found:
                study.job_id = found[-1]["id"]  # the oldest: the one the study made
        summary = listed.get(study.job_id or "")
        if summary is not None and summary["state"] not in ENDED:
            study.pipeline, study.state = summary["pipeline"], summary["state"]
            study.created, study.started = summary["created"], summary["started"]
        elif study.job_id is not None:
            status = self.client.call("GET", f"/api/v1/jobs/{study.job_id}")
            study.pipeline, study.state = status["pipeline"], status["state"]
            study.created, study.started = status["created"], status["started"]
            study.finished = status["finished"]
            study.exports = [{"destination": e["destination"], "state": e["state"],
                              "at": e["updated"]} for e in status.get("exports", [])]  # fmt: skip
            if study.state in ENDED:
                if not study.stages:
                    try:
                        name = f"/api/v1/jobs/{study.job_id}/files/output/.timeline.json"
                        study.stages = self.client.call("GET", name) or []
                    except ApiError:
                        study.stages = []
                if study.state != "succeeded":
                    failed_in = next((op["name"] for op in status.get("operators", [])
                                      if op["status"] == "FAULTED"), None)  # fmt: skip
                    why = f"job {study.state}" + (f" in {failed_in}" if failed_in else "")
                    return self._end(study, why)
                if not self.plan.wait_export:
                    return self._end(study, None)
                ended = [e for e in study.exports if e["state"] in EXPORT_ENDED]
                if study.exports and len(ended) == len(study.exports):
                    if any(e["state"] == "dead" for e in study.exports):
                        return self._end(study, "export dead")
                    study.pacs = max(e["at"] for e in study.exports)
                    return self._end(study, None)
        if study.sent is not None and time.time() - study.sent > self.plan.timeout:
            waiting = (
                "no job"
                if study.job_id is None
                else ("job " + study.state if study.state not in ENDED else "no export")
            )
            self._end(study, f"timed out: {waiting}")  # fmt: skip

    def _watch(self) -> None:
        """Follow the sent studies until every one has ended: each turn one call lists the
        run's jobs, and only a study without a job yet, or whose job has ended, takes calls
        of its own (the generator should not be what loads the service)."""
        while True:
            with self._lock:
                sending = self._sending
                open_ = [s for s in self.studies if not s.done and s.sent is not None]
            listed: dict[str, dict[str, Any]] = {}
            if any(s.job_id is not None for s in open_):
                params = {"created_after": self.began - 60, "limit": 10000}
                jobs = self.client.call("GET", "/api/v1/jobs", params=params)
                listed = {job["id"]: job for job in jobs}
            for study in open_:
                self._follow(study, listed)
            if not sending and all(s.done for s in self.studies):
                return
            time.sleep(POLL)

    def counts(self) -> dict[str, Any]:
        """What the display shows: sent, running, done, failed, and the latency so far."""
        with self._lock:
            studies = list(self.studies)
        done = [s for s in studies if s.done and s.reason is None]
        latencies = [s.record()["latency"] for s in done]
        return {
            "sent": sum(1 for s in studies if s.sent is not None),
            "running": sum(1 for s in studies if s.state == "running"),
            "done": len(done),
            "failed": sum(1 for s in studies if s.done and s.reason is not None),
            "count": self.plan.count,
            "latency": percentiles(x for x in latencies if x is not None),
        }

    def run(self, show: Callable[[dict[str, Any]], None]) -> None:
        self.began = time.time()
        threads = [threading.Thread(target=self._send, args=(s,), name=f"load-{s.name}",
                                    daemon=True) for s in self.senders]  # fmt: skip
        failure: list[BaseException] = []

        def watch() -> None:
            try:
                self._watch()
            except BaseException as exc:  # the API went away: said by the run
                failure.append(exc)

        watcher = threading.Thread(target=watch, name="load-watch", daemon=True)
        for thread in [*threads, watcher]:
            thread.start()
        while watcher.is_alive():
            show(self.counts())
            watcher.join(0.5)
        show(self.counts())
        if failure:
            raise failure[0]


def line(counts: dict[str, Any]) -> str:
    latency = counts["latency"]
    so_far = (f"latency p50 {latency['p50']:.2f}s max {latency['max']:.2f}s"
              if latency else "latency -")  # fmt: skip
    return (
        f"sent {counts['sent']}/{counts['count']}  running {counts['running']}  "
        f"done {counts['done']}  failed {counts['failed']}  {so_far}"
    )


def display(echo: Callable[[str], None]) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """``(show, close)``: a rich live line on a terminal, else a plain line each time the
    counts change."""
    if sys.stderr.isatty():
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:
            pass
        else:
            live = Live("", console=Console(stderr=True), refresh_per_second=4, transient=False)
            live.start()
            return (lambda counts: live.update(line(counts))), live.stop
    last: list[str] = [""]

    def show(counts: dict[str, Any]) -> None:
        text = line(counts)
        key = text.split("  latency")[0]
        if key != last[0]:
            last[0] = key
            echo(text)

    return show, lambda: None


def run_load(plan: LoadPlan, senders: Sequence[Sender], client: Any, results: Path,
             options: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Send ``plan.count`` studies through ``senders``, follow each through ``client`` (the
    REST API), write ``results`` (JSON lines: run, studies, summary); the summary."""
    if plan.count < 1:
        raise UsageError(f"--count {plan.count}: expected at least 1")
    try:
        results.parent.mkdir(parents=True, exist_ok=True)
        out = open(results, "w")  # noqa: SIM115 (held for the run)
    except OSError as exc:
        raise DataflowError(f"--results {results}: cannot be written ({exc})") from None
    with out:
        head = {"record": "run", "version": RESULTS_VERSION, "began": time.time(),
                "options": options, "machine": machine()}  # fmt: skip
        out.write(json.dumps(head) + "\n")
        show, close = display(echo)
        run = Run(plan, senders, client)
        try:
            run.run(show)
        finally:  # what was seen goes to the file, also when the run was stopped
            close()
            records = [s.record() for s in sorted(run.studies, key=lambda s: s.index)]
            for record in records:
                out.write(json.dumps(record) + "\n")
            summary = summarize(records)
            out.write(json.dumps(summary) + "\n")
    return summary


# ---------------------------------------------------------------------------- the command


def command(*, dicom: str | None, called: str, calling: str, modalities: int,
            study: Path | None, slices: int, size: int, pipeline: str | None,
            input_: Path | None, sequence: bool, priority: Sequence[str], count: int,
            rate: float | None, delay: float | None, api: str | None, results: Path,
            timeout: float, wait_export: bool | None,
            echo: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """``dataflow load``: the options checked, the senders made, the run; its summary."""
    from dataflow.platform.client import ApiClient

    if (dicom is None) == (pipeline is None):
        raise UsageError("say what to load: --dicom HOST:PORT (studies to a DICOM receiver) "
                         "or --pipeline NAME (jobs through the API), not both")  # fmt: skip
    if rate is not None and delay is not None:
        raise UsageError("--rate and --delay both set the pace: give one")
    if rate is not None and rate <= 0:
        raise UsageError(f"--rate {rate}: studies per minute, above 0")
    interval = 60.0 / rate if rate else (delay or 0.0)
    plan = LoadPlan(
        count=count,
        interval=interval,
        timeout=timeout,
        wait_export=(dicom is not None) if wait_export is None else wait_export,
    )
    options = {"mode": "dicom" if dicom else "api", "count": count, "rate": rate,
               "delay": delay, "modalities": modalities if dicom else 1,
               "called": called if dicom else None, "pipeline": pipeline,
               "priority": list(priority) or ["normal"], "slices": None if study else slices,
               "size": None if study else size, "study": bool(study), "timeout": timeout,
               "wait_export": plan.wait_export}  # fmt: skip
    client = ApiClient(api)
    try:
        client.call("GET", "/api/v1/health")  # a service that is down: said now, by address
        if pipeline is not None:
            inputs = api_inputs(input_, sequence)
            sender = ApiSender("api", client, pipeline, inputs, prefix="load")
            sender.priorities = list(priority) or ["normal"]
            return run_load(plan, [sender], client, results, options, echo)
        host, _, port = dicom.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--dicom {dicom!r}: expected HOST:PORT")
        module = dicom_module()
        senders = []
        for k in range(1, modalities + 1):
            modality = module.modality(host, int(port), called, f"{calling}{k}"[:16])
            senders.append(modality)
        senders[0].check()
        source = module.studies(study, slices=slices, size=size)
        try:
            named = [DicomSender(f"{calling}{k + 1}", m, source) for k, m in enumerate(senders)]
            return run_load(plan, named, client, results, options, echo)
        finally:
            source.close()
    finally:
        client.close()
