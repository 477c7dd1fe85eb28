"""Hypothesis against the policy gate in the running proxy: hostile JSON-RPC never breaks it, never
passes unjudged, never reaches the app when refused.

A stand-in app (real HTTP on loopback) records every body it receives; the policy permits the
anonymous caller `echo` only, so anything else that reaches the app is a pass-through.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.inbound.jsonrpc import parse_message

from .conftest import free_port, run_sidecar, serve_everything, sidecar_config

pytestmark = pytest.mark.timeout(600)

POLICY = 'permit(principal, action == Action::"call_tool", resource == Tool::"echo");'
UNJUDGED = {"initialize", "server/discover", "ping"}


@dataclass
class RecordingApp:
    port: int = field(default_factory=free_port)
    bodies: list[bytes] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.json_response(
            {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "echo"}, {"name": "rm"}]}}
        )


@pytest.fixture
async def app() -> AsyncIterator[RecordingApp]:
    state = RecordingApp()
    async with serve_everything(state.handle, state.port):
        yield state


class Shared:
    """One sidecar for every example (starting one per example is too slow)."""

    def __init__(self, idp: DevIdP, workload_api: DevWorkloadApi) -> None:
        self.idp, self.workload_api = idp, workload_api
        self.url: str | None = None
        self._cm: Any = None

    async def get(self, port: int) -> str:
        if self._cm is None:
            raw = sidecar_config(self.idp, self.workload_api, port, allow_unauthenticated=True)
            raw["policy"] = {"cedar": POLICY, "file": None, "rate_limits": {"per_tool": "100000/second"}}
            self._cm = run_sidecar(raw)
            sidecar = await self._cm.__aenter__()
            self.url = sidecar.mcp_url()
        assert self.url is not None
        return self.url

    async def close(self) -> None:
        if self._cm is not None:
            await self._cm.__aexit__(None, None, None)


@pytest.fixture
async def shared(idp: DevIdP, workload_api: DevWorkloadApi) -> AsyncIterator[Shared]:
    holder = Shared(idp, workload_api)
    yield holder
    await holder.close()


IDS = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.text(max_size=12),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
    st.just({}),
)
JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
ARG_KEYS = st.sampled_from(["text", "__entity", "__extn", "__expr", "url", "", "é"])


@st.composite
def messages(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["call", "call", "other", "notification", "response", "junk"]))
    if kind == "junk":
        return draw(JSON_VALUES)
    message: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2]))}
    if kind != "notification":
        message["id"] = draw(IDS)
    if kind == "response":
        message["result"] = draw(JSON_VALUES)
        return message
    if kind == "call":
        message["method"] = "tools/call"
        name = draw(st.one_of(st.sampled_from(["echo", "rm", "Echo", "echo ", "", "é名"]), JSON_LEAVES))
        arguments = draw(st.one_of(st.dictionaries(ARG_KEYS, JSON_VALUES, max_size=4), JSON_VALUES))
        message["params"] = {"name": name, "arguments": arguments}
        if draw(st.booleans()):
            message["params"]["_meta"] = draw(JSON_VALUES)
        return message
    message["method"] = draw(
        st.one_of(
            st.sampled_from(["tools/list", "initialize", "ping", "resources/read", "prompts/get", "x/y"]),
            JSON_LEAVES,
        )
    )
    if draw(st.booleans()):
        message["params"] = draw(JSON_VALUES)
    return message


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["single", "batch", "nested", "huge_args", "dup_keys", "non_utf8", "raw"]))
    if shape == "single":
        return json.dumps(draw(messages())).encode()
    if shape == "batch":
        return json.dumps(draw(st.lists(messages(), min_size=0, max_size=6))).encode()
    if shape == "nested":
        inner = draw(st.lists(messages(), min_size=1, max_size=3))
        return json.dumps([inner, *draw(st.lists(messages(), max_size=2))]).encode()
    if shape == "huge_args":
        size = draw(st.sampled_from([10_000, 500_000]))
        deep: Any = "x"
        for _ in range(draw(st.sampled_from([1, 40, 200]))):
            deep = {"a": deep}
        arguments = {"text": "y" * size, "deep": deep, "many": {str(i): i for i in range(2000)}}
        name = draw(st.sampled_from(["echo", "rm"]))
        return json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": name, "arguments": arguments},
            }
        ).encode()
    if shape == "dup_keys":
        # Two `name`s: the gate and the app must judge the same one (the gate re-encodes what it judged).
        return b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"rm"}}'
    if shape == "non_utf8":
        return b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo\xff\xfe"}}'
    return draw(st.binary(max_size=300))


def passes(obj: Any) -> bool:
    """May this message reach the app under POLICY?"""
    message = parse_message(obj)
    if message.kind == "response":
        return True
    if message.kind == "notification" and (message.method or "").startswith("notifications/"):
        return True
    # A notification naming any other method is judged as that request (a generic JSON-RPC server
    # runs `tools/call` without an `id`).
    if message.kind not in ("request", "notification"):
        return False
    if message.method in UNJUDGED:
        return True
    return message.method == "tools/call" and message.tool_name == "echo"


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    derandomize=True,
)
@given(body=bodies(), stateless=st.booleans())
async def test_hostile_json_rpc_is_judged_or_refused_never_passed_through(
    body: bytes, stateless: bool, app: RecordingApp, shared: Shared
) -> None:
    url = await shared.get(app.port)
    app.bodies.clear()
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if stateless:
        headers["MCP-Protocol-Version"] = "2026-07-28"
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as response:
        status = response.status
        answer = await response.read()
    assert status < 500, (status, answer[:300])
    assert b"Traceback" not in answer and b"permit(" not in answer
    for received in app.bodies:
        decoded = json.loads(received)  # the gate forwards only what it decoded (and re-encoded)
        items = decoded if isinstance(decoded, list) else [decoded]
        assert items and all(passes(item) for item in items), received[:300]
        assert b"\xff" not in received
    if app.bodies and b'"tools"' in answer:
        assert b'"rm"' not in answer  # the list answer is filtered for the caller


async def test_a_lone_surrogate_in_a_called_name_is_denied_and_the_rest_of_the_batch_judged(
    app: RecordingApp, shared: Shared
) -> None:
    """`"\\ud800"` is valid JSON that Python decodes to a lone surrogate and Cedar cannot hold: it
    made the gate raise (HTTP 500 for the whole batch, a traceback in the log)."""
    url = await shared.get(app.port)
    echo = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}'
    odd = [
        b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"ech\\ud800"}}',
        b'{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///\\udfff"}}',
    ]
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    async with aiohttp.ClientSession() as http:
        for body in odd:
            app.bodies.clear()
            async with http.post(url, data=b"[" + echo + b"," + body + b"]", headers=headers) as response:
                assert response.status == 200
                answer = await response.json()
            denied = {"code": -32003, "message": "denied by policy"}
            assert {"jsonrpc": "2.0", "id": 2, "error": denied} in answer
            assert [json.loads(b) for b in app.bodies] == [json.loads(echo)]  # only the echo went on


async def test_a_tool_name_that_is_not_a_string_never_slips_past_a_forbid(
    app: RecordingApp, idp: DevIdP, workload_api: DevWorkloadApi
) -> None:
    """A deny-list policy judged `{"name": ["rm"]}` as the empty name and let it through; a server
    that coerces the value (JavaScript reads `["rm"]` as the key "rm") would run the forbidden tool."""
    raw = sidecar_config(idp, workload_api, app.port, allow_unauthenticated=True)
    forbid_rm = 'permit(principal, action, resource);\nforbid(principal, action, resource == Tool::"rm");'
    raw["policy"] = {"cedar": forbid_rm, "file": None}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    async with run_sidecar(raw) as sidecar, aiohttp.ClientSession() as http:
        for name in (["rm"], {"0": "rm"}, 0, None):
            body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name}}
            async with http.post(sidecar.mcp_url(), json=body, headers=headers) as response:
                assert response.status == 400
                assert await response.json() == {
                    "jsonrpc": "2.0",
                    "id": 7,
                    "error": {"code": -32602, "message": "tools/call needs params.name as a string"},
                }
        assert app.bodies == []
        good = {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "echo"}}
        async with http.post(sidecar.mcp_url(), json=good, headers=headers) as response:
            assert response.status == 200
        assert [json.loads(b) for b in app.bodies] == [good]
