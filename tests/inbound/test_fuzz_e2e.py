"""Hostile and malformed requests against the running proxy over raw sockets (hypothesis-driven).

Whatever arrives, the proxy answers without a 5xx of its own (502/504 only for a real upstream
failure), never echoes a token or a stack trace, never lets caller credentials or forwarding
headers reach the app, and stays healthy for the next caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outrider.sidecar import admin
from outrider.sidecar.config import parse
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.runtime import Runtime

from .conftest import (
    RESOURCE,
    RecordingObserver,
    SidecarFactory,
    free_port,
    run_sidecar,
    serve_everything,
    sidecar_config,
)

pytestmark = pytest.mark.timeout(600)


@dataclass
class EchoApp:
    """The app: answers every method and path with 200 JSON, remembering what reached it."""

    port: int = field(default_factory=free_port)
    seen: list[list[tuple[str, str]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(list(request.headers.items()))
        await request.read()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})


@pytest.fixture
async def echo_app() -> AsyncIterator[EchoApp]:
    app_state = EchoApp()
    async with serve_everything(app_state.handle, app_state.port):
        yield app_state


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def headers_have(self, name: str, prefix: str) -> bool:
        return any(n == name and v.startswith(prefix) for n, v in self.headers)


async def raw_request(port: int, head: bytes, body: bytes, *, head_only: bool = False) -> Reply:
    """Send bytes as-is on a fresh connection and read the first answer (the proxy may then close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(30):
            status = 100
            while status == 100:  # an interim 100 Continue comes before the answer
                status_line = await reader.readline()
                assert status_line.startswith(b"HTTP/1."), status_line
                status = int(status_line.split()[1])
                headers: list[tuple[str, str]] = []
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers.append((name.strip().lower(), value.strip()))
            lookup = dict(headers)
            if head_only:
                data = b""
            elif "content-length" in lookup:
                data = await reader.readexactly(int(lookup["content-length"]))
            elif lookup.get("transfer-encoding") == "chunked":
                data = b""
                while size := int((await reader.readline()).strip() or b"0", 16):
                    data += await reader.readexactly(size)
                    await reader.readline()
            else:
                data = await reader.read(1 << 20)
        return Reply(status, headers, data)
    finally:
        writer.close()
        with __import__("contextlib").suppress(OSError):
            await writer.wait_closed()


# -- strategies -------------------------------------------------------------------------------

GOOD = "<good>"  # replaced by a fresh valid token at send time
JSON_IDS = st.one_of(
    st.integers(),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.just([1]),
    st.just({}),
)
ODD_VALUES = st.one_of(
    st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=3), st.just({})
)


@st.composite
def jsonrpc_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "wrong_types",
                "empty_batch",
                "batch",
                "huge_batch",
                "nested",
                "bad_utf8",
                "junk",
                "none",
            ]
        )
    )
    if kind == "none":
        return b""
    if kind == "valid":
        name = draw(st.sampled_from(["echo", "whoami", "", "é名"]))
        return json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": {}}}
        ).encode()
    if kind == "wrong_types":
        message: dict[str, object] = {"jsonrpc": draw(st.sampled_from(["2.0", "1.0", 2]))}
        if draw(st.booleans()):
            message["id"] = draw(JSON_IDS)
        message["method"] = draw(st.one_of(st.sampled_from(["tools/call", "initialize", ""]), ODD_VALUES))
        if draw(st.booleans()):
            message["params"] = draw(
                st.one_of(ODD_VALUES, st.just({"name": 5, "arguments": "x", "_meta": []}))
            )
        return json.dumps(message).encode()
    if kind == "empty_batch":
        return b"[]"
    if kind == "batch":
        return json.dumps(
            [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(draw(st.integers(1, 20)))]
        ).encode()
    if kind == "huge_batch":
        return json.dumps(
            [{"jsonrpc": "2.0", "id": i, "method": "tools/list"} for i in range(20000)]
        ).encode()
    if kind == "nested":
        depth = draw(st.sampled_from([100, 5000, 200000]))
        return b"[" * depth + b"]" * depth
    if kind == "bad_utf8":
        return b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xff\xfe\xc3"}}'
    return draw(st.binary(max_size=200))


