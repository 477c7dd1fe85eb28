"""End to end: Cedar policies and rate limits in `outrider sidecar`'s inbound proxy.

The real `mcp` SDK client and server, the dev IdP (alice; bob in group `admins`), the real identity
client, and, for shared budgets, a real `redis-server`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp.shared.exceptions import MCPError as McpError
from mcp_types import Completion, PromptReference, ResourceTemplateReference, TextContent

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from tests.policy.redis_server import redis_server

from .conftest import RESOURCE, RecordingObserver, Sidecar, legacy_sse_client, run_sidecar, sidecar_config
from .conftest import streamable_client as client_for

OPERATOR = """
@id("everyone-echo-fetch")
permit(principal, action == Action::"call_tool", resource)
when { resource == Tool::"echo" || resource == Tool::"fetch" || resource == Tool::"whoami" };

@id("admins-everything")
permit(principal in Group::"admins", action, resource);

@id("lists")
permit(principal, action in [Action::"list_tools", Action::"list_prompts", Action::"list_resources"],
       resource);

@id("fetch-loopback-only")
forbid(principal, action == Action::"call_tool", resource == Tool::"fetch")
unless { context has arguments && context.arguments has url
         && context.arguments.url like "http://127.0.0.1:*" };
"""


@asynccontextmanager
async def policy_sidecar(
    idp: DevIdP,
    workload_api: DevWorkloadApi,
    mcp_port: int,
    *,
    policy: dict[str, Any],
    observer: RecordingObserver | None = None,
) -> AsyncIterator[Sidecar]:
    raw = sidecar_config(idp, workload_api, mcp_port)
    raw["policy"] = {"file": None, **policy}
    async with run_sidecar(raw, observer=observer) as sidecar:
        yield sidecar


def text_of(result: Any) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


async def assert_denied(coro: Any) -> None:
    with pytest.raises(McpError) as caught:
        await coro
    assert caught.value.error.code == -32003
    assert caught.value.error.message == "denied by policy"
    assert "permit" not in caught.value.error.message  # no policy text reaches the caller


@pytest.mark.parametrize("mcp_app", ["json", "streamable"], indirect=True)
async def test_alice_may_echo_not_delete_bob_may_and_lists_differ(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    observer = RecordingObserver()
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    async with policy_sidecar(
        idp, workload_api, mcp_app.port, policy={"cedar": OPERATOR}, observer=observer
    ) as sidecar:
        async with client_for(sidecar.mcp_url(), alice) as client:
            # "streamable" answers tools/list as an SSE event: filtered there too.
            listed = {t.name for t in (await client.list_tools()).tools}
            assert listed == {"echo", "fetch", "whoami"}
            assert text_of(await client.call_tool("echo", {"text": "hi"})) == "hi"
            await assert_denied(client.call_tool("delete", {"item": "x"}))
            # An argument condition: fetch only towards loopback.
            await assert_denied(client.call_tool("fetch", {"url": "http://example.com/"}))
            fetched = await client.call_tool("fetch", {"url": idp.url + "/jwks"})
            assert not fetched.is_error
        async with client_for(sidecar.mcp_url(), bob) as client:
            listed = {t.name for t in (await client.list_tools()).tools}
            assert {"echo", "delete", "fetch", "whoami", "sleep"} <= listed
            assert text_of(await client.call_tool("delete", {"item": "x"})) == "deleted x"
    denied = next(c for c in observer.by_method("tools/call") if c.message.tool_name == "delete")
    assert denied.outcome["outcome"] == "denied" and denied.outcome["error_type"] == "policy_denied"
    assert denied.exchanges == []  # refused before the token exchange: no IdP round trip
    assert denied.policy.decision == "deny"
    allowed = next(c for c in observer.by_method("tools/call") if c.message.tool_name == "echo")
    assert allowed.policy.decision == "allow" and allowed.policy.policies == ("everyone-echo-fetch",)
    fetch_denied = next(
        c
        for c in observer.by_method("tools/call")
        if c.message.tool_name == "fetch" and c.policy.decision == "deny"
    )
    assert fetch_denied.policy.policies == ("fetch-loopback-only",)
    assert sidecar.proxy.gate is not None and sidecar.proxy.gate.stats.filtered_items >= 2


NOTES = """
@id("lists")
permit(principal, action == Action::"list_resources", resource);

