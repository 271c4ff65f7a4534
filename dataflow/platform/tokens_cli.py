"""``dataflow tokens create|list|revoke CONFIG``: the API tokens of a service (``api: {tokens:
true}``), kept hashed in its state folder; run where the state folder is (no token needed:
whoever can read the state folder administers the service). The secret is printed once."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dataflow.platform.auth import ROLES, TokenStore

__all__ = ["tokens_app"]

tokens_app = typer.Typer(no_args_is_help=True, help="API tokens of a service (its state folder).")
CONFIG = typer.Argument(..., help="The service file (its state folder holds the tokens).")


def _store(config: Path) -> TokenStore:
    from dataflow.service import load_config

    return TokenStore(load_config(config).state)


@tokens_app.command("create")
def create(
    name: str = typer.Argument(..., help="Who or what uses it (the audit log's 'who')."),
    config: Path = CONFIG,
    role: str = typer.Option("read", help=f"One of {', '.join(ROLES)}."),
) -> None:
    """Make a token and print its secret (shown this once; only its hash is kept)."""
    token, secret = _store(config).create(name, role)
    typer.echo(f"token {token.name} ({token.role}, id {token.id}); its secret, shown once:")
    typer.echo(secret)


@tokens_app.command("list")
def list_tokens(config: Path = CONFIG, as_json: bool = typer.Option(False, "--json")) -> None:
    """The tokens (never their secrets)."""
    tokens = [t.public() for t in _store(config).list()]
    if as_json:
        typer.echo(json.dumps(tokens, indent=1))
        return
    import time

    typer.echo(f"{'NAME':<24} {'ROLE':<9} {'ID':<13} {'CREATED':<17} REVOKED")
    for t in tokens:
        when = lambda s: time.strftime("%Y-%m-%d %H:%M", time.localtime(s)) if s else "-"  # noqa: E731
        typer.echo(f"{t['name']:<24} {t['role']:<9} {t['id']:<13} {when(t['created']):<17} "
                   f"{when(t['revoked'])}")  # fmt: skip


@tokens_app.command("revoke")
def revoke(which: str = typer.Argument(..., help="Its name or id."), config: Path = CONFIG) -> None:
    """Revoke a token: calls with it are refused from now on (the running service too)."""
    token = _store(config).revoke(which)
    typer.echo(f"revoked token {token.name} ({token.id})")
