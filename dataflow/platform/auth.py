"""API tokens with roles, for REST and gRPC alike (``api: {tokens: true}``).

A token is a random secret (``dft_`` and 43 URL-safe characters: 256 random bits) shown once,
at creation (``dataflow tokens create NAME --role ROLE CONFIG``); the state folder keeps only
its SHA-256 (``STATE/platform/tokens.json``, mode 0600, rewritten whole by one rename). A
digest without salt or key stretching is enough for a secret of 256 random bits: nothing can
be guessed from it. Each token has a name (the audit log's "who"), a role and may be revoked.

Roles, each allowing what the one before allows:

- ``read``: every GET (jobs, files, logs, pipelines, models, metrics, the console);
- ``operator``: jobs (create, start, cancel, retry), payloads, export re-sends, metadata;
- ``admin``: pipelines and models (create, update, remove; the console's pipeline upload),
  and Clara's Stop.

Clients send ``Authorization: Bearer <secret>`` (REST) or the ``authorization`` metadata with
the same value (gRPC); the console's browser sends it as a cookie set by its login page.
``/healthz`` and ``/readyz`` need none (a load balancer's checks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from dataflow.platform.errors import Invalid, NotFound, PlatformError
from dataflow.service.config import ROLE_NAMES as ROLES

__all__ = [
    "CONSOLE_OPEN",
    "COOKIE",
    "OPEN_PATHS",
    "ROLES",
    "Authenticator",
    "Forbidden",
    "TokenStore",
    "Unauthorized",
    "grpc_role",
    "rest_role",
]  # fmt: skip

PREFIX = "dft_"
OPEN_PATHS = ("/healthz", "/readyz")
#: the console's pages that need no token: signing in and out, and its stylesheet and script
CONSOLE_OPEN = ("/console/login", "/console/logout", "/console/static/")
#: the cookie that carries a console user's token (set by the login page)
COOKIE = "dataflow_token"


class Unauthorized(PlatformError):
    status, kind = 401, "unauthorized"


class Forbidden(PlatformError):
    status, kind = 403, "forbidden"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclasses.dataclass
class Token:
    id: str
    name: str
    role: str
    created: float
    digest: str
    revoked: float | None = None

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the digest."""
        return {"id": self.id, "name": self.name, "role": self.role, "created": self.created,
                "revoked": self.revoked}  # fmt: skip


class TokenStore:
    """The tokens of a state folder (``STATE/platform/tokens.json``)."""

    def __init__(self, state: Path) -> None:
        self.path = Path(state) / "platform" / "tokens.json"
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._tokens: list[Token] = []

    def _load(self) -> list[Token]:
        """The tokens on disk (read again when the file changed: a token made or revoked
        with the CLI while the service runs counts at once)."""
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if stamp != self._read_at:
            rows = json.loads(self.path.read_text() or "[]")
            self._tokens, self._read_at = [Token(**row) for row in rows], stamp
        return self._tokens

    def _save(self, tokens: list[Token]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".tokens.{uuid.uuid4().hex}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump([dataclasses.asdict(t) for t in tokens], out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, self.path)

    def create(self, name: str, role: str) -> tuple[Token, str]:
        """A new token and its secret (the only time it is seen)."""
        if role not in ROLES:
            raise Invalid(f"role {role!r}: one of {', '.join(ROLES)}")
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise Invalid(f"token name {name!r}: letters, digits, '.', '_', '-'")
        with self._lock:
            tokens = list(self._load())
            if any(t.name == name and t.revoked is None for t in tokens):
                raise Invalid(f"a token named {name!r} exists: revoke it first, or pick another")
            secret = PREFIX + secrets.token_urlsafe(32)
            token = Token(uuid.uuid4().hex[:12], name, role, time.time(), digest(secret))
            self._save([*tokens, token])
        return token, secret

    def list(self) -> list[Token]:
        with self._lock:
            return list(self._load())

    def revoke(self, which: str) -> Token:
        """Revoke the token named (or with the id) ``which``; NotFound otherwise."""
        with self._lock:
            tokens = list(self._load())
            for token in tokens:
                if which in (token.name, token.id) and token.revoked is None:
                    token.revoked = time.time()
                    self._save(tokens)
                    return token
        raise NotFound(f"no token {which!r} that is not revoked")

    def verify(self, secret: str) -> Token | None:
        """The live token whose secret this is (compared in constant time), or None."""
        wanted = digest(secret)
        found = None
        with self._lock:
            for token in self._load():
                if hmac.compare_digest(token.digest, wanted) and token.revoked is None:
                    found = token
        return found


def rest_role(method: str, path: str) -> str:
    """The least role a REST call needs."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return "read"
    if path.startswith(("/api/v1/pipelines", "/api/v1/models", "/console/pipelines")) and (
        "/metadata" not in path
    ):
        return "admin"
    return "operator"


def grpc_role(full_method: str) -> str:
    """The least role a gRPC call (``/nvidia.clara.platform.Jobs/Start``) needs."""
    service, _, call = full_method.strip("/").rpartition("/")
    service = service.rsplit(".", 1)[-1]
    reads = ("List", "Details", "Status", "ReadLogs", "Download", "Version", "Utilization",
             "GpuMetrics", "Read")  # fmt: skip
    if call.startswith(reads):
        return "read"
    if (service in ("Pipelines", "Models") and "Metadata" not in call) or call == "Stop":
        return "admin"
    return "operator"


class Authenticator:
    """Checks a call's credentials against the state folder's tokens."""

    def __init__(self, state: Path) -> None:
        self.tokens = TokenStore(state)

    def check(self, authorization: str | None, needed: str) -> Token:
        """The token behind ``Authorization: Bearer <secret>``, if its role is at least
        ``needed``; Unauthorized (401) or Forbidden (403) saying what is missing (never the
        secret)."""
        scheme, _, secret = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("this API needs a token: Authorization: Bearer <token> (dataflow "
                               "tokens create NAME --role ROLE CONFIG makes one)")  # fmt: skip
        token = self.tokens.verify(secret.strip())
        if token is None:
            raise Unauthorized("the token is unknown or revoked")
        if ROLES.index(token.role) < ROLES.index(needed):
            raise Forbidden(f"token {token.name!r} has the role {token.role!r}; this call needs "
                            f"{needed!r}")  # fmt: skip
        return token