@id("public-notes")
permit(principal, action == Action::"read_resource", resource)
when { resource == Resource::"notes://public/{name}" || resource == Resource::"notes://public/readme" };

@id("admins-everything")
permit(principal in Group::"admins", action, resource);
"""


def notes_server() -> Any:
    """The dev server plus two resources and two resource templates (one public, one private each)."""
    server = mcp_server.build_server()

    @server.resource("notes://public/{name}")
    def public_note(name: str) -> str:
        return f"public note {name}"

    @server.resource("notes://private/{name}")
    def private_note(name: str) -> str:
        return f"private note {name}"

    @server.resource("notes://public/readme")
    def public_readme() -> str:
        return "public readme"

    @server.resource("notes://private/readme")
    def private_readme() -> str:
        return "private readme"

    return server


@pytest.mark.parametrize("mode", ["json", "streamable"])
async def test_resource_templates_are_filtered_like_the_resources_they_read(
    mode: mcp_server.Mode, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    """A template is judged as `read_resource` on `Resource::"<uriTemplate>"`: alice, who may read
    public notes only, is shown the public template only; bob (admins) is shown both. The answer of
    `resources/templates/list` used to pass through unfiltered."""
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    async with (
        mcp_server.running(0, mode, server=notes_server()) as app,
        policy_sidecar(idp, workload_api, app.port, policy={"cedar": NOTES}) as sidecar,
    ):
        async with client_for(sidecar.mcp_url(), alice) as client:
            templates = (await client.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == ["notes://public/{name}"]
            assert [str(r.uri) for r in (await client.list_resources()).resources] == [
                "notes://public/readme"
            ]
            await assert_denied(client.read_resource("notes://private/plan"))
        async with client_for(sidecar.mcp_url(), bob) as client:
            templates = (await client.list_resource_templates()).resource_templates
            assert sorted(t.uri_template for t in templates) == [
                "notes://private/{name}",
                "notes://public/{name}",
            ]
    assert sidecar.proxy.gate is not None and sidecar.proxy.gate.stats.filtered_items >= 2


COMPLETING = """
@id("plumbing")
permit(principal, action == Action::"other", resource);

@id("greet-and-public-notes")
permit(principal, action, resource)
when { resource == Prompt::"greet" || resource == Resource::"notes://public/{name}" };

@id("admins-everything")
permit(principal in Group::"admins", action, resource);
"""


async def test_completions_are_judged_as_the_prompt_or_template_they_complete(
    idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    """`completion/complete` was judged as `Action::"other"` on the server: alice, forbidden the
    prompt `secret` and the private notes, still got their arguments' values. Real SDK both ends."""
    server = notes_server()

    @server.prompt()
    def greet(name: str) -> str:
        return f"hello {name}"

    @server.prompt()
    def secret(code: str) -> str:
        return f"the code is {code}"

    @server.completion()
    async def complete(ref: Any, argument: Any, context: Any) -> Completion:
        return Completion(values=[f"{argument.name}-value"], total=1, has_more=False)

    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    refs: list[Any] = [
        PromptReference(type="ref/prompt", name="secret"),
        ResourceTemplateReference(type="ref/resource", uri="notes://private/{name}"),
    ]
    async with (
        mcp_server.running(0, "streamable", server=server) as app,
        policy_sidecar(idp, workload_api, app.port, policy={"cedar": COMPLETING}) as sidecar,
    ):
        async with client_for(sidecar.mcp_url(), alice) as client:
            greet_ref = PromptReference(type="ref/prompt", name="greet")
            done = await client.complete(greet_ref, {"name": "name", "value": ""})
            assert done.completion.values == ["name-value"]
            public = ResourceTemplateReference(type="ref/resource", uri="notes://public/{name}")
            assert (await client.complete(public, {"name": "name", "value": ""})).completion.values
            for ref in refs:
                await assert_denied(client.complete(ref, {"name": "code", "value": ""}))
            await assert_denied(client.get_prompt("secret", {"code": "1"}))
        async with client_for(sidecar.mcp_url(), bob) as client:
            for ref in refs:
                assert (await client.complete(ref, {"name": "code", "value": ""})).completion.values


