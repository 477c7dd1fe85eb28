"""The admin server on 15020: /healthz, /readyz, /metrics and kubelet probe forwarding to the app.

Probe forwarding follows the webhook's contract: `OUTRIDER_APP_PROBES` maps each rewritten path to
the original httpGet/tcpSocket probe, which is replayed against 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from outrider.sidecar.inbound.server import hardened_server
from outrider.sidecar.runtime import Runtime

log = logging.getLogger("outrider.admin")

PROBES_ENV = "OUTRIDER_APP_PROBES"
DEFAULT_PROBE_TIMEOUT_S = 1.0  # the kubelet's default timeoutSeconds


@dataclass(frozen=True)
class AppProbe:
    """One original kubelet probe of an app container, replayed against loopback."""

    kind: str  # "http" | "tcp"
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S


def parse_app_probes(raw: str | None) -> dict[str, AppProbe]:
    """Parse `OUTRIDER_APP_PROBES`; a malformed entry is skipped with a warning, never fatal."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON: probe forwarding disabled", PROBES_ENV)
        return {}
    if not isinstance(data, dict):
        log.warning("%s must be a JSON object: probe forwarding disabled", PROBES_ENV)
        return {}
    probes: dict[str, AppProbe] = {}
    for path, spec in data.items():
        probe = _probe(spec)
        if probe is None or not isinstance(path, str) or not path.startswith("/app-health/"):
            log.warning("%s: entry %r is not a usable httpGet/tcpSocket probe; skipped", PROBES_ENV, path)
            continue
        probes[path] = probe
    return probes


def _probe(spec: Any) -> AppProbe | None:
    if not isinstance(spec, Mapping):
        return None
    timeout = spec.get("timeoutSeconds", DEFAULT_PROBE_TIMEOUT_S)
    timeout_s = (
        float(timeout) if isinstance(timeout, int | float) and timeout > 0 else DEFAULT_PROBE_TIMEOUT_S
    )
    http = spec.get("httpGet")
    tcp = spec.get("tcpSocket")
    if isinstance(http, Mapping):
        port = http.get("port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            return None
        raw_headers = http.get("httpHeaders")
        headers = tuple(
            (str(h["name"]), str(h.get("value", "")))
            for h in (raw_headers if isinstance(raw_headers, list) else ())
            if isinstance(h, Mapping) and isinstance(h.get("name"), str)
        )
        path = http.get("path") or "/"
        scheme = str(http.get("scheme") or "HTTP").upper()
        if not isinstance(path, str) or scheme not in ("HTTP", "HTTPS"):
            return None
        return AppProbe(
            "http", port, path if path.startswith("/") else "/" + path, scheme, headers, timeout_s
        )
    if isinstance(tcp, Mapping):
        port = tcp.get("port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            return None
        return AppProbe("tcp", port, timeout_s=timeout_s)
    return None


def readiness_report(checks: Mapping[str, tuple[bool, str]]) -> tuple[bool, str]:
    """All checks must pass; the body lists each with its detail so `kubectl describe` says why."""
    ok = all(passed for passed, _ in checks.values())
    lines = [
        f"{name}: {'ok' if passed else 'NOT READY'} ({detail})"
        for name, (passed, detail) in sorted(checks.items())
    ]
    return ok, "\n".join(lines) + "\n" if lines else "no readiness checks\n"


# The kubelet does not verify the app's certificate for HTTPS probes; neither do we. A bare client
# context, not `create_default_context()`: that one loads the system CA store (~0.8 MB) for nothing.
_INSECURE = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_INSECURE.check_hostname = False
_INSECURE.verify_mode = ssl.CERT_NONE


async def run_probe(probe: AppProbe, session: aiohttp.ClientSession) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(probe.timeout_s):
            if probe.kind == "tcp":
                _, writer = await asyncio.open_connection("127.0.0.1", probe.port)
                writer.close()
                return True, f"tcp 127.0.0.1:{probe.port} open"
            url = f"{probe.scheme.lower()}://127.0.0.1:{probe.port}{probe.path}"
            headers = {"User-Agent": "kube-probe/outrider"}
            headers.update(dict(probe.headers))
            async with session.get(
                url,
                headers=headers,
                ssl=_INSECURE if probe.scheme == "HTTPS" else True,
                allow_redirects=False,
            ) as response:
                # The kubelet counts 200-399 as success.
                return 200 <= response.status < 400, f"HTTP {response.status} from {probe.path}"
    except TimeoutError:
        return False, f"no answer from 127.0.0.1:{probe.port} within {probe.timeout_s:g}s"
    except (OSError, aiohttp.ClientError) as exc:
        return False, f"127.0.0.1:{probe.port}: {type(exc).__name__}"


def build_handler(
    runtime: Runtime, probes: Mapping[str, AppProbe], session: aiohttp.ClientSession
) -> Callable[[web.BaseRequest], Awaitable[web.Response]]:
    """One handler for every request: the routes are few and fixed, and a router would answer
    some odd requests itself (e.g. an unknown `Expect` on an unmatched path) with a 500."""

    async def healthz() -> web.Response:
        return web.Response(text="ok\n")

    async def readyz() -> web.Response:
        results = {}
        if runtime.draining:
            results["shutdown"] = (False, "draining: SIGTERM received, finishing in-flight calls")
        for name, check in list(runtime.readiness.items()):
            try:
                results[name] = check()
            except Exception as exc:  # a broken check must read as not ready, not crash the probe
                results[name] = (False, f"check failed: {type(exc).__name__}")
        ok, text = readiness_report(results)
        return web.Response(text=text, status=200 if ok else 503)

    async def metrics() -> web.Response:
        parts = []
        for producer in list(runtime.metrics):
            try:
                parts.append(producer())
            except Exception:
                log.exception("a metrics producer failed")
        return web.Response(
            body=b"".join(parts),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def app_health(path: str) -> web.Response:
        probe = probes.get(path)
        if probe is None:
            # The path is not echoed: it is whatever the caller sent.
            return web.Response(text="no app probe registered for this path\n", status=404)
        ok, detail = await run_probe(probe, session)
        return web.Response(text=detail + "\n", status=200 if ok else 503)

    fixed = {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}

    async def handle(request: web.BaseRequest) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return web.Response(text="method not allowed\n", status=405, headers={"Allow": "GET, HEAD"})
        path = request.path
        if path in fixed:
            return await fixed[path]()
        if path.startswith("/app-health/"):
            return await app_health(path)
        return web.Response(text="not found\n", status=404)

    return handle


@asynccontextmanager
async def component(runtime: Runtime) -> AsyncIterator[None]:
    probes = parse_app_probes(os.environ.get(PROBES_ENV))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        with hardened_server(build_handler(runtime, probes, session), "outrider.admin.http") as (server, _):
            runner = web.ServerRunner(server)
            await runner.setup()
            try:
                site = web.TCPSite(
                    runner, runtime.config.admin.host, runtime.config.admin.port, reuse_address=True
                )
                await site.start()
                log.info(
                    "admin server on %s:%d (%d app probes)",
                    runtime.config.admin.host,
                    runtime.config.admin.port,
                    len(probes),
                )
                yield
            finally:
                await runner.cleanup()
