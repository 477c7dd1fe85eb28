"""Attacks on the running proxy that earlier tests did not try, each over a raw socket so the bytes
are exactly what an attacker sends: ambiguous session headers, notifications that name a request
method, and the like. The app behind the sidecar is a real aiohttp server that records what reached it.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import json
import threading
import wsgiref.simple_server
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.dev.workload_api import DevWorkloadApi

from .conftest import RESOURCE, SidecarFactory, free_port, run_sidecar, serve_everything, sidecar_config
from .test_fuzz_e2e import raw_request


@dataclass
class SessionApp:
    """An MCP-shaped app: `initialize` opens a session (`sess-N`); it records every request's headers."""

    port: int = field(default_factory=free_port)
    seen: list[list[tuple[str, str]]] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    numbers: itertools.count[int] = field(default_factory=itertools.count)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(list(request.headers.items()))
        body = await request.read()
        try:
            self.bodies.append(json.loads(body) if body else None)
        except ValueError:
            self.bodies.append(body)
        headers = {}
        if b'"initialize"' in body:
            headers["Mcp-Session-Id"] = f"sess-{next(self.numbers)}"
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}}, headers=headers)

    def session_headers(self) -> list[list[str]]:
        return [[v for n, v in headers if n.lower() == "mcp-session-id"] for headers in self.seen]


@pytest.fixture
async def session_app() -> AsyncIterator[SessionApp]:
    state = SessionApp()
    async with serve_everything(state.handle, state.port, client_max_size=1024**2):
        yield state


def post(token: str, body: Any, extra: bytes = b"") -> tuple[bytes, bytes]:
    """A POST /mcp as raw bytes: (head, body); `extra` is more header lines, each ending in CRLF."""
    data = json.dumps(body).encode()
    head = (
        b"POST /mcp HTTP/1.1\r\nHost: mcp.example.com\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: {len(data)}\r\n".encode()
        + extra
        + b"\r\n"
    )
    return head, data


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}


async def test_a_second_session_header_naming_someone_elses_session_is_refused(
    session_app: SessionApp, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    """Bob owns `sess-1` and sends it first, then Alice's `sess-0`: the proxy used to check only the
    first header and forward both, so an app reading the last one (or a list) served Alice's session."""
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    async with make_sidecar(session_app.port) as sidecar:
        port = port_of(sidecar.url)
        assert (await raw_request(port, *post(alice, INITIALIZE))).status == 200
        assert (await raw_request(port, *post(bob, INITIALIZE))).status == 200
        assert session_app.session_headers() == [[], []]
        for pair in (
            b"sess-1\r\nMcp-Session-Id: sess-0",
            b"sess-0\r\nMcp-Session-Id: sess-1",
            b"sess-1, sess-0",
        ):
            reply = await raw_request(port, *post(bob, CALL, b"Mcp-Session-Id: " + pair + b"\r\n"))
            assert reply.status == 404, reply
            assert json.loads(reply.body)["error"]["message"] == "Session not found"
        # The legacy `session_id` parameter: repeated, or percent-encoded in name and value.
        for query in (b"?session_id=sess-1&session_id=sess-0", b"?session%5Fid=sess%2D0"):
            head, body = post(bob, CALL, b"Mcp-Session-Id: sess-1\r\n")
            reply = await raw_request(port, head.replace(b"POST /mcp ", b"POST /mcp" + query + b" "), body)
            assert reply.status == 404, (query, reply)
        assert len(session_app.seen) == 2  # none reached the app
        # Bob naming his own session twice is his business: it goes on.
        twice = b"Mcp-Session-Id: sess-1\r\nMcp-Session-Id: sess-1\r\n"
        reply = await raw_request(port, *post(bob, CALL, twice))
        assert reply.status == 200
        assert session_app.session_headers()[-1] == ["sess-1", "sess-1"]


ECHO_ONLY = """
@id("echo-only")
permit(principal, action == Action::"call_tool", resource == Tool::"echo");
"""


async def test_a_request_method_sent_as_a_notification_is_judged(
    session_app: SessionApp, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    """`tools/call` without an `id` is not MCP (every client notification is `notifications/…`), but a
    server on a generic JSON-RPC library runs it and drops the answer. It used to pass unjudged: a
    denied tool, called as a "notification", reached the app. Real notifications still pass."""
    bob = idp.mint("bob", audience=RESOURCE)
    raw = sidecar_config(idp, workload_api, session_app.port)
    raw["policy"] = {"file": None, "cedar": ECHO_ONLY}
    denied = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_all", "arguments": {}}}
    allowed = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
    custom = {"jsonrpc": "2.0", "method": "admin/shutdown"}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with run_sidecar(raw) as sidecar:
        port = port_of(sidecar.url)
        for body in (denied, custom, [denied, custom]):
            reply = await raw_request(port, *post(bob, body))
            # No JSON-RPC answer exists for a notification: the caller sees the server ignoring it.
            assert (reply.status, reply.body) == (202, b""), reply
        assert session_app.bodies == []
        assert (await raw_request(port, *post(bob, [denied, initialized]))).status == 200
        assert session_app.bodies == [initialized]  # the batch's real notification went on alone
        session_app.bodies.clear()
        for body in (allowed, initialized):
            assert (await raw_request(port, *post(bob, body))).status == 200
        assert session_app.bodies == [allowed, initialized]


async def test_a_metered_call_sent_as_a_notification_spends_the_budget(
    session_app: SessionApp, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    """With rate limits and no policy, `tools/call` without an `id` was never metered: a caller over
    their budget went on calling the tool as fast as they liked."""
    bob = idp.mint("bob", audience=RESOURCE)
    raw = sidecar_config(idp, workload_api, session_app.port)
    raw["policy"] = {"file": None, "rate_limits": {"per_user": "2/hour"}}
    call = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
    async with run_sidecar(raw) as sidecar:
        port = port_of(sidecar.url)
        replies = [await raw_request(port, *post(bob, call)) for _ in range(5)]
        assert [r.status for r in replies] == [200, 200, 429, 429, 429]
        assert replies[-1].body == b"" and replies[-1].headers_have("retry-after", "")
        assert len(session_app.bodies) == 2
        # The budget is the same one requests spend: the next real call is limited too.
        assert (await raw_request(port, *post(bob, CALL))).status == 429
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await raw_request(port, *post(bob, initialized))).status == 200


async def _read_answers(reader: asyncio.StreamReader, count: int) -> list[tuple[int, bytes]]:
    """`count` HTTP/1.1 answers in order from one connection (each framed by Content-Length)."""
    answers = []
    async with asyncio.timeout(30):
        for _ in range(count):
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            answers.append((status, await reader.readexactly(length)))
    return answers


def _subject(authorization: str) -> str:
    payload = authorization.removeprefix("Bearer ").split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])


