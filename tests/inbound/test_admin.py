"""The admin server on a real socket: /healthz, /readyz reasons, /metrics, kubelet probe forwarding."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from outrider.sidecar import admin
from outrider.sidecar.config import parse
from outrider.sidecar.runtime import Runtime

from .conftest import free_port


@pytest.fixture
async def app_server() -> AsyncIterator[tuple[int, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    async def healthy(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="fine")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    app = web.Application()
    app.router.add_get("/healthz", healthy)
    app.router.add_get("/broken", broken)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port, seen
    await runner.cleanup()


def probes_env(port: int, closed_port: int) -> str:
    return json.dumps(
        {
            "/app-health/mcp/livez": {
                "httpGet": {
                    "path": "/healthz",
                    "port": port,
                    "scheme": "HTTP",
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}],
                }
            },
            "/app-health/mcp/readyz": {"httpGet": {"path": "/broken", "port": port}},
            "/app-health/mcp/startupz": {"tcpSocket": {"port": port}},
            "/app-health/other/startupz": {"tcpSocket": {"port": closed_port}},
            "/app-health/slow/livez": {"httpGet": {"path": "/slow", "port": port}, "timeoutSeconds": 0.2},
            "/app-health/bad/livez": {"exec": {"command": ["true"]}},
        }
    )


async def test_admin_endpoints_and_probe_forwarding(
    app_server: tuple[int, list[dict[str, str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    app_port, seen = app_server
    admin_port = free_port()
    runtime = Runtime(config=parse({"admin": {"host": "127.0.0.1", "port": admin_port}}))
    state = {"identity": False}
    runtime.readiness["identity"] = lambda: (state["identity"], "waiting for the first X.509-SVID")
    runtime.readiness["inbound"] = lambda: (True, "ok")
    runtime.metrics.append(lambda: b"a_total 1\n")
    runtime.metrics.append(lambda: b"b_total 2\n")
    monkeypatch.setenv(admin.PROBES_ENV, probes_env(app_port, free_port()))
    base = f"http://127.0.0.1:{admin_port}"
    async with admin.component(runtime), aiohttp.ClientSession() as session:

        async def get(path: str) -> tuple[int, str]:
            async with session.get(base + path) as response:
                return response.status, await response.text()

        assert await get("/healthz") == (200, "ok\n")
        status, text = await get("/readyz")
        assert status == 503
        assert "identity: NOT READY (waiting for the first X.509-SVID)" in text and "inbound: ok" in text
        state["identity"] = True
        assert (await get("/readyz"))[0] == 200
        assert await get("/metrics") == (200, "a_total 1\nb_total 2\n")

        status, text = await get("/app-health/mcp/livez")
        assert status == 200 and "HTTP 200" in text
        assert seen[-1]["X-Probe"] == "1" and seen[-1]["Host"] == f"127.0.0.1:{app_port}"
        assert (await get("/app-health/mcp/readyz"))[0] == 503
        assert (await get("/app-health/mcp/startupz"))[0] == 200
        assert (await get("/app-health/other/startupz"))[0] == 503
        status, text = await get("/app-health/slow/livez")
        assert status == 503 and "within 0.2s" in text
        assert (await get("/app-health/bad/livez"))[0] == 404  # not a forwardable probe: skipped
        assert (await get("/app-health/nope/livez"))[0] == 404


def test_probe_parsing_is_forgiving() -> None:
    assert admin.parse_app_probes(None) == {}
    assert admin.parse_app_probes("not json") == {}
    assert admin.parse_app_probes("[]") == {}
    parsed = admin.parse_app_probes(
        json.dumps(
            {
                "/app-health/a/livez": {"httpGet": {"path": "x", "port": 8080, "scheme": "https"}},
                "/elsewhere": {"tcpSocket": {"port": 1}},
                "/app-health/b/livez": {"tcpSocket": {"port": 70000}},
            }
        )
    )
    assert parsed == {"/app-health/a/livez": admin.AppProbe("http", 8080, "/x", "HTTPS")}


def test_readiness_report() -> None:
    ok, text = admin.readiness_report({"b": (True, "ok"), "a": (False, "no SVID")})
    assert not ok and text == "a: NOT READY (no SVID)\nb: ok (ok)\n"
