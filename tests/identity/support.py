"""Helpers for the identity tests: an mTLS echo server that follows SVID rotations, a client that
keeps calling it, and an observer that records identity events."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cryptography import x509

from outrider.sidecar.identity.tls import RotatingClientContext, RotatingServerContext, peer_spiffe_id
from outrider.sidecar.identity.workload import WorkloadApiIdentity
from outrider.sidecar.telemetry.observer import NullObserver


class RecordingObserver(NullObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, str]] = []

    def identity_event(self, event: str, spiffe_id: str | None, detail: str) -> None:
        self.events.append((event, spiffe_id, detail))


@dataclass
class CallStats:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    server_serials: set[int] = field(default_factory=set)
    client_serials: set[int] = field(default_factory=set)
    peer_ids: set[str] = field(default_factory=set)


@contextlib.asynccontextmanager
async def mtls_echo(identity: WorkloadApiIdentity) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 that requires a client SVID and answers with the client's SPIFFE ID."""
    rotating = RotatingServerContext(identity)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()
            peer = peer_spiffe_id(writer.get_extra_info("ssl_object")) or "-"
            writer.write(peer.encode() + b"\n")
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=rotating.context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def call_once(
    identity: WorkloadApiIdentity, port: int, stats: CallStats, client: RotatingClientContext
) -> None:
    try:
        context = client.current()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=None), 5
        )
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            stats.server_serials.add(
                x509.load_der_x509_certificate(ssl_object.getpeercert(True)).serial_number
            )
            writer.write(b"ping\n")
            await writer.drain()
            answer = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
        finally:
            writer.close()
        if not answer.startswith("spiffe://"):
            stats.failures.append(f"server did not see a client SVID: {answer!r}")
            return
        stats.peer_ids.add(answer)
        stats.client_serials.add(x509.load_pem_x509_certificate(identity.x509().cert_chain_pem).serial_number)
        stats.ok += 1
    except Exception as exc:
        stats.failures.append(f"{type(exc).__name__}: {exc}")


async def keep_calling(
    identity: WorkloadApiIdentity, port: int, stats: CallStats, stop: asyncio.Event
) -> None:
    client = RotatingClientContext(identity, trust="spiffe")
    while not stop.is_set():
        await call_once(identity, port, stats, client)
        await asyncio.sleep(0.05)


async def poll_until(predicate: Callable[[], bool], within_s: float) -> bool:
    """Poll a plain state predicate (no event exists for "the status string changed")."""
    deadline = time.monotonic() + within_s
    while not predicate() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return predicate()
