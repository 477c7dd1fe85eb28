"""MCP sessions belong to the principal that opened them: the real `mcp` SDK client and server behind
the sidecar, two users, a stolen session id for POST, GET stream and DELETE (streamable HTTP and the
2024-11-05 SSE transport), sidecar restarts and two replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.streamable_http import EventMessage, EventStore
from mcp.types import TextContent

from outrider.sidecar.config import ConfigError, parse
from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.inbound.config import InboundConfig, SessionsConfig
from outrider.sidecar.inbound.sessions import SessionTable, decide, legacy_endpoint_session, owner_key
from outrider.sidecar.main import serve
from outrider.sidecar.telemetry.observer import Principal

from .conftest import RESOURCE, RecordingObserver, SidecarFactory, free_port, run_sidecar, sidecar_config

CALL = {
    "jsonrpc": "2.0",
    "id": 9,
    "method": "tools/call",
    "params": {"name": "echo", "arguments": {"text": "x"}},
}
JSON_SSE = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class SessionSpy:
    """An httpx response hook that remembers the `Mcp-Session-Id` the server handed out."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, response: httpx2.Response) -> None:
        sid = response.headers.get("mcp-session-id")
        if sid and sid not in self.ids:
            self.ids.append(sid)


def sdk_client(url: str, token: str, spy: SessionSpy, *, terminate: bool = True) -> Client:
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx2.Timeout(30, read=300),
        event_hooks={"response": [spy]},
    )
    return Client(streamable_http_client(url, http_client=http, terminate_on_close=terminate), mode="legacy")


async def raw(
    method: str, url: str, token: str, sid: str | None, body: Any = None, **headers: str
) -> tuple[int, str, str]:
    """One request as an attacker sends it: status, content type, the first bytes of the body."""
    sent = (
        dict(JSON_SSE) | headers | {"Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2025-06-18"}
    )
    if sid is not None:
        sent["Mcp-Session-Id"] = sid
    async with (
        httpx2.AsyncClient(timeout=10) as http,
        http.stream(method, url, headers=sent, content=json.dumps(body).encode() if body else None) as resp,
    ):
        text = ""
        async for chunk in resp.aiter_text():
            text += chunk
            if resp.headers.get("content-type", "").startswith("text/event-stream") or len(text) > 4096:
                break
        return resp.status_code, resp.headers.get("content-type", ""), text


