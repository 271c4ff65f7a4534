"""The ``dataflow`` command line. Each command is a few lines that call library code."""

from __future__ import annotations

import json

import typer

from dataflow import __version__

app = typer.Typer(help="dataflow: medical-imaging AI pipelines over a shared-memory store.",
                  no_args_is_help=True, add_completion=False)  # fmt: skip
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
    from dataflow.errors import StoreError
    from dataflow.store import connect

    try:
        with connect(address, name="dataflow-cli") as client:
            typer.echo(json.dumps(client.stats(), indent=2))
    except StoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@store_app.command("list")
def store_list(address: str = typer.Argument(..., help="The store's address.")) -> None:
    """List the objects in a running store as JSON lines."""
    from dataflow.errors import StoreError
    from dataflow.store import connect

    try:
        with connect(address, name="dataflow-cli") as client:
            for record in client.list():
                typer.echo(json.dumps(record))
    except StoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