@pytest.mark.parametrize("mcp_app", ["stateless"], indirect=True)
async def test_stateless_revision_is_judged(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    alice = idp.mint("alice", audience=RESOURCE)
    async with (
        policy_sidecar(idp, workload_api, mcp_app.port, policy={"cedar": OPERATOR}) as sidecar,
        client_for(sidecar.mcp_url(), alice, mode="2026-07-28") as client,
    ):
        assert {t.name for t in (await client.list_tools()).tools} == {"echo", "fetch", "whoami"}
        await assert_denied(client.call_tool("delete", {"item": "x"}))
        assert text_of(await client.call_tool("echo", {"text": "s"})) == "s"


@pytest.mark.parametrize("mcp_app", ["sse"], indirect=True)
async def test_legacy_sse_transport_is_judged_and_filtered(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    alice = idp.mint("alice", audience=RESOURCE)
    async with (
        policy_sidecar(idp, workload_api, mcp_app.port, policy={"cedar": OPERATOR}) as sidecar,
        legacy_sse_client(sidecar.mcp_url("/sse"), alice) as client,
    ):
        assert {t.name for t in (await client.list_tools()).tools} == {"echo", "fetch", "whoami"}
        # The refusal travels on the session's SSE stream, where this transport's answers go.
        await assert_denied(asyncio.wait_for(client.call_tool("delete", {"item": "x"}), 10))
        assert text_of(await client.call_tool("echo", {"text": "old"})) == "old"


async def _session(
    http: aiohttp.ClientSession, url: str, token: str, version: str = "2025-03-26"
) -> dict[str, str]:
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",
    }
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    async with http.post(url, json=init, headers=headers) as response:
        assert response.status == 200, await response.text()
        session = response.headers.get("Mcp-Session-Id")
    headers["MCP-Protocol-Version"] = version
    if session:
        headers["Mcp-Session-Id"] = session
    async with http.post(
        url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
    ):
        pass
    return headers


def call(msg_id: Any, tool: str, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_batch_with_one_allowed_and_one_denied_call(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    alice = idp.mint("alice", audience=RESOURCE)
    async with (
        policy_sidecar(idp, workload_api, mcp_app.port, policy={"cedar": OPERATOR}) as sidecar,
        aiohttp.ClientSession() as http,
    ):
        headers = await _session(http, sidecar.mcp_url(), alice)
        batch = [call("a", "echo", text="ok"), call("b", "delete", item="x")]
        async with http.post(sidecar.mcp_url(), json=batch, headers=headers) as response:
            body = await response.json(content_type=None)
        by_id = {m["id"]: m for m in (body if isinstance(body, list) else [body])}
        assert by_id["b"]["error"] == {"code": -32003, "message": "denied by policy"}
        # The allowed member reached the server alone (the SDK server refuses batches) and never saw "b".
        assert isinstance(body, list) and len(body) == 2
        assert by_id["a"]["result"]["content"][0]["text"] == "ok"
        # A batch nested in a batch and a non-JSON-RPC member are refused, never passed on.
        odd = [[call("c", "echo", text="x")], {"id": "d", "method": "tools/call"}]
        async with http.post(sidecar.mcp_url(), json=odd, headers=headers) as response:
            assert response.status == 400
            answers = await response.json(content_type=None)
        assert [a["error"]["code"] for a in answers] == [-32600, -32600]


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_reload_flips_a_decision_and_a_broken_file_keeps_the_last_good(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.yaml"
    alice = idp.mint("alice", audience=RESOURCE)
    config = {"cedar": OPERATOR, "file": str(policy_file), "reload_interval_s": 0.1}
    async with policy_sidecar(idp, workload_api, mcp_app.port, policy=config) as sidecar:
        config_raw = dict(config)
        del config_raw["file"]
        gate = sidecar.proxy.gate
        assert gate is not None
        async with client_for(sidecar.mcp_url(), alice) as client:
            assert text_of(await client.call_tool("echo", {"text": "before"})) == "before"
            policy_file.write_text(
                'cedar: |\n  @id("no-echo-for-alice")\n'
                '  forbid(principal == User::"alice", action, resource == Tool::"echo");\n'
            )
            started = time.monotonic()
            while True:
                try:
                    await client.call_tool("echo", {"text": "after"})
                except McpError as exc:
                    assert exc.error.message == "denied by policy"
                    break
                assert time.monotonic() - started < 5, "the new policy never applied"
                await asyncio.sleep(0.02)
            assert time.monotonic() - started < 1.0, "the reload took more than a second"
            # A permit in the app team's file is refused: it may only narrow.
            policy_file.write_text("cedar: |\n  permit(principal, action, resource);\n")
            for _ in range(100):
                if gate.holder.reload_errors:
                    break
                await asyncio.sleep(0.02)
            ok, detail = gate.ready()
            assert ok and "keeping the last good policy" in detail and "forbid" in detail
            assert b"outrider_policy_reload_errors_total 1" in gate.metrics_text()
            await assert_denied(client.call_tool("echo", {"text": "still"}))
            # A syntax error names line and column, and still keeps the last good set.
            policy_file.write_text("cedar: |\n  forbid(principal action, resource);\n")
            for _ in range(100):
                if gate.holder.reload_errors >= 2:
                    break
                await asyncio.sleep(0.02)
            assert "line 1, column 18" in (gate.holder.last_error or "")
            await assert_denied(client.call_tool("echo", {"text": "still"}))
            policy_file.write_text("")
            for _ in range(100):
                if gate.holder.file_layer is None and gate.holder.last_error is None:
                    break
                await asyncio.sleep(0.02)
            assert text_of(await client.call_tool("echo", {"text": "back"})) == "back"


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_schema_mismatch_is_reported(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    cedar = OPERATOR + '\n@id("typo")\nforbid(principal, action, resource == Tool::"delet");\n'
    cedar += '@id("bad-arg")\nforbid(principal, action, resource == Tool::"echo")\n'
    cedar += "when { context.arguments has txt };\n"
    alice = idp.mint("alice", audience=RESOURCE)
    async with policy_sidecar(idp, workload_api, mcp_app.port, policy={"cedar": cedar}) as sidecar:
        async with client_for(sidecar.mcp_url(), alice) as client:
            await client.list_tools()
        gate = sidecar.proxy.gate
        assert gate is not None
        problems = " | ".join(gate.schema_problems)
        assert "'typo' names tool 'delet'" in problems and "'bad-arg' tests argument 'txt'" in problems
        assert b"outrider_policy_schema_mismatches 2" in gate.metrics_text()
        ok, detail = gate.ready()
        assert ok and "schema mismatch" in detail


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_eleventh_call_in_a_ten_per_minute_window_gets_429(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    alice = idp.mint("alice", audience=RESOURCE)
    policy = {"rate_limits": {"per_user_tool": "10/minute"}}
    async with (
        policy_sidecar(idp, workload_api, mcp_app.port, policy=policy) as sidecar,
        aiohttp.ClientSession() as http,
    ):
        headers = await _session(http, sidecar.mcp_url(), alice)
        statuses = []
        for i in range(11):
            async with http.post(
                sidecar.mcp_url(), json=call(i, "echo", text="x"), headers=headers
            ) as response:
                statuses.append(response.status)
                last = (response.headers.get("Retry-After"), await response.json(content_type=None))
        assert statuses == [200] * 10 + [429]
        retry_after, body = last
        assert retry_after is not None and 1 <= int(retry_after) <= 60
        assert body["id"] == 10 and body["error"]["code"] == -32029
        assert body["error"]["data"]["retryAfterSeconds"] == int(retry_after)
        # Another tool has its own per-user-tool budget.
        async with http.post(sidecar.mcp_url(), json=call(99, "whoami"), headers=headers) as response:
            assert response.status == 200


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_two_sidecars_share_one_redis_budget_and_store_loss_follows_config(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi, tmp_path: Path
) -> None:
    alice = idp.mint("alice", audience=RESOURCE)
    observer = RecordingObserver()
    with redis_server(tmp_path) as redis:
        # a generous store timeout: on a loaded machine the default 0.25 s can expire and fail open,
        # letting an extra call through (a stopped Redis still fails at once: connection refused)
        shared = {
            "rate_limits": {"per_tool": {"echo": "7/minute"}},
            "storage": redis.uri,
            "store_timeout_s": 5,
        }
        async with (
            policy_sidecar(idp, workload_api, mcp_app.port, policy=shared, observer=observer) as one,
            policy_sidecar(
                idp, workload_api, mcp_app.port, policy={**shared, "on_store_error": "deny"}
            ) as two,
            aiohttp.ClientSession() as http,
        ):
            sessions = [
                (one, await _session(http, one.mcp_url(), alice)),
                (two, await _session(http, two.mcp_url(), alice)),
            ]

            async def attempt(i: int) -> int:
                sidecar, headers = sessions[i % 2]
                async with http.post(sidecar.mcp_url(), json=call(i, "echo", text="x"), headers=headers) as r:
                    return r.status

            statuses = await asyncio.gather(*(attempt(i) for i in range(20)))
            assert statuses.count(200) == 7 and statuses.count(429) == 13
            redis.stop()
            # one: the default, allow (availability); two: configured to deny.
            async with http.post(
                one.mcp_url(), json=call(100, "echo", text="x"), headers=sessions[0][1]
            ) as r:
                assert r.status == 200
            async with http.post(
                two.mcp_url(), json=call(101, "echo", text="x"), headers=sessions[1][1]
            ) as r:
                assert r.status == 429
                assert (await r.json(content_type=None))["error"]["code"] == -32029
            for sidecar in (one, two):
                gate = sidecar.proxy.gate
                assert gate is not None
                ok, detail = gate.ready()
                assert ok and "rate-limit store unreachable" in detail
                assert b"outrider_ratelimit_store_up 0" in gate.metrics_text()
            assert one.proxy.gate is not None and one.proxy.gate.stats.allowed_store_down == 1
    # The audit record of the call let through while the store was down says so.
    last = [c for c in observer.by_method("tools/call") if c.message.id == 100]
    assert last and last[0].policy.rate_limit == "store_unavailable" and last[0].outcome["outcome"] == "ok"
    limited = [
        c for c in observer.by_method("tools/call") if c.policy and c.policy.decision == "rate_limited"
    ]
    assert limited and all(c.outcome["http_status"] == 429 for c in limited)


class HeldFiltering:
    """`may_use` (the per-item list filter) wrapped: once armed, the first call for more than the inline
    number of items records its thread, says it has started, and waits for `release` before filtering."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from outrider.sidecar.policy import gate as gate_module

        self.limit = gate_module.INLINE_LIST_ITEMS
        self.real = gate_module.may_use
        self.started = threading.Event()
        self.release = threading.Event()
        self.held: list[bool] = []
        self.threads: list[str] = []
        self.armed = False
        monkeypatch.setattr(gate_module, "may_use", self)

    def __call__(self, policies: Any, principal: Any, server: Any, kind: str, names: Any) -> list[bool]:
        if self.armed and len(names) > self.limit:
            self.armed = False
            self.threads.append(threading.current_thread().name)
            self.started.set()
            # Not a time limit: the wait ends as soon as the test has its small answer; the timeout
            # only keeps a regression (this wait holding the event loop) from hanging the suite.
            self.held.append(self.release.wait(timeout=10))
        return list(self.real(policies, principal, server, kind, names))


@pytest.mark.parametrize("mode", ["json", "streamable"])
async def test_a_small_call_is_answered_while_a_large_list_is_filtered(
    mode: mcp_server.Mode, idp: DevIdP, workload_api: DevWorkloadApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filtering a `tools/list` answer costs one Cedar partial evaluation per tool, and it ran on the
    event loop: a server offering 2,000 tools held every other caller for the whole filtering. Now a
    large list is filtered on the gate's worker thread; while it is held there, another caller's
    `tools/call` is answered. JSON answers and SSE events (streamable) alike."""
    held = HeldFiltering(monkeypatch)
    server = mcp_server.build_server()
    for i in range(2000):
        server.add_tool(lambda: "x", name=f"bulk-{i}", description="a bulk tool")
    alice, bob = idp.mint("alice", audience=RESOURCE), idp.mint("bob", audience=RESOURCE)
    async with (
        mcp_server.running(0, mode, server=server) as app,
        policy_sidecar(idp, workload_api, app.port, policy={"cedar": OPERATOR}) as sidecar,
        client_for(sidecar.mcp_url(), alice) as lister,
        client_for(sidecar.mcp_url(), bob) as caller,
    ):
        # The SDK client lists the tools before its first call (to check results against their output
        # schemas): that list (bob's) is filtered before the hold is armed.
        assert text_of(await caller.call_tool("echo", {"text": "first"})) == "first"
        held.armed = True
        listing = asyncio.create_task(lister.list_tools())
        assert await asyncio.to_thread(held.started.wait, 10)
        # The list is being filtered (and held): the other call is answered meanwhile.
        assert text_of(await caller.call_tool("echo", {"text": "meanwhile"})) == "meanwhile"
        held.release.set()
        listed = {t.name for t in (await listing).tools}
    assert held.held == [True] and held.threads[0].startswith("outrider-policy")
    # The same filtering as inline: alice may use echo, fetch and whoami only.
    assert listed == {"echo", "fetch", "whoami"}
