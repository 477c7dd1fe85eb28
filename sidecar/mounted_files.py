"""The secret and CA files the configuration names, checked at start-up instead of on the first call.

A missing or unreadable file is logged once at start and keeps /readyz at 503 with the key and the
path (never the content); the check runs again on each probe, so a Secret mounted late turns ready.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from outrider.sidecar.config import SidecarConfig
from outrider.sidecar.runtime import Runtime

log = logging.getLogger("outrider.files")


@dataclass(frozen=True)
class NamedFile:
    key: str  # the config key that names it, e.g. exchange.client_secret_file
    path: str
    kind: str  # "secret" (non-empty UTF-8 text) or "ca" (PEM certificates)


def named_files(config: SidecarConfig) -> tuple[NamedFile, ...]:
    """Every file the sidecar will read later on behalf of a request."""
    found: list[NamedFile] = []
    exchange = config.exchange
    if exchange.enabled and exchange.auth == "client-secret" and exchange.client_secret_file:
        found.append(NamedFile("exchange.client_secret_file", exchange.client_secret_file, "secret"))
    if exchange.enabled and exchange.ca_file:
        found.append(NamedFile("exchange.ca_file", exchange.ca_file, "ca"))
    return tuple(found)


def problem(file: NamedFile) -> str | None:
    """Why `file` cannot be used (naming the key and path, never the content), or None."""
    where = f"{file.key}: {file.path}"
    try:
        data = Path(file.path).read_bytes()
    except OSError as exc:
        return f"{where} cannot be read ({exc.strerror or type(exc).__name__})"
    if file.kind == "secret":
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return f"{where} is not UTF-8 text"
        return None if text.strip() else f"{where} is empty"
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        return f"{where} holds no PEM CA certificate"
    return None


def problems(files: tuple[NamedFile, ...]) -> list[str]:
    return [p for p in (problem(f) for f in files) if p is not None]


@asynccontextmanager
async def component(runtime: Runtime) -> AsyncIterator[None]:
    files = named_files(runtime.config)
    for text in problems(files):
        log.error("%s; the sidecar stays not ready until it can be read", text)

    def ready() -> tuple[bool, str]:
        found = problems(files)
        return (False, "; ".join(found)) if found else (True, "ok")

    if files:
        runtime.readiness["files"] = ready
    try:
        yield
    finally:
        runtime.readiness.pop("files", None)