AUTH_VALUES = st.sampled_from(
    [
        [],
        [f"Bearer {GOOD}"],
        [f"Bearer {GOOD}", f"Bearer {GOOD}"],
        [f"Bearer {GOOD}", "Bearer garbage"],
        ["Bearer"],
        ["Bearer   "],
        ["Basic YWxpY2U6c2VjcmV0"],
        [f"Bearer {GOOD} extra"],
        [f"bearer {GOOD}"],
        ["Bearer " + "A" * 7000],
        ["Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."],
        ["Bearer \xff\xfe"],
        [f"Bearer {GOOD}\x01"],
    ]
)
HEADER_NAMES = st.sampled_from(
    [
        "Mcp-Session-Id",
        "MCP-Protocol-Version",
        "Mcp-Method",
        "Mcp-Name",
        "Content-Type",
        "Accept",
        "Last-Event-ID",
        "traceparent",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "Forwarded",
        "X-Real-IP",
        "X-Downstream-Token",
        "Origin",
        "Cookie",
        "Expect",
        "Connection",
        # Framing conflicts (request smuggling): a second Host, Content-Length or Transfer-Encoding.
        "Host",
        "Content-Length",
        "Transfer-Encoding",
    ]
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            "2026-07-28",
            "2025-11-25",
            "tools/call",
            "tools/list",
            "echo",
            "=?base64?ZWNobw==?=",
            "=?base64?!!?=",
            "application/json",
            "text/plain",
            "multipart/form-data; boundary=x",
            "for=1.2.3.4;proto=https",
            "1.2.3.4",
            "evil.example",
            "https",
            "100-continue",
            "X-Forwarded-For",
            "keep-alive, Mcp-Session-Id",
            "chunked",
            "gzip, chunked",
            "0",
            "5",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.text(st.characters(min_codepoint=0xA0, max_codepoint=0xFF), min_size=1, max_size=10),
    st.just("x" * 9000).filter(lambda _: True),
)
METHODS = st.sampled_from(
    ["GET", "POST", "POST", "POST", "DELETE", "PUT", "OPTIONS", "HEAD", "CONNECT", "TRACE", "FOO"]
)
PATHS = st.sampled_from(
    [
        "/mcp",
        "/",
        "/sse",
        "/messages/?session_id=abc",
        "//x",
        "/mcp?x=%zz",
        "http://evil.example/mcp",
        "/.well-known/oauth-protected-resource",
        "/%2e%2e/admin",
        "*",
        "/mcp#frag",
        "/%00",
        "127.0.0.1:80",
    ]
)


@dataclass(frozen=True)
class Hostile:
    method: str
    path: str
    auth: list[str]
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool


HOSTILE = st.builds(
    Hostile,
    method=METHODS,
    path=PATHS,
    auth=AUTH_VALUES,
    headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6),
    body=jsonrpc_bodies(),
    chunked=st.booleans(),
)


