"""The ``dataflow`` command line. Each command is a few lines that call library code.

Errors have one boundary, :class:`_Boundary` around every command: a
:class:`~dataflow.errors.DataflowError` (a user's mistake or a refusal, raised where it is
detected) prints ``error: MESSAGE`` on stderr and exits 2; anything else is a bug and
propagates with its traceback (exit 1). Exit 1 without a traceback is a result, said by the
command: an invalid pipeline (validate), a failed job (run, jobs create --wait), problems
(health)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

from dataflow import __version__
from dataflow.errors import DataflowError, UsageError
from dataflow.platform.client import jobs_app, payloads_app, pipelines_app
from dataflow.platform.dicom_cli import dicom_app
from dataflow.platform.models_cli import models_app
from dataflow.platform.order_cli import order as _order  # noqa: F401 (jobs order)
from dataflow.platform.tokens_cli import tokens_app
from dataflow.platform.trace_cli import trace as trace_command


class _Boundary(TyperGroup):
    """The one place where errors become exit codes (see the module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DataflowError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


# A bug's traceback shows no local variables: they may hold patient data.
app = typer.Typer(help="dataflow: medical-imaging AI pipelines over a shared-memory store.",
                  cls=_Boundary, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False)  # fmt: skip
store_app = typer.Typer(help="Inspect a running shared-memory store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def demo(
    slices: int = typer.Option(200, min=1, help="CT slices of 512x512 int16 to hand over."),
    consumers: int = typer.Option(2, min=1, help="Consumer processes."),
) -> None:
    """Hand a synthetic CT volume zero-copy between processes through the store."""
    from dataflow.demo import run_demo

    run_demo(slices=slices, consumers=consumers, echo=typer.echo)


@store_app.command("stats")
def store_stats(address: str = typer.Argument(..., help="The store's address.")) -> None:
    """Print a running store's statistics as JSON."""
    from dataflow.store import connect

    with connect(address, name="dataflow-cli") as client:
        typer.echo(json.dumps(client.stats(), indent=2))


@store_app.command("list")
def store_list(address: str = typer.Argument(..., help="The store's address.")) -> None:
    """List the objects in a running store as JSON lines."""
    from dataflow.store import connect

    with connect(address, name="dataflow-cli") as client:
        for record in client.list():
            typer.echo(json.dumps(record))


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {item!r}: expected NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


def _one_of(value: str | None, valid: tuple[str, ...], option: str) -> None:
    """UsageError with the valid values (and the closest, if any) unless ``value`` is one."""
    if value is None or value in valid:
        return
    from dataflow.hints import suggest

    close = suggest(value, valid)
    hint = f"; did you mean {close!r}?" if close else ""
    raise UsageError(f"{option} {value!r}: expected one of {', '.join(valid)}{hint}")


def _replicas(values: list[str] | None) -> dict[str, int]:
    out = {}
    for key, value in _pairs(values, "--replicas").items():
        if not value.isdigit() or int(value) < 1:
            raise UsageError(f"--replicas {key}={value}: expected a whole number >= 1")
        out[key] = int(value)
    return out


PARAM = typer.Option(None, "--param", "-p", help="Pipeline parameter NAME=VALUE (repeatable).")
REPLICAS = typer.Option(None, "--replicas", "-r", help="Replicas STAGE=N (repeatable).")
AS_JSON = typer.Option(False, "--json", help="One JSON record per line.")


@app.command()
def validate(
    file: Path = typer.Argument(..., help="Pipeline YAML file."),
    param: list[str] = PARAM,
    notes: bool = typer.Option(True, help="Also print notes (Clara fields accepted, unused)."),
) -> None:
    """Check a pipeline definition before anything runs; exit 1 on errors."""
    from dataflow.pipeline import check_pipeline

    report = check_pipeline(str(file), _pairs(param, "--param"))
    text = report.format(notes=notes)
    if text:
        typer.echo(text)
    counts = f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    if not report.ok:
        typer.echo(f"{file}: invalid: {counts}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{file}: valid ({counts})")


EXECUTOR = typer.Option(
    "local", help="local (worker processes here) or ray (a Ray cluster: docs/ray.md)."
)
ADDRESS = typer.Option(
    None,
    help="With --executor ray: the cluster (auto, HOST:PORT, ray://HOST:PORT); "
    "default: a Ray runtime started here on loopback.",
)


PLACEMENT = typer.Option(
    None,
    help="With --executor ray: reserve every replica at once in a Ray placement group: pack, "
    "spread, strict-pack or strict-spread (docs/ray.md, 'Placement').",
)


def _executor_options(executor: str, address: str | None, placement: str | None = None) -> None:
    _one_of(executor, ("local", "ray"), "--executor")
    for option, value in (("--address", address), ("--placement", placement)):
        if value is not None and executor != "ray":
            raise UsageError(f"{option} is the Ray cluster's: give it with --executor ray")
    if placement is not None:
        from dataflow.execution.rayexec import placement_problem

        problem = placement_problem(placement)
        if problem:
            raise UsageError(f"--placement {placement!r}: {problem}")


@app.command()
def plan(
    file: Path = typer.Argument(..., help="Pipeline YAML file."),
    param: list[str] = PARAM,
    replicas: list[str] = REPLICAS,
    executor: str = EXECUTOR,
    address: str = ADDRESS,
    placement: str = PLACEMENT,
) -> None:
    """Print the pipeline's DAG and where every stage replica would run (with --executor
    ray: on which node of the Ray cluster)."""
    from dataflow.execution.build import plan_pipeline
    from dataflow.pipeline import load_graph

    _executor_options(executor, address, placement)
    graph = load_graph(str(file), _pairs(param, "--param"))
    if executor == "ray":
        from dataflow.execution.rayexec import plan_on_ray

        graph, where = plan_on_ray(
            graph, address=address, replicas=_replicas(replicas), placement=placement
        )
    else:
        graph, where = plan_pipeline(graph, replicas=_replicas(replicas))
    typer.echo(f"pipeline {graph.spec.name!r}: {len(graph.nodes)} operators")
    for name, node in graph.nodes.items():
        ups = sorted({e.source for e in graph.upstream(name)})
        what = (
            node.spec.stage
            if node.kind == "stage"
            else f"container {node.spec.container.reference or ''}".strip()
        )
        source = ", ".join(ups) if ups else "job input"
        typer.echo(f"  {name} <- {source}   [{what}, replicas {node.spec.replicas}]")
    typer.echo("")
    typer.echo(where.format())


@app.command()
def run(
    file: Path = typer.Argument(..., help="Pipeline YAML file."),
    input: Path = typer.Option(
        ..., "--input", "-i", help="A job folder, or a folder of job folders."
    ),
    output: Path = typer.Option(Path("output"), "--output", "-o", help="Where results go."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Write into a non-empty --output that no earlier run wrote (its job folders "
        "are replaced). A re-run into an earlier run's output needs no flag.",
    ),
    param: list[str] = PARAM,
    replicas: list[str] = REPLICAS,
    max_jobs: int = typer.Option(8, min=1, help="Jobs in flight at once."),
    store_budget: str = typer.Option("1GiB", help="Shared-memory store budget, e.g. 4GiB."),
    log_format: str = typer.Option("console", help="console or json (logs on stderr)."),
    progress: bool = typer.Option(None, help="Progress display (default: on a terminal)."),
    executor: str = EXECUTOR,
    address: str = ADDRESS,
    placement: str = PLACEMENT,
) -> None:
    """Run every job under --input through the pipeline; exit 1 if any job failed.

    Each job's results go to OUTPUT/JOB/, which a re-run replaces as a whole once that job
    is done; OUTPUT/summary.json describes the last run."""
    from dataflow.execution.state import Limits
    from dataflow.logs import configure_logging
    from dataflow.run import run_pipeline_file
    from dataflow.units import parse_bytes

    _one_of(log_format, ("console", "json"), "--log-format")
    _executor_options(executor, address, placement)
    try:
        parse_bytes(store_budget)
    except ValueError as exc:  # the option's value, checked before anything starts
        raise UsageError(str(exc)) from None
    configure_logging("INFO", json=log_format == "json")
    show = sys.stderr.isatty() if progress is None else progress
    display = _Display(show)
    try:
        summary = run_pipeline_file(
            file, input, output=output, overwrite=overwrite, params=_pairs(param, "--param"),
            replicas=_replicas(replicas), limits=Limits(max_jobs=max_jobs),
            store_budget=store_budget, log_format=log_format,
            on_start=display.start, on_result=display.result, executor=executor,
            address=address, placement=placement,
        )  # fmt: skip
    except KeyboardInterrupt:
        display.stop()
        typer.echo("interrupted: workers and store stopped", err=True)
        raise typer.Exit(130) from None
    finally:
        display.stop()  # an error's message comes after the progress display
    _print_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def serve(
    config: Path = typer.Argument(..., help="Service configuration (YAML)."),
    set_: list[str] = typer.Option(
        None, "--set", help="Override a setting: key.path=value, a list item by [N] (repeatable)."
    ),
) -> None:
    """Run the service: connectors (DICOM in and out) and warm pipelines, until SIGTERM."""
    from dataflow.service.main import serve_forever

    try:
        serve_forever(config, set_ or [])
    except KeyboardInterrupt:
        typer.echo("stopped at once: jobs in flight run again at the next start", err=True)
        raise typer.Exit(130) from None


def jobs(
    target: Path = typer.Argument(..., help="The service's configuration file or state folder."),
    state: str = typer.Option(None, help="Only jobs in this state (queued, running, ...)."),
    limit: int = typer.Option(50, min=1, help="Most recent jobs to list."),
    as_json: bool = AS_JSON,
    retry: list[str] = typer.Option(
        None,
        "--retry",
        metavar="JOB_ID",
        help="Queue this failed job again (repeatable); a running service picks it up.",
    ),
    show: str = typer.Option(
        None, "--show", metavar="JOB_ID", help="One job: its history, exports and details."
    ),
) -> None:
    """The job records of a state folder, without a running service (`dataflow jobs CONFIG`
    for short): newest first, with each result's export state per destination; --show one
    job; or, with --retry, queue failed jobs again (exit 2 if any was refused, after the
    others)."""
    from dataflow.service.jobs import JOB_STATES, RetryRefused
    from dataflow.service.main import format_job, format_jobs, format_retried, open_jobs

    _one_of(state, JOB_STATES, "--state")
    store = open_jobs(target)
    try:
        if show:
            job = store.get(show)
            rows = store.deliveries(job.id)
            if as_json:
                typer.echo(format_jobs([job], as_json=True, deliveries={job.id: rows}))
            else:
                typer.echo(format_job(job, rows))
            return
        if not retry:
            records = store.list(state=state, limit=limit)
            rows = {job.id: store.deliveries(job.id) for job in records}
            typer.echo(format_jobs(records, as_json=as_json, deliveries=rows))
            return
        refused = 0
        for job_id in retry:
            try:
                typer.echo(format_retried(store.retry(job_id), as_json=as_json))
            except RetryRefused as exc:  # said, and the next one is tried
                typer.echo(f"error: {exc}", err=True)
                refused += 1
        if refused:
            raise typer.Exit(2)
    finally:
        store.close()


# `dataflow jobs VERB` and `dataflow pipelines VERB` talk to a running service's API;
# `dataflow jobs CONFIG` (= `dataflow jobs records CONFIG`) reads its state folder.
jobs_app.command("records")(jobs)
app.add_typer(jobs_app, name="jobs")
app.add_typer(pipelines_app, name="pipelines")
app.add_typer(payloads_app, name="payloads")
app.add_typer(models_app, name="models")
app.add_typer(dicom_app, name="dicom")
app.add_typer(tokens_app, name="tokens")
app.command("trace")(trace_command)


@app.command()
def load(
    dicom: str = typer.Option(None, help="HOST:PORT of the service's DICOM receiver."),
    called: str = typer.Option("DATAFLOW", help="The AE title to call (it routes to a pipeline)."),
    calling: str = typer.Option("LOAD", help="The modalities' AE titles: LOAD1, LOAD2, ..."),
    modalities: int = typer.Option(1, min=1, help="Simulated modalities (own associations)."),
    study: Path = typer.Option(None, help="A study folder to send (default: a synthetic CT)."),
    slices: int = typer.Option(64, min=1, help="Synthetic CT: slices."),
    size: int = typer.Option(128, min=8, help="Synthetic CT: rows and columns."),
    pipeline: str = typer.Option(None, help="Jobs of this pipeline through the API instead."),
    input_: Path = typer.Option(None, "--input", help="API: each job's input file or folder."),
    sequence: bool = typer.Option(False, help="API: each child of --input is one job's input."),
    priority: list[str] = typer.Option(None, help="API: job priority (repeatable: in turn)."),
    count: int = typer.Option(1, "--count", "-n", min=1, help="Studies (or jobs) to send."),
    rate: float = typer.Option(None, help="Studies per minute (default: as fast as they go)."),
    delay: float = typer.Option(None, min=0, help="Seconds between two sends (cpload -w)."),
    api: str = typer.Option(None, envvar="DATAFLOW_API", help="The service's REST API."),
    results: Path = typer.Option(Path("load-results.jsonl"), help="The results file."),
    timeout: float = typer.Option(600.0, min=1, help="Seconds a study may take once sent."),
    wait_export: bool = typer.Option(
        None, "--wait-export/--no-wait-export", help="Follow results to the PACS (DICOM: yes)."
    ),
) -> None:
    """Load a running service (Clara's cpload): studies over DICOM from simulated modalities,
    or jobs through the API; follow each to its result; write a results file (docs/load.md).
    Exit 1 if a study failed."""
    from dataflow.load import command

    summary = command(dicom=dicom, called=called, calling=calling, modalities=modalities,
                      study=study, slices=slices, size=size, pipeline=pipeline, input_=input_,
                      sequence=sequence, priority=priority or [], count=count, rate=rate,
                      delay=delay, api=api, results=results, timeout=timeout,
                      wait_export=wait_export,
                      echo=lambda text: typer.echo(text, err=True))  # fmt: skip
    typer.echo(json.dumps(summary, indent=1))
    if summary["failed"]:
        raise typer.Exit(1)


@app.command()
def health(
    target: Path = typer.Argument(..., help="The service's configuration file or state folder."),
    as_json: bool = typer.Option(False, "--json", help="The whole health report as JSON."),
    max_age: float = typer.Option(
        30.0, min=1, help="Seconds after which an unchanged health file means a hung service."
    ),
) -> None:
    """Say how the running service is: exit 0 healthy, 1 problems (a stage broken or
    degraded, dead letters, connector problems), 2 not running or not answering."""
    from dataflow.service.health import check
    from dataflow.service.main import format_health, state_folder

    code, report, summary = check(state_folder(target), max_age=max_age)
    if as_json:
        typer.echo(json.dumps({"exit": code, "summary": summary, **report}, indent=1))
    else:
        typer.echo(format_health(code, report, summary))
    raise typer.Exit(code)


@app.command()
def exports(
    config: Path = typer.Argument(..., help="The service's configuration file."),
    state: str = typer.Option(
        None, help="Only tasks in this state (pending, sending, sent, dead)."
    ),
    as_json: bool = AS_JSON,
    resend: list[str] = typer.Option(
        None,
        "--resend",
        metavar="TASK_ID",
        help="Send this dead letter again (repeatable); a running service is asked to.",
    ),
) -> None:
    """List the export outbox (results waiting, sent, dead-lettered); or re-send dead letters
    (exit 2 if any was refused, after the others)."""
    from dataflow.errors import ConfigError
    from dataflow.service.config import load_config
    from dataflow.service.main import format_exports, open_admins

    loaded = load_config(config)
    admins = open_admins(loaded)
    if not admins:
        raise ConfigError(
            f"{config}: no configured connector can list an outbox (none of "
            f"{', '.join(loaded.connectors) or 'no connector'} has admin())"
        )
    if not resend:
        rows = [row for admin in admins.values() for row in admin.exports(state)]
        typer.echo(format_exports(rows, as_json=as_json))
        return
    refused = 0
    for task_id in resend:
        reasons = []
        for name, admin in admins.items():
            try:
                typer.echo(admin.resend(task_id))
                break
            except DataflowError as exc:  # the next connector may know the task
                reasons.append(f"{name}: {exc}" if len(admins) > 1 else str(exc))
        else:
            typer.echo(f"error: {'; '.join(reasons)}", err=True)
            refused += 1
    if refused:
        raise typer.Exit(2)


class _Display:
    """A rich progress bar on a terminal; one structured log line per job otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = None
        self.failed = 0

    def start(self, jobs, graph, executor) -> None:
        self.executor = executor
        if not self.enabled:
            return
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.text import Text

        console = Console(stderr=True)  # stdout stays for the summary
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"), console=console,
        )  # fmt: skip
        self.task = self.bar.add_task(graph.spec.name, total=len(jobs), failed=0)
        self.stages = Text("")
        self.progress = Live(Group(self.bar, self.stages), console=console, transient=False)
        self.progress.start()
        executor.on_progress = self.startup  # start-up on the status line, not in the log

    def startup(self, event, progress) -> None:
        """Which stages are starting and how many workers are ready, until all are."""
        if self.progress is not None:
            self.stages.plain = progress.line()
            self.progress.refresh()

    def _stage_rates(self) -> str:
        """Per-stage throughput while busy: jobs per second of worker time."""
        ex = self.executor
        rates = [
            f"{name} {ex.stage_jobs[name] / ex.stage_seconds[name]:.1f}/s"
            for name in ex.stage_jobs
            if ex.stage_seconds[name] > 0
        ]
        return " · ".join(rates)

    def result(self, result) -> None:
        import structlog

        self.failed += not result.ok
        if self.progress is not None:
            self.bar.update(self.task, advance=1, failed=self.failed)
            self.stages.plain = self._stage_rates()
            self.progress.refresh()
            if not result.ok:
                self.progress.console.print(
                    f"[red]job {result.job} failed[/] in {result.stage}: {result.reason}"
                )
            return
        log = structlog.get_logger("dataflow.run")
        if result.ok:
            log.info("job_succeeded", job=result.job, seconds=round(result.seconds, 3))
        else:
            log.error("job_failed", job=result.job, stage=result.stage, reason=result.reason)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _print_summary(summary) -> None:
    done = len(summary.results) - len(summary.failed)
    typer.echo(
        f"{summary.pipeline}: {done} job(s) succeeded, {len(summary.failed)} failed "
        f"in {summary.seconds:.1f} s; results in {summary.output}"
    )
    for name, count in summary.stage_jobs.items():
        busy = summary.stage_seconds[name]
        rate = f"{count / busy:.1f} jobs/s busy" if busy > 0 else "-"
        typer.echo(f"  {name}: {count} job(s), {rate}")
    for r in summary.failed:
        typer.echo(f"  FAILED {r.job} at {r.stage}: {r.reason}")


if __name__ == "__main__":
    app()