async def test_pipelined_requests_of_different_callers_on_one_connection_are_judged_one_by_one(
    session_app: SessionApp, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    """One keep-alive connection (as a shared ingress makes) carries Alice, then Bob with her session
    id, then nobody, then Alice again, written in one go: each is authenticated on its own, and the
    app's pooled connection never carries one caller's exchanged token on another's request."""
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    async with make_sidecar(session_app.port) as sidecar:
        port = port_of(sidecar.url)
        assert (await raw_request(port, *post(alice, INITIALIZE))).status == 200
        session_app.seen.clear()
        sid = b"Mcp-Session-Id: sess-0\r\n"
        nobody_head, nobody_body = post(alice, CALL, sid)
        nobody_head = nobody_head.replace(f"Authorization: Bearer {alice}\r\n".encode(), b"")
        pipeline = [
            post(alice, CALL, sid),
            post(bob, CALL, sid),
            (nobody_head, nobody_body),
            post(alice, CALL, sid),
        ]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"".join(head + body for head, body in pipeline))
            await writer.drain()
            answers = await _read_answers(reader, len(pipeline))
        finally:
            writer.close()
        assert [status for status, _ in answers] == [200, 404, 401, 200]
        forwarded = [dict((n.lower(), v) for n, v in headers) for headers in session_app.seen]
        assert len(forwarded) == 2
        assert [_subject(h["authorization"]) for h in forwarded] == ["alice", "alice"]


def _encoded_post(token: str, data: bytes, encoding: str) -> tuple[bytes, bytes]:
    head, _ = post(token, {})
    head = head.replace(b"Content-Length: 2\r\n", f"Content-Length: {len(data)}\r\n".encode())
    return head.replace(b"\r\n\r\n", f"\r\nContent-Encoding: {encoding}\r\n\r\n".encode()), data