async def test_a_stolen_session_id_is_404_for_post_get_and_delete(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    observer = RecordingObserver()
    spy = SessionSpy()
    async with make_sidecar(mcp_app.port, observer=observer) as sidecar:
        url = sidecar.mcp_url()
        async with sdk_client(url, alice, spy) as client:
            echoed = await client.call_tool("echo", {"text": "mine"})
            assert isinstance(echoed.content[0], TextContent) and echoed.content[0].text == "mine"
            (sid,) = spy.ids
            unknown = await raw("POST", url, bob, "0" * len(sid), CALL)
            assert unknown[0] == 404
            # Bob holds a valid token of his own and Alice's session id: every way in looks unknown.
            for method, body in (("POST", CALL), ("GET", None), ("DELETE", None)):
                assert await raw(method, url, bob, sid, body) == unknown, method
            # Alice's session survived Bob's DELETE, and a fresh token of hers (same iss/sub) still fits.
            echoed = await client.call_tool("echo", {"text": "still mine"})
            assert isinstance(echoed.content[0], TextContent) and echoed.content[0].text == "still mine"
            status, _, _ = await raw("POST", url, idp.mint("alice", audience=RESOURCE), sid, CALL)
            assert status == 200
            assert len(sidecar.proxy.sessions or ()) == 1
        # Leaving the client DELETEs the session: its binding goes with it.
        assert len(sidecar.proxy.sessions or ()) == 0
        assert (await raw("POST", url, alice, sid, CALL))[0] == 404
        metrics = sidecar.proxy.metrics_text().decode()
        assert "outrider_inbound_session_refusals_total 5" in metrics
    refused = [c for c in observer.calls if c.finished and c.outcome.get("error_type") == "session_not_owned"]
    assert len(refused) == 5
    assert {c.principal.subject for c in refused} == {"bob", "alice"}
    assert all(c.outcome["outcome"] == "denied" and c.outcome["http_status"] == 404 for c in refused)
    assert {c.request.http_method for c in refused} == {"POST", "GET", "DELETE"}


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_json_answers_bind_too_and_ids_in_query_and_header_must_all_be_owned(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    spy_a, spy_b = SessionSpy(), SessionSpy()
    async with make_sidecar(mcp_app.port) as sidecar:
        url = sidecar.mcp_url()
        async with sdk_client(url, alice, spy_a) as a, sdk_client(url, bob, spy_b) as b:
            await a.list_tools()
            await b.list_tools()
            (sid_a,), (sid_b,) = spy_a.ids, spy_b.ids
            assert (await raw("POST", url, bob, sid_a, CALL))[0] == 404
            # Bob's own header plus Alice's id as a legacy query parameter: refused as well.
            assert (await raw("POST", url + "?session_id=" + sid_a, bob, sid_b, CALL))[0] == 404
            assert (await raw("POST", url, bob, sid_b, CALL))[0] == 200


@pytest.mark.parametrize("mcp_app", ["sse"], indirect=True)
async def test_the_legacy_sse_session_id_is_bound_to_the_stream_opener(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    created: list[str] = []
    async with make_sidecar(mcp_app.port) as sidecar:
        transport = sse_client(
            sidecar.mcp_url("/sse"),
            headers={"Authorization": f"Bearer {alice}"},
            on_session_created=created.append,
        )
        async with Client(transport, mode="legacy") as client:
            await client.list_tools()
            (sid,) = created
            post = sidecar.url + f"/messages/?session_id={sid}"
            status, content_type, text = await raw("POST", post, bob, None, CALL)
            assert (status, text) == (404, "Could not find session")
            assert content_type.startswith("text/plain")
            # Alice's own POST on her session is still accepted (202: the answer comes on her stream).
            assert (await raw("POST", post, alice, None, CALL))[0] == 202
            echoed = await client.call_tool("echo", {"text": "legacy"})
            assert isinstance(echoed.content[0], TextContent) and echoed.content[0].text == "legacy"
        # The stream closed: the legacy session and its binding end together.
        for _ in range(200):
            if not len(sidecar.proxy.sessions or ()):
                break
            await asyncio.sleep(0.02)
        assert len(sidecar.proxy.sessions or ()) == 0


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_an_undecodable_session_id_is_404_and_logged_only_by_its_fingerprint(
    mcp_app: mcp_server.RunningServer,
    make_sidecar: SidecarFactory,
    idp: DevIdP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Raw bytes that are not UTF-8 in `Mcp-Session-Id` (a client cannot send them, an attacker can):
    the refusal is the ordinary 404, and the log names the id by a short fingerprint, never the id."""
    bob = idp.mint("bob", audience=RESOURCE)
    body = json.dumps(CALL).encode()
    async with make_sidecar(mcp_app.port) as sidecar:
        url = urlsplit(sidecar.mcp_url())
        assert url.hostname is not None and url.port is not None
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-06-18\r\n"
            + f"Authorization: Bearer {bob}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Mcp-Session-Id: stolen-\xff\xfe-id\r\nConnection: close\r\n\r\n"
            + body
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        plain = "stolen-abc"  # an ordinary id names its session by the same kind of fingerprint
        assert (await raw("POST", sidecar.mcp_url(), bob, plain, CALL))[0] == 404
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
    lines = [r.getMessage() for r in caplog.records if "did not create" in r.getMessage()]
    assert len(lines) == 2, lines
    assert all("stolen" not in line for line in lines)
    digest = hashlib.sha256(plain.encode()).hexdigest()[:12]
    assert re.fullmatch(r".*\(session [0-9a-f]{12}\)", lines[0]) and lines[1].endswith(f"(session {digest})")


async def test_after_a_sidecar_restart_old_sessions_are_404_and_clients_start_again(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    """docs/inbound.md: bindings are in memory; a restarted sidecar fails closed on every old id."""
    alice = idp.mint("alice", audience=RESOURCE)
    raw_config = sidecar_config(idp, workload_api, mcp_app.port)
    spy = SessionSpy()
    # The client leaves without DELETE: the app keeps the session across the sidecar's restart.
    async with (
        run_sidecar(raw_config) as first,
        sdk_client(first.mcp_url(), alice, spy, terminate=False) as client,
    ):
        await client.list_tools()
        client_sid = spy.ids[0]
        assert (await raw("POST", first.mcp_url(), alice, client_sid, CALL))[0] == 200
    # Same app process (it still holds the session), new sidecar on the same port.
    spy2 = SessionSpy()
    direct = await raw("POST", mcp_app.url, alice, client_sid, CALL)
    assert direct[0] == 200, "the app should still hold the session"
    async with run_sidecar(raw_config) as second:
        assert (await raw("POST", second.mcp_url(), alice, client_sid, CALL))[0] == 404
        async with sdk_client(second.mcp_url(), alice, spy2) as client:
            echoed = await client.call_tool("echo", {"text": "again"})
            assert isinstance(echoed.content[0], TextContent) and echoed.content[0].text == "again"
        assert spy2.ids and spy2.ids[0] != client_sid


async def test_two_replicas_a_session_only_lives_on_the_replica_that_made_it(
    idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    """docs/inbound.md: with replicas, route a session to one pod (sticky): the MCP server's own session
    state is per pod, so a shared binding store would not make another replica serve it."""
    alice = idp.mint("alice", audience=RESOURCE)
    async with (
        mcp_server.running(0, "streamable") as app_a,
        mcp_server.running(0, "streamable") as app_b,
        run_sidecar(sidecar_config(idp, workload_api, app_a.port)) as replica_a,
        run_sidecar(sidecar_config(idp, workload_api, app_b.port)) as replica_b,
    ):
        spy = SessionSpy()
        async with sdk_client(replica_a.mcp_url(), alice, spy) as client:
            await client.list_tools()
            (sid,) = spy.ids
            assert (await raw("POST", replica_a.mcp_url(), alice, sid, CALL))[0] == 200
            # The owner herself, on the other replica: 404 from the sidecar, and the app there agrees.
            assert (await raw("POST", replica_b.mcp_url(), alice, sid, CALL))[0] == 404
            b_app = await raw("POST", app_b.url, alice, sid, CALL)
            assert b_app[0] == 404 and "Session not found" in b_app[2]


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_bindings_are_bounded_least_recently_used_first(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    alice = idp.mint("alice", audience=RESOURCE)
    async with make_sidecar(mcp_app.port, sessions={"max_sessions": 2}) as sidecar:
        url = sidecar.mcp_url()
        spies = [SessionSpy() for _ in range(3)]
        for spy in spies:
            async with sdk_client(url, alice, spy) as client:
                await client.list_tools()
        # Every client DELETEd its session on exit: nothing is held.
        assert len(sidecar.proxy.sessions or ()) == 0
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        sids = []
        headers = dict(JSON_SSE) | {"Authorization": f"Bearer {alice}"}
        async with httpx2.AsyncClient(timeout=10) as http:
            for _ in range(3):
                response = await http.post(url, headers=headers, content=json.dumps(init).encode())
                sids.append(response.headers["mcp-session-id"])
        assert len(sidecar.proxy.sessions or ()) == 2
        assert (await raw("POST", url, alice, sids[0], CALL))[0] == 404  # evicted: fail closed
        metrics = sidecar.proxy.metrics_text().decode()
        assert "outrider_inbound_sessions_evicted_total 1\n" in metrics
        assert "outrider_inbound_sessions_expired_total 0\n" in metrics
        assert (await raw("POST", url, alice, sids[2], CALL))[0] == 200


# -- the pure parts ------------------------------------------------------------------------------------


def test_owner_is_issuer_and_subject_or_the_spiffe_id() -> None:
    a = Principal(kind="oidc", subject="alice", issuer="https://idp-1", client_id="app-1")
    assert owner_key(a) == owner_key(
        Principal(kind="oidc", subject="alice", issuer="https://idp-1", client_id="x")
    )
    assert owner_key(a) != owner_key(Principal(kind="oidc", subject="alice", issuer="https://idp-2"))
    assert owner_key(a) != owner_key(Principal(kind="spiffe", subject="alice"))
    # No separator games: issuer "a" + subject "b|c" never equals issuer "a|b" + subject "c".
    assert owner_key(Principal(kind="oidc", subject="b|c", issuer="a")) != owner_key(
        Principal(kind="oidc", subject="c", issuer="a|b")
    )
    assert decide(None, "x") == "unbound" and decide("x", "x") == "owner" and decide("y", "x") == "foreign"


def test_table_expires_idle_bindings_and_evicts_the_least_recently_used() -> None:
    now = [0.0]
    table = SessionTable(SessionsConfig(max_sessions=2, idle_timeout_s=10), clock=lambda: now[0])
    assert table.bind("s1", "alice") and table.bind("s2", "bob")
    now[0] = 5
    assert table.owner("s1") == "alice"  # s1 used: s2 is now the least recently used
    assert table.bind("s3", "carol")
    assert table.owner("s2") is None and table.evicted_total == 1
    assert not table.bind("s1", "mallory") and table.owner("s1") == "alice"  # no rebinding
    now[0] = 16
    assert table.owner("s1") is None and table.expired_total == 1
    assert not table.bind("bad id", "x") and not table.bind("", "x") and not table.bind("é", "x")
    assert not table.bind("x" * 513, "x")
    table.forget("s3")
    table.forget("s3")  # forgetting twice (a DELETE and the app's 404 for it) is fine
    assert len(table) == 0


def test_session_ids_are_one_to_512_visible_ascii_characters() -> None:
    table = SessionTable(SessionsConfig(max_sessions=100))
    for good in ("!", "~", "a", "x" * 512, "".join(chr(c) for c in range(0x21, 0x7F))):
        assert table.bind(good, "alice"), good
    for bad in ("", " ", "a b", "\x7f", "\x7fabc", "abc\x20", "\x80", "x" * 513, "\t"):
        assert not table.bind(bad, "alice"), bad


def test_idle_bindings_live_exactly_idle_timeout_and_every_expiry_is_counted() -> None:
    now = [0.0]
    table = SessionTable(SessionsConfig(max_sessions=10, idle_timeout_s=10), clock=lambda: now[0])
    assert table.bind("a", "alice") and table.bind("b", "bob") and table.bind("c", "carol")
    now[0] = 10.0
    assert table.owner("a") == "alice"  # idle exactly the timeout: still alive (and used again now)
    now[0] = 20.5
    assert table.owner("b") is None and table.owner("c") is None  # idle 20.5 s: gone
    assert table.expired_total == 2
    now[0] = 20.0 + 10.0  # "a" was used at 10.0: idle 20 s when the next bind prunes it
    assert table.bind("d", "dave")
    assert table.expired_total == 3 and len(table) == 1
    now[0] = 40.0
    assert table.bind("e", "erin") and len(table) == 2  # "d" idle exactly 10 s: kept by the prune too
    assert table.evicted_total == 0


def test_legacy_endpoint_session_reads_one_session_id() -> None:
    assert legacy_endpoint_session("/messages/?session_id=abc") == "abc"
    # An empty second value still makes the announcement ambiguous: nothing is bound.
    assert legacy_endpoint_session("/messages/?session_id=&session_id=abc") is None
    assert legacy_endpoint_session("http://127.0.0.1:1/messages/?session_id=abc&x=1") == "abc"
    assert legacy_endpoint_session("/messages/?session_id=a&session_id=b") is None
    assert legacy_endpoint_session("/messages/") is None


def test_sessions_config_is_checked() -> None:
    assert InboundConfig.from_mapping({"sessions": {"max_sessions": 5}}).sessions.max_sessions == 5
    assert InboundConfig.from_mapping({}).sessions == SessionsConfig()
    for bad in (
        {"max_sessions": 0},
        {"max_sessions": "many"},
        {"idle_timeout_s": -1},
        {"enabled": "yes"},
        {"x": 1},
    ):
        with pytest.raises(ConfigError, match=r"inbound\.sessions"):
            parse({"inbound": {"sessions": bad}})


async def test_the_whole_sidecar_process_audits_a_stolen_session(
    mcp_app: mcp_server.RunningServer,
    idp: DevIdP,
    workload_api: DevWorkloadApi,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`outrider sidecar` with the real telemetry observer: the refusal is an audit line naming Bob."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    audit = tmp_path / "audit.jsonl"
    raw_config = sidecar_config(idp, workload_api, mcp_app.port)
    admin_port = free_port()
    raw_config["admin"] = {"host": "127.0.0.1", "port": admin_port}
    raw_config["egress"] = {"mode": "explicit", "port": free_port(), "policy_file": None}
    raw_config["telemetry"] = {"audit": str(audit)}
    config = parse(raw_config)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    url = f"http://127.0.0.1:{config.inbound.port}/mcp"
    try:
        async with httpx2.AsyncClient(timeout=5) as http:
            for _ in range(500):
                with contextlib.suppress(httpx2.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{admin_port}/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.02)
        spy = SessionSpy()
        async with sdk_client(url, alice, spy) as client:
            await client.list_tools()
            (sid,) = spy.ids
            assert (await raw("POST", url, bob, sid, CALL))[0] == 404
            assert (await raw("GET", url, bob, sid))[0] == 404
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    text = audit.read_text()
    assert alice not in text and bob not in text
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    refused = [e for e in events if e.get("mcp", {}).get("error_type") == "session_not_owned"]
    assert len(refused) == 2, events
    for event in refused:
        assert event["type"] == "mcp.call" and event["outcome"] == "denied"
        assert event["user"]["sub"] == "bob" and event["mcp"]["http_status"] == 404
        assert event["mcp"]["session_id"] == sid
    assert refused[0]["mcp"]["tool"] == "echo"


def test_many_sessions_never_grow_the_table_past_its_cap() -> None:
    now = [0.0]
    table = SessionTable(SessionsConfig(max_sessions=1000, idle_timeout_s=60), clock=lambda: now[0])
    for i in range(50_000):
        now[0] = i * 0.01
        table.bind(f"session-{i}", f"user-{i % 7}")
        assert len(table) <= 1000
    # The most recent ones are kept, the oldest went first; nothing idle longer than 60 s survives.
    assert table.owner("session-49999") == "user-" + str(49999 % 7)
    assert table.owner("session-0") is None
    assert table.evicted_total + table.expired_total == 49_000


def test_one_caller_opening_sessions_without_end_only_evicts_their_own() -> None:
    """A full table evicted the least recently used binding whoever held it: one caller with a valid
    token opening `max_sessions` sessions logged every other caller out of theirs (404). Now the
    caller holding the most bindings loses their own least recently used one first."""
    now = [0.0]
    table = SessionTable(SessionsConfig(max_sessions=100, idle_timeout_s=86400), clock=lambda: now[0])
    for user in ("alice", "bob", "carol"):
        now[0] += 1
        assert table.bind(f"{user}-1", user)
    for i in range(10_000):
        now[0] += 1
        assert table.bind(f"mallory-{i}", "mallory")
        assert len(table) <= 100
    assert [table.owner(f"{u}-1") for u in ("alice", "bob", "carol")] == ["alice", "bob", "carol"]
    assert table.owner("mallory-9999") == "mallory" and table.owner("mallory-9903") == "mallory"
    assert table.owner("mallory-9902") is None  # her oldest went first
    assert table.evicted_total == 10_000 - 97
    # Several callers at the cap: the one with the most loses one, ties by least recent use.
    for i in range(2, 62):  # bob grows to 49 while mallory shrinks to 49, then bob holds the most
        now[0] += 1
        assert table.bind(f"bob-{i}", "bob")
    assert table.owner("alice-1") == "alice" and table.owner("carol-1") == "carol"
    assert table.owner("bob-1") is None and table.owner("bob-12") is None and table.owner("bob-13") == "bob"
    assert table.owner("mallory-9951") is None and table.owner("mallory-9952") == "mallory"
    # Forgetting and expiring keep the per-caller counts right.
    for i in range(13, 62):
        table.forget(f"bob-{i}")
    now[0] += 86401
    assert table.bind("dave-1", "dave") and len(table) == 1


def test_a_full_table_of_many_callers_holding_as_many_evicts_the_least_recently_used() -> None:
    # More than a handful of callers tie for the most bindings (one each here): the victim is found
    # by walking the table from its least recently used end.
    now = [0.0]
    table = SessionTable(SessionsConfig(max_sessions=20, idle_timeout_s=86400), clock=lambda: now[0])
    for i in range(20):
        now[0] += 1
        assert table.bind(f"s-{i}", f"user-{i}")
    for i in range(20):
        if i != 7:
            now[0] += 1
            assert table.owner(f"s-{i}") == f"user-{i}"  # everyone but user-7 used theirs again
    now[0] += 1
    assert table.bind("s-new", "newcomer")
    assert table.owner("s-7") is None and table.evicted_total == 1
    now[0] += 1
    assert table.bind("s-next", "another")  # now s-0, used longest ago of those left, goes
    assert table.owner("s-0") is None and table.evicted_total == 2
    assert table.owner("s-new") == "newcomer" and table.owner("s-next") == "another"
    assert all(table.owner(f"s-{i}") == f"user-{i}" for i in range(1, 20) if i != 7)


def test_the_per_caller_counts_index_holds_each_caller_once() -> None:
    table = SessionTable(SessionsConfig(max_sessions=1000))
    for i in range(300):
        assert table.bind(f"a-{i}", "alice")
    assert table.bind("b-0", "bob")
    assert table._holders.counts() == {300: ["alice"], 1: ["bob"]} and table._holders.most == 300
    for i in range(300):
        table.forget(f"a-{i}")
    assert table._holders.counts() == {1: ["bob"]} and table._holders.most == 1


class CountingEventStore(EventStore):
    """An event store with sequential ids, as a Redis-stream or database-backed one has: the SDK's
    `EventStore` replays a stream by an event id alone, whichever session the stream belongs to."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []  # (event id, stream id, message or None)

    async def store_event(self, stream_id: str, message: Any) -> str:
        self.events.append((str(len(self.events) + 1), stream_id, message))
        return self.events[-1][0]

    async def replay_events_after(self, last_event_id: str, send_callback: Any) -> str | None:
        at = next((i for i, e in enumerate(self.events) if e[0] == last_event_id), None)
        if at is None:
            return None
        stream = self.events[at][1]
        for event_id, stream_id, message in self.events[at + 1 :]:
            if stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


async def resume(url: str, token: str, sid: str, last_event_id: str) -> tuple[int, str]:
    """GET the session's stream with `Last-Event-ID`; the status and what arrives within 3 s."""
    headers = JSON_SSE | {
        "Authorization": f"Bearer {token}",
        "MCP-Protocol-Version": "2025-11-25",
        "Mcp-Session-Id": sid,
        "Last-Event-ID": last_event_id,
    }
    text = ""
    async with httpx2.AsyncClient(timeout=10) as http, http.stream("GET", url, headers=headers) as resp:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                async for chunk in resp.aiter_text():
                    text += chunk
                    if "secret" in text:
                        break
        return resp.status_code, text


async def test_a_last_event_id_resumes_only_a_stream_relayed_to_the_same_caller(
    idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    """Bob, in his own session, sent `Last-Event-ID` naming an event of Alice's stream and the SDK
    replayed Alice's tool result to him: session binding did not cover the event ids."""
    store = CountingEventStore()
    app = mcp_server.build_server().streamable_http_app(host="127.0.0.1", event_store=store)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn's flag; it offers no event to wait on)
        await asyncio.sleep(0.01)
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "alice-secret"}},
    }
    try:
        async with run_sidecar(sidecar_config(idp, workload_api, port)) as sidecar:
            url = sidecar.mcp_url()
            alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
            sessions = {}
            for who, token in (("alice", alice), ("bob", bob)):
                async with httpx2.AsyncClient(timeout=10) as http:
                    headers = JSON_SSE | {"Authorization": f"Bearer {token}"}
                    opened = await http.post(url, json=init, headers=headers)
                    sessions[who] = opened.headers["mcp-session-id"]
                    headers |= {"Mcp-Session-Id": sessions[who], "MCP-Protocol-Version": "2025-11-25"}
                    await http.post(
                        url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
                    )
                    if who == "alice":
                        answered = await http.post(url, json=call, headers=headers)
                        assert "alice-secret" in answered.text
            # The priming event of Alice's tools/call stream: resuming after it replays her result.
            primed = next(
                event_id for event_id, stream, message in store.events if stream == "2" and message is None
            )
            status, text = await resume(url, bob, sessions["bob"], primed)
            assert status == 404 and "alice-secret" not in text
            assert (await resume(url, bob, sessions["bob"], "no-such-event"))[0] == 404
            status, text = await resume(url, alice, sessions["alice"], primed)
            assert status == 200 and "alice-secret" in text  # her own stream still resumes
    finally:
        server.should_exit = True
        await task
