"""Step 3 of the demo: an `mcp` SDK client acting as alice, through the sidecar, and what each call shows.

The token checks compare fingerprints (hashes) only: the demo never prints a token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import aiohttp
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from outrider.sidecar.demo.run import Demo


@asynccontextmanager
async def client_tracer(demo: Demo) -> AsyncIterator[trace.Tracer]:
    """A tracer for the demo client's own spans, exported over OTLP/HTTP to the demo's receiver.

    The receiver runs on this event loop, so the export must never block it: spans are exported by
    the batch processor's thread, and the final flush runs in a worker thread.
    """
    from outrider.sidecar.demo.traces import DEMO_CLIENT_SERVICE

    provider = TracerProvider(resource=Resource.create({"service.name": DEMO_CLIENT_SERVICE}))
    if demo.otlp_url:
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{demo.otlp_url}/v1/traces"))
        )
    try:
        yield provider.get_tracer("outrider.demo")
    finally:
        await asyncio.to_thread(provider.shutdown)


def tool_text(result: Any) -> str:
    """The concatenated text content of a CallToolResult."""
    parts = [getattr(block, "text", "") for block in getattr(result, "content", None) or []]
    return "\n".join(p for p in parts if p)


def tool_json(result: Any) -> dict[str, Any]:
    structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
    if isinstance(structured, dict):
        inner = structured.get("result", structured)
        if isinstance(inner, dict):
            return inner
    text = tool_text(result)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def find_claims(report: dict[str, Any]) -> dict[str, Any]:
    """The decoded JWT claims inside a whoami report, wherever the tool put them."""
    for key in ("claims", "token_claims", "decoded", "jwt"):
        value = report.get(key)
        if isinstance(value, dict):
            return value
    auth = report.get("authorization")
    if isinstance(auth, dict):
        return find_claims(auth)
    return report if "sub" in report else {}


def received_token(report: dict[str, Any]) -> str | None:
    for key in ("authorization", "Authorization", "token", "bearer"):
        value = report.get(key)
        if isinstance(value, str) and value:
            return value.removeprefix("Bearer ").strip()
        if isinstance(value, dict):
            inner = received_token(value)
            if inner:
                return inner
    return None


async def run_calls(demo: Demo, token: str) -> None:
    from outrider.sidecar.demo.run import (
        DOWNSTREAM_AUDIENCE,
        claims,
        expired_token,
        fingerprint,
    )

    c = demo.console
    url = demo.resource
    how = (
        "the pod's MCP port; iptables hands the connection to the sidecar on 15006"
        if demo.topo is not None
        else "the sidecar's inbound port"
    )
    c.say(f"connecting with the mcp SDK client to {url} ({how})")
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        tools = await client.list_tools()
        names = sorted(t.name for t in tools.tools)
        c.show("tools/list -> " + ", ".join(names))
        c.check({"whoami", "fetch", "echo"} <= set(names), "tools listed through the sidecar")
        c.check("delete" not in names, "tools/list hides the tool alice may not call (Cedar policy)")

        async with client_tracer(demo) as tracer:
            with tracer.start_as_current_span(
                "tools/call whoami",
                kind=SpanKind.CLIENT,
                attributes={"mcp.method.name": "tools/call", "gen_ai.tool.name": "whoami"},
            ):
                # The MCP conventions carry the caller's trace context in params._meta.
                carrier: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(carrier)
                result = await client.call_tool("whoami", {}, meta=cast(Any, carrier))
        report = tool_json(result)
        got = find_claims(report)
        raw = received_token(report)
        if raw:
            demo.tokens.append(raw)
        act_claim = got.get("act")
        act: dict[str, Any] = act_claim if isinstance(act_claim, dict) else {}
        c.say("tools/call whoami -> what the MCP server received in Authorization:")
        c.show(
            f"token {fingerprint(raw) if raw else '?'}  aud={got.get('aud')}  sub={got.get('sub')}  "
            f"act.sub={act.get('sub') if act else None}  iss={got.get('iss')}"
        )
        c.show(f"alice's own token was {fingerprint(token)}  aud={claims(token).get('aud')}")
        aud = got.get("aud")
        aud_ok = aud == DOWNSTREAM_AUDIENCE or (isinstance(aud, list) and DOWNSTREAM_AUDIENCE in aud)
        c.check(aud_ok, "the server got a token for the downstream audience", str(aud))
        c.check(got.get("sub") == "alice", "its subject is alice", f"sub={got.get('sub')}")
        c.check(
            bool(act) and act.get("sub") == demo.spiffe_id,
            "its act claim names the sidecar's SPIFFE ID",
            f"act.sub={act.get('sub') if act else None}",
        )
        c.check(raw is not None and raw != token, "the server never saw alice's own token (different token)")

        allowed = await client.call_tool("fetch", {"url": demo.allowed_url})
        text = tool_text(allowed)
        c.say(f"tools/call fetch {demo.allowed_url} -> {fetch_summary(allowed)}")
        c.check(
            f"hello from {urlsplit(demo.allowed_url).netloc}" in text
            and not getattr(allowed, "is_error", False),
            "an allowed host is reachable",
        )

        denied = await client.call_tool("fetch", {"url": demo.denied_url})
        text = tool_text(denied)
        c.say(f"tools/call fetch {demo.denied_url} -> {fetch_summary(denied)}")
        c.check(
            f"hello from {urlsplit(demo.denied_url).netloc}" not in text
            and (tool_json(denied).get("status") == 403 or bool(tool_json(denied).get("error"))),
            "a host outside the allowlist is blocked",
        )

        c.say("tools/call delete (the operators' Cedar policy permits it to group admins only)")
        try:
            await client.call_tool("delete", {"item": "notes"})
            refusal = None
        except MCPError as exc:
            refusal = exc
        c.show(f"-> JSON-RPC error {refusal.code}: {refusal.message}" if refusal else "-> it ran")
        c.check(
            refusal is not None and refusal.message == "denied by policy",
            "a tool call the policy does not permit is denied (and never reaches the server)",
        )

    await rate_limited_call(demo, token)
    expired = await expired_token(demo, "alice")
    demo.tokens.append(expired)
    c.say("a client with an EXPIRED token calls tools/list")
    assert demo.session is not None
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Authorization": f"Bearer {expired}", "Accept": "application/json, text/event-stream"}
    async with demo.session.post(
        url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
    ) as r:
        status = r.status
        challenge = r.headers.get("WWW-Authenticate", "")
    c.show(f"HTTP {status}  WWW-Authenticate: {challenge}")
    c.check(status == 401, "an expired token is refused with 401")
    c.check(
        "resource_metadata=" in challenge,
        "the challenge points to the protected resource metadata (RFC 9728)",
    )


async def rate_limited_call(demo: Demo, token: str) -> None:
    """echo is limited to 2 calls a minute per user: the third gets 429 with Retry-After."""
    c = demo.console
    assert demo.session is not None
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "demo", "version": "1"},
        },
    }
    timeout = aiohttp.ClientTimeout(total=10)
    async with demo.session.post(demo.resource, json=init, headers=headers, timeout=timeout) as r:
        await r.read()
        session_id = r.headers.get("Mcp-Session-Id")
    headers["MCP-Protocol-Version"] = "2025-06-18"
    if session_id:
        headers["Mcp-Session-Id"] = session_id
    c.say("tools/call echo three times (the operators allow 2 a minute for each user)")
    statuses: list[int] = []
    retry_after = None
    for i in range(1, 4):
        body = {
            "jsonrpc": "2.0",
            "id": i,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "hi"}},
        }
        async with demo.session.post(demo.resource, json=body, headers=headers, timeout=timeout) as r:
            await r.read()
            statuses.append(r.status)
            retry_after = r.headers.get("Retry-After", retry_after)
    c.show(f"HTTP {', '.join(map(str, statuses))}  Retry-After: {retry_after}")
    c.check(
        statuses == [200, 200, 429] and retry_after is not None,
        "the third call in the window is rate limited: 429 with Retry-After",
    )


def fetch_summary(result: Any) -> str:
    """`HTTP 200: hello from ...` from the fetch tool's JSON report (or its raw text)."""
    report = tool_json(result)
    if report:
        if report.get("error"):
            return f"error: {report['error']}"
        return f"HTTP {report.get('status')}: {_first_line(str(report.get('body', '')))}"
    return _first_line(tool_text(result))


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(empty)"
    return line if len(line) <= 100 else line[:97] + "..."