def encode(case: Hostile, token: str, port: int) -> tuple[bytes, bytes]:
    lines = [f"{case.method} {case.path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"Authorization: {value.replace(GOOD, token)}" for value in case.auth]
    lines += [f"{name}: {value}" for name, value in case.headers if name != "Connection"]
    body = case.body
    if case.chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = b"".join(
            f"{len(body[i : i + 700]):x}\r\n".encode() + body[i : i + 700] + b"\r\n"
            for i in range(0, len(body), 700)
        )
        body = framed + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return head, body


FORBIDDEN_TO_APP = ("forwarded", "x-real-ip", "x-forwarded-host", "expect")


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    derandomize=True,
)
@given(case=HOSTILE)
async def test_hostile_requests_never_break_the_proxy(
    case: Hostile,
    echo_app: EchoApp,
    shared_sidecar: SharedSidecar,
    idp: DevIdP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sidecar = await shared_sidecar.get(echo_app.port, token_header="X-Downstream-Token")
    token = idp.mint("alice", audience=RESOURCE)
    head, body = encode(case, token, sidecar.port)
    seen_before = len(echo_app.seen)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        reply = await raw_request(sidecar.port, head, body, head_only=case.method == "HEAD")
    # 1. No 5xx of the proxy's own: the app is up and answers 200, so 502/504 cannot happen either.
    assert reply.status < 500, (reply.status, reply.body[:300])
    # 2. Nothing secret or internal in the answer or the logs.
    text = reply.body.decode("latin-1") + "".join(v for _, v in reply.headers)
    if (
        case.method != "HEAD"
        and reply.status == 400
        and not reply.headers_have("content-type", "application/json")
    ):
        assert reply.body == b"400 Bad Request"  # aiohttp could not parse it: nothing quoted back
    for leak in (token, token[:40], "Traceback", 'File "'):
        assert leak not in text, leak
        assert leak not in caplog.text, leak
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # 3. Whatever reached the app: no caller token, no caller-made forwarding facts.
    for headers in echo_app.seen[seen_before:]:
        names = [name.lower() for name, _ in headers]
        values = " ".join(value for _, value in headers)
        assert token not in values
        assert not any(name in FORBIDDEN_TO_APP for name in names), headers
        assert names.count("x-forwarded-for") <= 1 and names.count("authorization") == 0
        # The exchanged-token header holds the sidecar's token only, never a caller-sent value.
        assert names.count("x-downstream-token") <= 1
        sent = {value for name, value in case.headers if name == "X-Downstream-Token"}
        assert not sent & {v for n, v in headers if n.lower() == "x-downstream-token"}
        assert dict((n.lower(), v) for n, v in headers).get("x-forwarded-for") in (None, "127.0.0.1")
    # 4. Refused requests never reached the app; unauthenticated ones never do.
    authenticated = case.auth in ([f"Bearer {GOOD}"], [f"bearer {GOOD}"])
    public = case.path.startswith("/.well-known/")
    if not authenticated and not public and case.method not in ("CONNECT", "TRACE", "FOO"):
        assert len(echo_app.seen) == seen_before
        if reply.status != 400:  # a request aiohttp could not parse never reaches the handler
            assert reply.status in (401, 404, 405), reply.status


class SharedSidecar:
    """One sidecar for all hypothesis examples of a test (starting one per example is too slow)."""

    def __init__(self, make_sidecar: SidecarFactory) -> None:
        self._make = make_sidecar
        self._stack: object | None = None
        self.port = 0
        self._cm: object | None = None

    async def get(self, mcp_port: int, **inbound: object) -> SharedSidecar:
        if self._cm is None:
            cm = self._make(mcp_port, observer=RecordingObserver(), **inbound)
            sidecar = await cm.__aenter__()
            self._cm = cm
            self.port = int(sidecar.url.rsplit(":", 1)[1])
        return self

    async def close(self) -> None:
        if self._cm is not None:
            await self._cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


@pytest.fixture
async def shared_sidecar(make_sidecar: SidecarFactory) -> AsyncIterator[SharedSidecar]:
    shared = SharedSidecar(make_sidecar)
    yield shared
    await shared.close()


# -- the specific guarantees, one by one -------------------------------------------------------


async def test_unauthenticated_callers_cost_nothing(
    echo_app: EchoApp, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    """A 1 GB body from nobody is refused with 401 at once (not 413 after reading it), and a caller
    asking `Expect: 100-continue` is never invited to send its body."""
    async with make_sidecar(echo_app.port, max_body_bytes=4096) as sidecar:
        port = int(sidecar.url.rsplit(":", 1)[1])
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n"
        ).encode()
        reply = await raw_request(port, head, b'{"jsonrpc":')
        assert reply.status == 401
        assert "WWW-Authenticate" in {n.title() for n, _ in reply.headers} or any(
            n == "www-authenticate" for n, _ in reply.headers
        )
        expect = "POST /mcp HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(expect.encode())
        await writer.drain()
        first = await asyncio.wait_for(reader.readline(), 30)
        assert first.startswith(b"HTTP/1.1 401"), first  # no "100 Continue" before it
        writer.close()
        # An authenticated one still gets 413 for the same oversized body, and 100 Continue first.
        token = idp.mint("alice", audience=RESOURCE)
        reply = await raw_request(
            port,
            (
                f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Expect: 100-continue\r\nContent-Length: 8000\r\nConnection: close\r\n\r\n"
            ).encode(),
            b"x" * 8000,
        )
        assert reply.status == 413
    assert echo_app.seen == []


async def test_forwarding_headers_are_the_sidecars_own(
    echo_app: EchoApp, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    smuggled = {
        "X-Forwarded-For": "10.9.9.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "admin.internal",
        "X-Forwarded-User": "root",
        "Forwarded": "for=10.9.9.9;proto=https",
        "X-Real-IP": "10.9.9.9",
        "X-Downstream-Token": "caller-made-token",
        "Expect": "100-continue",
    }
    async with make_sidecar(echo_app.port, token_header="X-Downstream-Token") as sidecar:
        port = int(sidecar.url.rsplit(":", 1)[1])
        extra = "".join(f"{k}: {v}\r\n" for k, v in smuggled.items())
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        reply = await raw_request(port, head, body)
        assert reply.status == 200
    (seen,) = echo_app.seen
    names = [n.lower() for n, _ in seen]
    values = dict((n.lower(), v) for n, v in seen)
    assert values["x-forwarded-for"] == "127.0.0.1" and values["x-forwarded-proto"] == "http"
    for name in ("x-forwarded-host", "x-forwarded-user", "forwarded", "x-real-ip", "authorization", "expect"):
        assert name not in names
    assert names.count("x-downstream-token") == 1
    assert values["x-downstream-token"] not in ("caller-made-token", token)


async def test_deeply_nested_json_and_odd_messages_are_400_not_500(
    echo_app: EchoApp, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    async with make_sidecar(echo_app.port) as sidecar:
        port = int(sidecar.url.rsplit(":", 1)[1])
        for body in (b"[" * 200000 + b"]" * 200000, b"[]", b'{"jsonrpc":"2.0","id":1,"method":"x"'):
            head = (
                f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            reply = await raw_request(port, head, body)
            assert reply.status == 400, body[:20]
            assert json.loads(reply.body)["error"]["code"] in (-32700, -32600)
        # Still healthy afterwards.
        ok = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(ok)}\r\nConnection: close\r\n\r\n"
        ).encode()
        assert (await raw_request(port, head, ok)).status == 200
    assert len(echo_app.seen) == 1


async def test_without_token_exchange_the_app_gets_no_authorization(
    echo_app: EchoApp, idp: DevIdP, workload_api: DevWorkloadApi, caplog: pytest.LogCaptureFixture
) -> None:
    """No `exchange.token_endpoint`: callers are still authenticated, the app receives no token at all
    (never the caller's), and the start-up log says so once."""
    raw = sidecar_config(idp, workload_api, echo_app.port)
    del raw["exchange"]
    token = idp.mint("alice", audience=RESOURCE)
    with caplog.at_level(logging.INFO):
        async with run_sidecar(raw) as sidecar, aiohttp.ClientSession() as session:
            for auth in (f"Bearer {token}", None):
                headers = {"Authorization": auth} if auth else {}
                async with session.post(
                    sidecar.mcp_url(),
                    json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                    headers=headers,
                ) as response:
                    assert response.status == (200 if auth else 401)
    (seen,) = echo_app.seen
    assert "authorization" not in [n.lower() for n, _ in seen]
    assert token not in caplog.text
    notes = [r for r in caplog.records if "token exchange is not configured" in r.getMessage()]
    assert len(notes) == 1 and "no Authorization" in notes[0].getMessage()


async def test_unparseable_http_is_a_bare_400_that_quotes_nothing(
    echo_app: EchoApp, make_sidecar: SidecarFactory, idp: DevIdP, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own 400 text quotes the offending request line; the sidecar's must not (it may hold
    the caller's token), nor may its log."""
    token = idp.mint("alice", audience=RESOURCE)
    async with make_sidecar(echo_app.port) as sidecar:
        port = int(sidecar.url.rsplit(":", 1)[1])
        broken = [
            f"GET /mcp HTTP/1.1\r\nAuthorization: Bearer {token}\x01\r\n\r\n".encode(),
            f"GET /mcp HTTP/1.1\r\nAuthorization: Bearer {token}{'A' * 9000}\r\n\r\n".encode(),
            f"GET /mcp?{token}\x01 HTTP/1.1\r\n\r\n".encode(),
        ]
        with caplog.at_level(logging.DEBUG):
            for raw in broken:
                reply = await raw_request(port, raw, b"")
                assert reply.status == 400
                assert reply.body == b"400 Bad Request", reply.body
        async with aiohttp.ClientSession() as session, session.get(sidecar.mcp_url()) as r:
            assert r.status == 401  # still serving
        metrics = sidecar.proxy.metrics_text().decode()
    assert token[:40] not in caplog.text
    assert "outrider_inbound_malformed_total 3" in metrics


class SharedAdmin:
    """The admin server (15020 role) for all hypothesis examples of a test."""

    def __init__(self) -> None:
        self.port = free_port()
        self.runtime = Runtime(config=parse({"admin": {"host": "127.0.0.1", "port": self.port}}))
        self.runtime.readiness["inbound"] = lambda: (True, "ok")
        self._cm: Any = None

    async def start(self) -> SharedAdmin:
        if self._cm is None:
            self._cm = admin.component(self.runtime)
            await self._cm.__aenter__()
        return self

    async def close(self) -> None:
        if self._cm is not None:
            await self._cm.__aexit__(None, None, None)


@pytest.fixture
async def shared_admin() -> AsyncIterator[SharedAdmin]:
    shared = SharedAdmin()
    yield shared
    await shared.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    derandomize=True,
)
@given(
    case=HOSTILE,
    admin_path=st.sampled_from(
        ["/healthz", "/readyz", "/metrics", "/app-health/x/livez", "/app-health/%ff%fe/livez", "/nope"]
    ),
)
async def test_hostile_requests_never_break_the_admin_server(
    case: Hostile, admin_path: str, shared_admin: SharedAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    server = await shared_admin.start()
    path = admin_path if case.path == "/mcp" else case.path
    head, body = encode(
        Hostile(case.method, path, case.auth, case.headers, case.body, case.chunked), "t0ken", server.port
    )
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        reply = await raw_request(server.port, head, body, head_only=case.method == "HEAD")
    assert reply.status < 500 or (reply.status == 503 and path.startswith("/app-health/")), reply
    assert "Traceback" not in caplog.text and "t0ken" not in reply.body.decode("latin-1")
    assert "\udcff" not in reply.body.decode("latin-1", "replace")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    healthy = await raw_request(
        server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b""
    )
    assert (healthy.status, healthy.body) == (200, b"ok\n")
