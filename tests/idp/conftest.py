"""Fixtures for the identity-provider tests (issue 13): the leak guard every test here runs under.

`leaks` collects every credential a test or stand-in handles (client secrets, assertions, tokens,
DPoP proofs) and every output the test produced (log records at DEBUG, the process's stdout/stderr,
and what tests register: the sidecar's log, audit file, OTLP payloads, /metrics). At teardown no
credential may appear in any output.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from outrider.sidecar.dev.spire import SpireDev, SpireOptions, find_binaries
from outrider.sidecar.dev.spire_oidc import SpireOidcProvider, find_oidc_provider
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.workload import WorkloadApiIdentity

# Loggers of the parts under test that are not Outrider: the MCP app (it may log what it received:
# the exchanged token is meant for it) and the test's own MCP/HTTP client.
NOT_OURS = ("mcp.", "sse_starlette", "uvicorn", "httpx2", "httpcore2", "starlette")


class LeakGuard:
    def __init__(self) -> None:
        self.values: set[str] = set()
        self.outputs: list[tuple[str, Callable[[], str | bytes]]] = []

    def secret(self, value: str | None) -> None:
        if not value or len(value) < 12:
            return
        self.values.add(value)
        parts = value.split(".")
        if len(parts) == 3 and len(parts[2]) >= 16:
            self.values.add(parts[2])  # a JWT's signature alone is enough to show it leaked

    def output(self, name: str, read: Callable[[], str | bytes]) -> None:
        self.outputs.append((name, read))

    def check(self, texts: list[tuple[str, str | bytes]]) -> None:
        for name, text in texts:
            data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
            for value in self.values:
                assert value.encode() not in data, f"a credential ({value[:6]}...) appears in {name}"


@pytest.fixture(autouse=True)
def leaks(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Iterator[LeakGuard]:
    caplog.set_level(logging.DEBUG)
    guard = LeakGuard()
    yield guard
    out, err = capfd.readouterr()
    # caplog keeps each phase's records apart: the set-up's and the test's, and the teardown so far.
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    texts: list[tuple[str, str | bytes]] = [
        (f"log record of {r.name}", f"{r.getMessage()} {r.exc_text or ''}")
        for r in records
        if not r.name.startswith(NOT_OURS)
    ]
    texts += [("stdout", out), ("stderr", err)]
    texts += [(name, read()) for name, read in guard.outputs]
    guard.check(texts)
    # Print again what was captured, so a failing test still shows its output.
    print(out, end="")


# -- real SPIRE with its OIDC discovery provider ------------------------------------------------

TRUST_DOMAIN = "example.org"
SIDECAR_ID = f"spiffe://{TRUST_DOMAIN}/ns/mcp/sa/weather"


@asynccontextmanager
async def spire_with_oidc(
    *, jwt_issuer: str | None = None
) -> AsyncIterator[tuple[SpireDev, SpireOidcProvider]]:
    """A SPIRE server + agent (entry: this UID -> SIDECAR_ID) and SPIRE's oidc-discovery-provider.

    `jwt_issuer` is the `iss` of the JWT-SVIDs; default: the discovery provider's own URL (what an
    IdP resolving the issuer through OIDC discovery needs).
    """
    bin_dir = find_binaries(build=True)
    if bin_dir is None or find_oidc_provider() is None:
        pytest.fail("SPIRE binaries missing: scripts/build-upstream.sh spire did not produce them")
    port = free_port()
    issuer = jwt_issuer or f"http://127.0.0.1:{port}"
    options = SpireOptions(trust_domain=TRUST_DOMAIN, log_level="WARN", jwt_issuer=issuer)
    async with SpireDev(bin_dir=bin_dir, options=options) as spire:
        await spire.create_entry(SIDECAR_ID, [f"unix:uid:{os.getuid()}"])
        async with SpireOidcProvider(spire, port=port) as oidc:
            yield spire, oidc


@asynccontextmanager
async def spire_identity(spire: SpireDev) -> AsyncIterator[WorkloadApiIdentity]:
    identity = WorkloadApiIdentity(
        IdentityConfig(socket=spire.agent_socket_uri, backoff_min_s=0.2, backoff_max_s=2.0)
    )
    async with identity:
        assert await identity.wait_ready(60), identity.status
        yield identity


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
