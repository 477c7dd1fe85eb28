"""JSON-RPC facts, the stateless routing-header check and the SSE watcher: pure functions, no sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from outrider.sidecar.inbound import jsonrpc
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.inbound.jsonrpc import McpMessage, SseEvent, SseParser
from outrider.sidecar.inbound.proxy import classify_transport, rewrite_endpoint_data, rewrite_first_event


def test_request_facts() -> None:
    m = jsonrpc.parse_message(
        {
            "jsonrpc": "2.0",
            "id": 5,
            "method": "tools/call",
            "params": {"name": "fetch", "arguments": {"url": "u"}},
        }
    )
    assert m == McpMessage(
        kind="request", method="tools/call", id=5, tool_name="fetch", arguments={"url": "u"}
    )
    assert m.target == "fetch"
    p = jsonrpc.parse_message({"jsonrpc": "2.0", "id": "a", "method": "prompts/get", "params": {"name": "p"}})
    assert (p.prompt_name, p.tool_name, p.target) == ("p", None, "p")
    r = jsonrpc.parse_message(
        {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "file:///x"}}
    )
    assert r.resource_uri == "file:///x"
    n = jsonrpc.parse_message({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert n.kind == "notification" and n.id is None


def test_response_facts() -> None:
    ok = jsonrpc.parse_message({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
    assert ok == McpMessage(kind="response", id=1)
    tool_error = jsonrpc.parse_message({"jsonrpc": "2.0", "id": 1, "result": {"isError": True}})
    assert tool_error.is_error and tool_error.error_code is None
    err = jsonrpc.parse_message({"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "nope"}})
    assert err.is_error and err.error_code == -32601


@pytest.mark.parametrize(
    "value",
    [
        None,
        1,
        "x",
        [],
        {"id": 1, "method": "m"},
        {"jsonrpc": "1.0", "method": "m"},
        {"jsonrpc": "2.0", "id": 1},
    ],
)
def test_malformed_messages_are_invalid_not_errors(value: object) -> None:
    assert jsonrpc.parse_message(value).kind == "invalid"


def test_bool_ids_and_odd_params_are_not_trusted() -> None:
    m = jsonrpc.parse_message({"jsonrpc": "2.0", "id": True, "method": "tools/call", "params": ["x"]})
    assert m.id is None and m.tool_name is None and m.arguments is None


def test_parse_body_single_batch_and_errors() -> None:
    single = jsonrpc.parse_body(b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
    assert not single.batch and single.messages[0].method == "ping"
    batch = jsonrpc.parse_body(
        json.dumps(
            [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "method": "n"}]
        ).encode()
    )
    assert batch.batch and [m.kind for m in batch.messages] == ["request", "notification"]
    with pytest.raises(jsonrpc.BodyError) as parse_error:
        jsonrpc.parse_body(b"{not json")
    assert parse_error.value.code == jsonrpc.PARSE_ERROR
    with pytest.raises(jsonrpc.BodyError) as empty:
        jsonrpc.parse_body(b"[]")
    assert empty.value.code == jsonrpc.INVALID_REQUEST


def test_error_body_answers_every_request_id() -> None:
    assert json.loads(jsonrpc.error_body((1,), -32603, "m")) == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": -32603, "message": "m"},
    }
    assert [e["id"] for e in json.loads(jsonrpc.error_body((1, 2), -1, "m", batch=True))] == [1, 2]
    assert json.loads(jsonrpc.error_body(None, -1, "m"))["id"] is None


CALL = jsonrpc.parse_body(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"caf\xc3\xa9"}}')


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({}, None),
        ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?Y2Fmw6k=?="}, None),
        ({"Mcp-Method": "tools/call"}, None),
        ({"Mcp-Method": "tools/list"}, "Mcp-Method"),
        ({"Mcp-Method": "tools/call", "Mcp-Name": "other"}, "Mcp-Name"),
        ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?!!?="}, "Mcp-Name"),
    ],
)
def test_routing_headers_must_agree_with_the_body(headers: dict[str, str], problem: str | None) -> None:
    why = jsonrpc.routing_header_mismatch(headers, CALL)
    assert (why is None) if problem is None else (why is not None and problem in why)


def test_every_value_of_a_repeated_routing_header_must_agree() -> None:
    agreeing = CIMultiDict([("Mcp-Method", "tools/call"), ("mcp-method", "tools/call"), ("Mcp-Name", "café")])
    assert jsonrpc.routing_header_mismatch(agreeing, CALL) is None
    second_method = CIMultiDict([("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/list")])
    assert "Mcp-Method" in (jsonrpc.routing_header_mismatch(second_method, CALL) or "")
    second_name = CIMultiDict([("Mcp-Name", "=?base64?Y2Fmw6k=?="), ("Mcp-Name", "other")])
    assert "Mcp-Name" in (jsonrpc.routing_header_mismatch(second_name, CALL) or "")


def test_sse_parser_handles_any_chunking_and_line_endings() -> None:
    stream = (
        b'event: message\r\nid: 7\r\ndata: {"a":\r\ndata: 1}\r\n\r\n: comment\n\ndata: two\r\rdata: x\n\n'
    )
    for size in (1, 2, 3, 7, len(stream)):
        parser = SseParser()
        events: list[SseEvent] = []
        for i in range(0, len(stream), size):
            events += parser.feed(stream[i : i + size])
        assert events == [
            SseEvent("message", '{"a":\n1}', "7"),
            SseEvent(None, "two", "7"),
            SseEvent(None, "x", "7"),
        ]


def test_sse_parser_drops_oversized_events_but_keeps_going() -> None:
    parser = SseParser(max_event_bytes=10)
    assert parser.feed(b"data: " + b"x" * 50 + b"\n\n") == []
    assert parser.feed(b"data: ok\n\n") == [SseEvent(None, "ok", None)]


def test_legacy_endpoint_event_is_made_relative() -> None:
    assert rewrite_endpoint_data("http://127.0.0.1:8080/messages/?session_id=1") == "/messages/?session_id=1"
    assert rewrite_endpoint_data("/messages/?session_id=1") == "/messages/?session_id=1"
    raw = b"event: endpoint\ndata: http://127.0.0.1:1/m?s=1\n\n"
    assert rewrite_first_event(raw) == b"event: endpoint\ndata: /m?s=1\n\n"
    other = b"event: message\ndata: http://x/y\n\n"
    assert rewrite_first_event(other) == other


def test_transport_classification() -> None:
    config = InboundConfig()
    assert classify_transport("GET", "/sse", {}, {}, config) == "sse-legacy"
    assert classify_transport("POST", "/messages/", {}, {"session_id": "1"}, config) == "sse-legacy"
    assert (
        classify_transport("POST", "/mcp", {"MCP-Protocol-Version": "2026-07-28"}, {}, config) == "stateless"
    )
    assert (
        classify_transport("POST", "/mcp", {"MCP-Protocol-Version": "2025-06-18"}, {}, config)
        == "streamable-http"
    )


# -- the fast decoder decodes exactly what the standard library does --------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


def _outcome(decode: Any, data: bytes) -> tuple[str, str]:
    try:
        return "ok", repr(decode(data))
    except RecursionError:
        return "deep", ""
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return "error", ""


@settings(max_examples=300)
@given(_json_values, st.sampled_from(["utf-8", "utf-16", "utf-32"]), st.booleans())
def test_fast_loads_matches_json_loads_on_documents(value: Any, encoding: str, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode(encoding, "surrogatepass")
    assert _outcome(jsonrpc.loads, data) == _outcome(json.loads, data)


@settings(max_examples=300)
@given(st.binary(max_size=64) | st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fast_loads_matches_json_loads_on_any_bytes(data: bytes) -> None:
    assert _outcome(jsonrpc.loads, data) == _outcome(json.loads, data)


def test_fast_loads_keeps_big_integers_and_odd_inputs() -> None:
    for data in (
        b"[18446744073709551616, -9223372036854775809, 123456789012345678901234567890]",
        b"[NaN, Infinity, 1e400]",
        b'{"a": 1, "a": 2}',
        b'"\\ud800"',
        b"[" * 1100 + b"]" * 1100,
    ):
        assert _outcome(jsonrpc.loads, data) == _outcome(json.loads, data), data[:30]


def _reencoded(data: bytes) -> str:
    """What the upstream reads after the proxy re-encodes a body it decoded (as `repr` of the values)."""
    return repr(json.loads(jsonrpc.dumps(jsonrpc.loads(data), data)))


@settings(max_examples=300)
@given(_json_values, st.sampled_from(["utf-8", "utf-16", "utf-32"]), st.booleans())
def test_reencoding_keeps_every_value_decoded(value: Any, encoding: str, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode(encoding, "surrogatepass")
    try:
        expected = repr(json.loads(data))
    except (ValueError, RecursionError):
        return
    assert _reencoded(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"[18446744073709551616, -9223372036854775809]",
        b"[NaN, Infinity, -Infinity]",
        b"[1e400, -1e400, 1e-400]",
        b'{"s": "\\ud800 lone", "t": "caf\\u00e9 \\u2603"}',
        '{"a": "NaN inside a string", "b": "\u00e9"}'.encode(),
        '{"x": [1, 2.5, true, null]}'.encode("utf-16"),
        b"[" * 300 + b"]" * 300,
    ],
)
def test_reencoding_keeps_odd_values(data: bytes) -> None:
    assert _reencoded(data) == repr(json.loads(data))


_ANSWER_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["isError", "error", "code", "x", "é"]) | st.text(max_size=5), inner, max_size=3
        )
    ),
    max_leaves=8,
)
_ANSWERS = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "id": st.integers(0, 9)},
    optional={
        "result": _ANSWER_VALUES | st.fixed_dictionaries({"isError": st.booleans()}),
        "error": st.fixed_dictionaries({"code": st.integers(-33000, 0), "message": st.text(max_size=5)}),
    },
)


@given(
    st.one_of(_ANSWERS, st.lists(_ANSWERS, min_size=1, max_size=3)),
    st.booleans(),
    st.sampled_from(
        ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
    ),
)
@settings(max_examples=300)
@example({"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "x"}}, True, "utf-16")
@example({"jsonrpc": "2.0", "id": 1, "result": {"isError": True}}, True, "utf-32-le")
def test_a_body_holding_no_error_parses_to_successes_only(
    answer: Any, ascii_only: bool, encoding: str
) -> None:
    # every encoding `loads` accepts (RFC 8259 says UTF-8, the standard library also reads UTF-16/32)
    body = json.dumps(answer, ensure_ascii=ascii_only).encode(encoding)
    if jsonrpc.holds_no_error(body):
        assert not any(m.is_error or m.error_code is not None for m in jsonrpc.parse_response_body(body))


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"x"}}',
        b'{"jsonrpc":"2.0","id":1,"result":{"isError":true}}',
        b'{"jsonrpc":"2.0","id":1,"\\u0065rror":{"code":-32000,"message":"x"}}',
        b'{"jsonrpc":"2.0","id":1,"result":{"is\\u0045rror":true}}',
        b'{"jsonrpc":"2.0","id":1,"result":{"isError" :\r\n\ttrue}}',
    ],
)
def test_an_error_answer_however_spelt_is_parsed(body: bytes) -> None:
    assert not jsonrpc.holds_no_error(body)
    (message,) = jsonrpc.parse_response_body(body)
    assert message.is_error


def test_a_success_answer_with_is_error_false_needs_no_parsing() -> None:
    assert jsonrpc.holds_no_error(b'{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError": false}}')


@given(
    st.binary(max_size=64)
    | st.lists(
        st.sampled_from(
            [b"1", b"0", b"9", b"e", b"E", b"+", b"-", b"N", b"aN", b"Infinity", b"\x00", b'"', b"x"]
        ),
        max_size=40,
    ).map(b"".join)
)
@example(b"1e+100")
@example(b"2E-308")
@example(b"[1e400]")
@example(b"1234567890123456789")
@example(b"123456789012345678")
@example(b"e12")
@settings(max_examples=2000)
def test_stdlib_only_finds_what_the_regex_finds(source: bytes) -> None:
    assert jsonrpc.stdlib_only(source) == (jsonrpc._STDLIB_ONLY.search(source) is not None)


def test_sse_ids_are_read_from_whole_lines_in_any_split() -> None:
    """The event ids the proxy binds to a caller (`Last-Event-ID` may only name those): `id:` lines in
    any chunking and line ending; never a fragment of a long `data:` line that happens to read `id:`."""
    stream = (
        b"id: 1\r\ndata: x\r\n\r\nid:2\ndata: " + b"a" * 3000 + b"id: 666\n\n"
        b"data: " + b"b" * 1019 + b"\nid: 3\rdata:y\r\rid\n\nid:  4 \n"
    )
    for size in (1, 2, 3, 7, 64, 1023, 1024, 1025, len(stream)):
        ids = jsonrpc.SseIds()
        found = [i for at in range(0, len(stream), size) for i in ids.feed(stream[at : at + size])]
        assert found == ["1", "2", "3", "", " 4 "], size
    ids = jsonrpc.SseIds(max_line=8)
    assert ids.feed(b"data: 12345678") == [] and ids.feed(b"id: 9\nid: 10\n") == ["10"]
    assert jsonrpc.SseIds().feed(b"data: no id here\n\n") == []
