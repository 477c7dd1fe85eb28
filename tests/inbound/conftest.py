"""Fixtures for the inbound proxy tests: the dev Workload API + real identity client, the dev IdP, the
real `mcp` SDK server (uvicorn on loopback), and the inbound proxy between them.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiohttp import web
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from outrider.sidecar.config import parse
from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.exchange import TokenExchanger
from outrider.sidecar.identity import component as identity_component
from outrider.sidecar.inbound import component as inbound_component
from outrider.sidecar.inbound.proxy import InboundProxy
from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry.observer import NullObserver, Observer

TRUST_DOMAIN = "example.org"
SIDECAR_ID = "spiffe://example.org/ns/mcp/sa/weather"
AGENT_ID = "spiffe://example.org/ns/agents/sa/planner"
RESOURCE = "https://mcp.example.com/mcp"
DOWNSTREAM = "https://api.example.com"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def serve_everything(
    handle: Callable[[web.Request], Any], port: int, *, client_max_size: int = 1 << 30
) -> AsyncIterator[None]:
    """An aiohttp app on 127.0.0.1:`port` whose one handler takes every method and path."""
    app = web.Application(client_max_size=client_max_size)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


@pytest.fixture
async def workload_api(tmp_path: Path) -> AsyncIterator[DevWorkloadApi]:
    async with DevWorkloadApi(
        tmp_path / "agent.sock", trust_domain=TRUST_DOMAIN, spiffe_id=SIDECAR_ID
    ) as api:
        yield api


@pytest.fixture
async def idp(workload_api: DevWorkloadApi) -> AsyncIterator[DevIdP]:
    clients = [ClientRegistration("weather-mcp", spiffe_ids=(SIDECAR_ID,), audiences=(DOWNSTREAM,))]
    async with DevIdP(
        clients=clients,
        spiffe_bundles=StaticJwtBundles({TRUST_DOMAIN: workload_api.jwks()}),
        default_audience=RESOURCE,
    ) as server:
        yield server


@dataclass
class Sidecar:
    url: str  # http(s)://127.0.0.1:<port>
    proxy: InboundProxy
    runtime: Runtime

    def mcp_url(self, path: str = "/mcp") -> str:
        return self.url + path


def sidecar_config(
    idp: DevIdP, workload_api: DevWorkloadApi, mcp_port: int, **inbound: Any
) -> dict[str, Any]:
    config = idp.sidecar_config(
        workload_socket=workload_api.target,
        port=free_port(),
        mcp_port=mcp_port,
        resource=RESOURCE,
        audience=DOWNSTREAM,
    )
    config["inbound"].update(inbound)
    return config


@asynccontextmanager
async def run_sidecar(
    raw: dict[str, Any],
    *,
    observer: Observer | None = None,
    exchanger: TokenExchanger | inbound_component._Build | None = inbound_component.BUILD,
    wait_ready: bool = True,
) -> AsyncIterator[Sidecar]:
    """The identity component (real Workload API client) and the inbound proxy, as in `outrider sidecar`."""
    import asyncio

    runtime = Runtime(config=parse(raw), observer=observer or NullObserver())
    async with (
        identity_component.component(runtime),
        inbound_component.serve(runtime, exchanger=exchanger) as proxy,
    ):
        if wait_ready:
            for _ in range(500):
                checks = [check() for check in runtime.readiness.values()]
                if all(ok for ok, _ in checks):
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"sidecar never became ready: {checks}")
        scheme = "https" if runtime.config.inbound.mtls.enabled else "http"
        yield Sidecar(f"{scheme}://127.0.0.1:{runtime.config.inbound.port}", proxy, runtime)


SidecarFactory = Callable[..., AbstractAsyncContextManager[Sidecar]]


@pytest.fixture
def make_sidecar(idp: DevIdP, workload_api: DevWorkloadApi) -> SidecarFactory:
    def factory(
        mcp_port: int, *, observer: Observer | None = None, **inbound: Any
    ) -> AbstractAsyncContextManager[Sidecar]:
        return run_sidecar(sidecar_config(idp, workload_api, mcp_port, **inbound), observer=observer)

    return factory


def http_client(token: str | None, **kwargs: Any) -> httpx2.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return create_mcp_http_client(headers=headers, **kwargs)


def streamable_client(url: str, token: str | None, *, mode: str = "legacy") -> Client:
    transport = streamable_http_client(url, http_client=http_client(token))
    return Client(transport, mode=mode)


def legacy_sse_client(url: str, token: str | None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return Client(sse_client(url, headers=headers), mode="legacy")


@pytest.fixture
async def mcp_app(request: pytest.FixtureRequest) -> AsyncIterator[mcp_server.RunningServer]:
    mode = getattr(request, "param", "streamable")
    async with mcp_server.running(0, mode) as server:
        yield server


@dataclass
class Recorded:
    message: Any
    request: Any
    principal: Any = None
    exchanges: list[Any] = field(default_factory=list)
    finished: list[dict[str, Any]] = field(default_factory=list)
    injected: bool = False
    closed: bool = False
    policy: Any = None

    @property
    def outcome(self) -> dict[str, Any]:
        assert self.closed and len(self.finished) == 1, f"{self.message} finished {self.finished}"
        return self.finished[0]


class RecordingObserver:
    """An `Observer` that keeps every call scope's record for assertions."""

    def __init__(self) -> None:
        self.calls: list[Recorded] = []

    @contextmanager
    def mcp_call(self, message: Any, request: Any) -> Iterator[Any]:
        record = Recorded(message, request)
        self.calls.append(record)
        observer = self

        class Scope:
            def set_principal(self, principal: Any) -> None:
                record.principal = principal

            def inject_context(
                self, headers: MutableMapping[str, str], message: dict[str, Any] | None
            ) -> bool:
                record.injected = True
                headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                return False

            def token_exchange(self, outcome: Any) -> None:
                record.exchanges.append(outcome)

            def policy(self, outcome: Any) -> None:
                record.policy = outcome

            def finish(self, **kwargs: Any) -> None:
                record.finished.append(kwargs)

        del observer
        try:
            yield Scope()
        finally:
            record.closed = True

    def egress(self, decision: Any) -> None:
        return None

    def identity_event(self, event: str, spiffe_id: str | None, detail: str) -> None:
        return None

    def by_method(self, method: str) -> list[Recorded]:
        return [c for c in self.calls if c.message.method == method]