async def test_a_compressed_body_reaches_the_app_decoded_and_a_broken_one_is_a_400(
    session_app: SessionApp, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    """aiohttp decodes a gzip/deflate body before the proxy reads it. The proxy forwarded the decoded
    bytes still labelled `Content-Encoding: gzip` (the app failed to decode them), and a body that did
    not decode raised out of the handler: a 500 of the sidecar's own and a traceback in its log."""
    bob = idp.mint("bob", audience=RESOURCE)
    async with make_sidecar(session_app.port) as sidecar:
        port = port_of(sidecar.url)
        for encoding, data in (
            ("gzip", gzip.compress(json.dumps(CALL).encode())),
            ("GZIP", gzip.compress(json.dumps(CALL).encode())),
            ("deflate", zlib.compress(json.dumps(CALL).encode())),
        ):
            reply = await raw_request(port, *_encoded_post(bob, data, encoding))
            assert reply.status == 200, reply
            assert session_app.bodies[-1] == CALL
            assert not any(n.lower() == "content-encoding" for n, _ in session_app.seen[-1])
        for broken in (b"not gzip at all", gzip.compress(b"")[:10] + b"\xff" * 40):
            reply = await raw_request(port, *_encoded_post(bob, broken, "gzip"))
            assert reply.status == 400, reply
            assert json.loads(reply.body)["error"]["code"] == -32600
        assert len(session_app.bodies) == 3
        # An encoding aiohttp does not decode leaves bytes that are not JSON: refused, never passed on.
        reply = await raw_request(port, *_encoded_post(bob, b"\x1f\x9d\x90opaque", "compress"))
        assert reply.status == 400 and json.loads(reply.body)["error"]["code"] == -32700
        assert len(session_app.bodies) == 3


class WsgiApp:
    """A real WSGI server (the standard library's): like PHP and every CGI-style server it files the
    `Mcp_Session_Id` header under the same name as `Mcp-Session-Id` (HTTP_MCP_SESSION_ID)."""

    def __init__(self) -> None:
        self.environs: list[dict[str, str]] = []
        self.numbers = itertools.count()
        self.server = wsgiref.simple_server.make_server("127.0.0.1", 0, self, handler_class=_QuietWsgiHandler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        self.environs.append({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        headers = [("Content-Type", "application/json")]
        if b'"initialize"' in body:
            headers.append(("Mcp-Session-Id", f"sess-{next(self.numbers)}"))
        start_response("200 OK", headers)
        return [json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode()]


class _QuietWsgiHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def wsgi_app() -> Iterator[WsgiApp]:
    app = WsgiApp()
    app.thread.start()
    yield app
    app.server.shutdown()
    app.server.server_close()


async def test_underscore_spellings_of_checked_headers_never_reach_a_cgi_style_app(
    wsgi_app: WsgiApp, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    """`Mcp_Session_Id`, `X_Forwarded_For` and the exchanged-token header spelt with `_` are other
    headers to the proxy but the same ones to a WSGI/PHP app: Bob reached Alice's session with
    `Mcp_Session_Id: sess-0`, and his own client address and downstream token went in ahead of the
    sidecar's. Headers with `_` in their names are dropped, as nginx and Apache do."""
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    async with make_sidecar(wsgi_app.port, token_header="X-Downstream-Token") as sidecar:
        port = port_of(sidecar.url)
        assert (await raw_request(port, *post(alice, INITIALIZE))).status == 200
        smuggled = (
            b"Mcp_Session_Id: sess-0\r\nX_Forwarded_For: 203.0.113.9\r\n"
            b"X_Downstream_Token: forged\r\nX_Custom: kept-out\r\n"
        )
        reply = await raw_request(port, *post(bob, CALL, smuggled))
        assert reply.status == 200  # no session named, as far as anyone can tell: the app decides
        environ = wsgi_app.environs[-1]
        assert "HTTP_MCP_SESSION_ID" not in environ
        assert "HTTP_X_CUSTOM" not in environ
        assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
        assert "forged" not in environ["HTTP_X_DOWNSTREAM_TOKEN"]
        # The dash spellings still work as before.
        reply = await raw_request(port, *post(alice, CALL, b"Mcp-Session-Id: sess-0\r\n"))
        assert reply.status == 200 and wsgi_app.environs[-1]["HTTP_MCP_SESSION_ID"] == "sess-0"


async def test_a_batch_of_thousands_of_calls_is_refused_before_anything_judges_it(
    session_app: SessionApp, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    """A 1 MB body of 10 000 `tools/call`s (a quarter of `max_body_bytes`) cost the policy gate seconds
    of Cedar on the event loop that every caller shares. Batches hold at most 100 messages."""
    bob = idp.mint("bob", audience=RESOURCE)
    raw = sidecar_config(idp, workload_api, session_app.port)
    raw["policy"] = {"file": None, "cedar": ECHO_ONLY}
    calls = [{**CALL, "id": i} for i in range(10_000)]
    async with run_sidecar(raw) as sidecar:
        port = port_of(sidecar.url)
        reply = await raw_request(port, *post(bob, calls))
        assert reply.status == 400
        error = json.loads(reply.body)["error"]
        assert error["code"] == -32600 and "at most 100" in error["message"]
        assert session_app.bodies == []
        assert (await raw_request(port, *post(bob, calls[:100]))).status == 200
        assert len(session_app.bodies) == 1 and len(session_app.bodies[0]) == 100
