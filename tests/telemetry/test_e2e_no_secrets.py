"""Through the real sidecar (telemetry, identity, admin, inbound components; dev IdP; real `mcp` server):
every path's spans, metrics and audit lines are right, and no token or secret appears in any output.

Outputs scanned: log records (caplog, every level), the process's stdout/stderr (capfd), every OTLP/HTTP
payload the collector received (raw protobuf bytes), /metrics on the admin port, and the audit file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import TextContent

from outrider.sidecar import admin
from outrider.sidecar.config import parse
from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.identity import component as identity_component
from outrider.sidecar.inbound import component as inbound_component
from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry import component as telemetry_component
from outrider.sidecar.telemetry.observer_otel import OtelObserver

from .harness import validate_event
from .otlp_receiver import Received, attributes_of, free_port, otlp_http_receiver

TRUST_DOMAIN = "example.org"
SIDECAR_ID = "spiffe://example.org/ns/mcp/sa/weather"
RESOURCE = "https://mcp.example.com/mcp"
DOWNSTREAM = "https://api.example.com"
BASIC_CREDENTIALS = "YWxpY2U6YWxpY2UtcGFzc3dvcmQ="  # alice:alice-password
CLIENT_SECRET = "s3cr3t-client-secret-value"
SIDECAR_LOGGERS = ("outrider", "aiohttp", "opentelemetry", "asyncio", "grpc", "root", "spiffe")


@dataclass
class Stack:
    url: str
    admin_url: str
    runtime: Runtime
    idp: DevIdP
    received: Received
    audit_path: Path
    mcp: AsyncExitStack  # closing it stops the MCP server (for the upstream-down path)


@pytest.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as outer:
        endpoint, received = await outer.enter_async_context(otlp_http_receiver())
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        api = await outer.enter_async_context(
            DevWorkloadApi(tmp_path / "agent.sock", trust_domain=TRUST_DOMAIN, spiffe_id=SIDECAR_ID)
        )
        clients = [
            ClientRegistration(
                "weather-mcp", spiffe_ids=(SIDECAR_ID,), audiences=(DOWNSTREAM,), secret=CLIENT_SECRET
            )
        ]
        idp = await outer.enter_async_context(
            DevIdP(
                clients=clients,
                spiffe_bundles=StaticJwtBundles({TRUST_DOMAIN: api.jwks()}),
                default_audience=RESOURCE,
            )
        )
        mcp = AsyncExitStack()
        app = await mcp.enter_async_context(mcp_server.running(0, "streamable"))
        outer.push_async_callback(mcp.aclose)
        audit_path = tmp_path / "audit.jsonl"
        raw = {
            "pod": {"name": "weather-0", "namespace": "mcp"},
            "admin": {"host": "127.0.0.1", "port": free_port()},
            **idp.sidecar_config(
                workload_socket=api.target,
                port=free_port(),
                mcp_port=app.port,
                resource=RESOURCE,
                audience=DOWNSTREAM,
            ),
            "telemetry": {"audit": str(audit_path), "record_arguments": True},
        }
        runtime = Runtime(config=parse(raw))
        # The order of `outrider sidecar`: telemetry, identity, admin, inbound.
        await outer.enter_async_context(telemetry_component.component(runtime))
        await outer.enter_async_context(identity_component.component(runtime))
        await outer.enter_async_context(admin.component(runtime))
        await outer.enter_async_context(inbound_component.serve(runtime))
        for _ in range(500):
            if all(ok for ok, _ in (check() for check in runtime.readiness.values())):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("sidecar never became ready")
        yield Stack(
            url=f"http://127.0.0.1:{runtime.config.inbound.port}/mcp",
            admin_url=f"http://127.0.0.1:{runtime.config.admin.port}",
            runtime=runtime,
            idp=idp,
            received=received,
            audit_path=audit_path,
            mcp=mcp,
        )


def _client(url: str, token: str) -> Client:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(url, http_client=http), mode="legacy")


async def _post(session: aiohttp.ClientSession, url: str, authorization: str | None, body: Any) -> int:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if authorization is not None:
        headers["Authorization"] = authorization
    async with session.post(url, json=body, headers=headers) as response:
        await response.read()
        return response.status


TOOLS_LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
CALL_ECHO = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}


@pytest.mark.slow
async def test_every_path_is_observed_and_no_secret_leaks(
    stack: Stack, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    idp = stack.idp
    secrets: set[str] = {BASIC_CREDENTIALS, CLIENT_SECRET}

    # 1. Success through the real MCP SDK client: initialize, tools/list, tools/call (ok, isError).
    good = idp.mint("alice", audience=RESOURCE, client_id="claude-desktop")
    secrets.add(good)
    async with _client(stack.url, good) as client:
        await client.list_tools()
        echoed = await client.call_tool("echo", {"text": "hello", "password": "hunter2-argument"})
        assert isinstance(echoed.content[0], TextContent)
        who = await client.call_tool("whoami", {})
        failed = await client.call_tool("echo", {})  # a missing argument: an isError tool result
        assert failed.is_error
    block = who.content[0]
    assert isinstance(block, TextContent)
    whoami = json.loads(block.text)
    exchanged = whoami["authorization"].removeprefix("Bearer ")
    assert exchanged and exchanged != good
    secrets.add(exchanged)
    secrets.add("hunter2-argument")
    upstream_traceparent = whoami["traceparent"]

    async with aiohttp.ClientSession() as session:
        # 1b. A caller that started a trace in params._meta (MCP conventions): the call continues it.
        traced = {
            "jsonrpc": "2.0",
            "id": 77,
            "method": "tools/list",
            "params": {"_meta": {"traceparent": "00-1234567890abcdef1234567890abcdef-1234567890abcdef-01"}},
        }
        # (The stateful dev server answers 400 without a session id; the call is still observed.)
        await _post(session, stack.url, f"Bearer {good}", traced)

        # 2. Authentication failures: none, not Bearer, garbage, expired, wrong audience, foreign signer.
        expired = idp.mint("alice", audience=RESOURCE, expires_in=-600)
        wrong_aud = idp.mint("alice", audience="https://other.example.com")
        async with DevIdP() as rogue:
            forged = rogue.mint("alice", audience=RESOURCE, extra={"iss": idp.issuer})
        garbage = "not-a-jwt-but-still-a-secret-string"
        secrets.update({expired, wrong_aud, forged, garbage})
        assert await _post(session, stack.url, None, TOOLS_LIST) == 401
        assert await _post(session, stack.url, f"Basic {BASIC_CREDENTIALS}", TOOLS_LIST) == 401
        for bad in (garbage, expired, wrong_aud, forged):
            assert await _post(session, stack.url, f"Bearer {bad}", TOOLS_LIST) == 401

        # 3. IdP failures during the exchange (each with a fresh token: the exchange cache keys on it).
        for fault in ("oauth_error", "http_500", "malformed", "down"):
            token = idp.mint("bob", audience=RESOURCE)
            secrets.add(token)
            idp.faults.clear()
            if fault == "oauth_error":
                idp.faults.oauth_error = "invalid_grant"
                idp.faults.oauth_error_description = f"subject token {token} rejected"
            elif fault == "http_500":
                idp.faults.http_status = 500
            elif fault == "malformed":
                idp.faults.raw_body = json.dumps({"access_token": 42, "leaked": token}).encode()
            else:
                await idp.go_down()
            status = await _post(session, stack.url, f"Bearer {token}", CALL_ECHO)
            assert status >= 400, fault
            if fault == "down":
                await idp.come_back()
        idp.faults.clear()

        # 4. The MCP server goes away: upstream error.
        await stack.mcp.aclose()
        late = idp.mint("alice", audience=RESOURCE)
        secrets.add(late)
        assert await _post(session, stack.url, f"Bearer {late}", TOOLS_LIST) >= 500

        observer = stack.runtime.observer
        assert isinstance(observer, OtelObserver)
        await asyncio.to_thread(observer.worker.drain)  # recording runs on the telemetry thread
        async with session.get(stack.admin_url + "/metrics") as response:
            assert response.status == 200
            metrics_text = await response.text()

    await asyncio.to_thread(observer.force_flush)

    # --- what was recorded -------------------------------------------------------------------
    events = [json.loads(line) for line in stack.audit_path.read_text().splitlines()]
    for event in events:
        validate_event(event)
    calls = [e for e in events if e["type"] == "mcp.call"]
    exchanges = [e for e in events if e["type"] == "token.exchange"]
    outcomes = [(e["mcp"]["method"], e["mcp"]["tool"], e["outcome"]) for e in calls]
    assert ("tools/call", "echo", "ok") in outcomes
    assert ("tools/call", "echo", "tool_error") in outcomes
    assert ("initialize", None, "ok") in outcomes
    assert sum(1 for e in calls if e["outcome"] == "denied") == 6
    assert {e["exchange"]["outcome"] for e in exchanges if e["outcome"] == "error"} >= {"idp_unavailable"}
    assert any(e["mcp"]["token_exchange"] == "cache_hit" for e in calls)
    assert any(e["mcp"]["token_exchange"] == "issued" for e in calls)
    ok_call = next(e for e in calls if e["mcp"]["tool"] == "echo" and e["outcome"] == "ok")
    assert ok_call["user"]["sub"] == "alice"
    assert ok_call["client_id"] == "claude-desktop"
    assert ok_call["workload"] == {"spiffe_id": SIDECAR_ID, "pod": "weather-0", "namespace": "mcp"}
    assert ok_call["mcp"]["arguments"] == {"text": "hello", "password": "[REDACTED]"}
    assert calls[-1]["outcome"] == "error" and calls[-1]["mcp"]["http_status"] >= 500

    spans = [
        span
        for request in stack.received.traces
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    names = {span.name for span in spans}
    assert {
        "initialize",
        "tools/list",
        "tools/call echo",
        "tools/call whoami",
        "outrider.token_exchange",
    } <= names
    continued = [s for s in spans if s.trace_id.hex() == "1234567890abcdef1234567890abcdef"]
    # the continued trace: the server span under the caller's span, its token exchange (a cache hit)
    # as a child of the server span
    assert sorted(s.name for s in continued) == ["outrider.token_exchange", "tools/list"]
    server_span = next(s for s in continued if s.name == "tools/list")
    exchange_span = next(s for s in continued if s.name == "outrider.token_exchange")
    assert server_span.parent_span_id.hex() == "1234567890abcdef"
    assert exchange_span.parent_span_id == server_span.span_id
    assert attributes_of(exchange_span)["outrider.token_exchange.outcome"] == "cache_hit"
    whoami_span = next(s for s in spans if s.name == "tools/call whoami")
    # The MCP server got the SERVER span's context (flags may also carry the random-trace-id bit).
    assert upstream_traceparent.startswith(f"00-{whoami_span.trace_id.hex()}-{whoami_span.span_id.hex()}-")
    assert attributes_of(whoami_span)["enduser.id"] == "alice"
    assert attributes_of(whoami_span)["outrider.workload.spiffe_id"] == SIDECAR_ID
    assert any(
        attributes_of(s).get("error.type") == "tool_error" for s in spans if s.name == "tools/call echo"
    )
    assert 'outcome="denied"' in metrics_text
    assert "mcp_server_operation_duration_seconds_bucket" in metrics_text
    # The identity component reported its first SVID through the observer.
    assert "outrider_identity_healthy 1.0" in metrics_text
    assert 'outrider_identity_events_total{event="healthy"}' in metrics_text

    # --- and no secret anywhere ----------------------------------------------------------------
    out, err = capfd.readouterr()
    outputs: dict[str, str] = {
        "audit": stack.audit_path.read_text(),
        "metrics": metrics_text,
        "stdout": out,
        "stderr": err,
        "logs": "\n".join(
            f"{r.name} {r.getMessage()} {r.exc_text or ''}"
            for r in caplog.records
            # The sidecar's own loggers and the libraries it runs on; the dev IdP, Workload API and the
            # MCP server (which legitimately receives the exchanged token) are not the sidecar.
            if r.name.startswith(SIDECAR_LOGGERS) and not r.name.startswith("outrider.dev")
        ),
    }
    payloads = b"".join(stack.received.raw)
    assert payloads and outputs["logs"] and outputs["audit"]  # the scan looks at real output
    for secret in secrets:
        for where, text in outputs.items():
            assert secret not in text, f"a secret reached {where}"
        assert secret.encode() not in payloads, "a secret reached the OTLP export"
    for where, text in outputs.items():
        assert "eyJ" not in text, f"something JWT-shaped reached {where}"
        assert "PRIVATE KEY" not in text, f"a private key reached {where}"
    assert b"eyJ" not in payloads
    assert b"hunter2" not in payloads
