"""JSON-RPC / MCP message facts, parsed once per message and shared by policy, telemetry and audit.

The inbound proxy owns the parsing; telemetry and audit only read `McpMessage`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

JsonRpcId = str | int | None

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020  # the stateless revision's code for Mcp-Method/Mcp-Name disagreeing with the body
UNAUTHORIZED = -32001
UPSTREAM_ERROR = -32002

# Method -> params key mirrored by the stateless revision's `Mcp-Name` header.
NAME_BEARING_METHODS: Mapping[str, str] = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
}
# Messages a batch may hold. Every one is judged (Cedar), metered and recorded on the event loop
# that all callers share: 10 000 calls in a 1 MB body cost seconds. MCP clients send one message
# (batches left the protocol in 2025-06-18); this is far above any that still batch.
MAX_BATCH_MESSAGES = 100
COMPLETE = "completion/complete"
_RESOURCE_METHODS = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})


@dataclass(frozen=True)
class McpMessage:
    """One JSON-RPC message of an MCP exchange (a request, notification or response)."""

    kind: str  # "request" | "notification" | "response" | "invalid"
    method: str | None = None  # e.g. "tools/call"
    id: JsonRpcId = None
    tool_name: str | None = None  # params.name for tools/call
    prompt_name: str | None = None  # params.name for prompts/get
    resource_uri: str | None = None  # params.uri for resources/read, subscribe, ...
    # completion/complete: what params.ref names, ("Prompt", name) or ("Resource", uri); None when
    # the ref is not one of the two shapes the MCP schema gives (or for any other method)
    completion_ref: tuple[str, str] | None = None
    arguments: dict[str, object] | None = None  # params.arguments (never logged unless configured)
    is_error: bool = False  # response: JSON-RPC error, or result.isError for tool results
    error_code: int | None = None
    # W3C trace context the caller put in params._meta (traceparent/tracestate), per the MCP
    # semantic conventions; telemetry prefers it to the HTTP headers. Added by the telemetry owner.
    trace_context: Mapping[str, str] | None = field(default=None, compare=False)

    @property
    def target(self) -> str | None:
        """The semantic-convention `{target}` of the span name: the tool, prompt or resource."""
        return self.tool_name or self.prompt_name or self.resource_uri


@dataclass(frozen=True)
class ParsedBody:
    """A POST body: each message's facts beside the decoded object (so it is parsed only once)."""

    messages: tuple[McpMessage, ...]
    objects: tuple[Any, ...]  # the decoded JSON values, same order as `messages`
    batch: bool


class BodyError(ValueError):
    """The body is not JSON-RPC; `code` is the JSON-RPC error code to answer with."""

    def __init__(self, message: str, code: int = PARSE_ERROR):
        super().__init__(message)
        self.code = code


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _trace_context(meta: Any) -> Mapping[str, str] | None:
    if not isinstance(meta, dict) or not isinstance(meta.get("traceparent"), str):
        return None
    return {k: meta[k] for k in ("traceparent", "tracestate") if isinstance(meta.get(k), str)}


def _completion_ref(ref: Any) -> tuple[str, str] | None:
    """What a `completion/complete` ref names: a prompt (`{"type": "ref/prompt", "name": …}`) or a
    resource template (`{"type": "ref/resource", "uri": …}`). A ref carrying the other kind's key
    too is not one: a lenient server may read that key and complete for what it names instead."""
    if not isinstance(ref, dict):
        return None
    kind = ref.get("type")
    if kind == "ref/prompt" and "uri" not in ref and isinstance(ref.get("name"), str):
        return ("Prompt", ref["name"])
    if kind == "ref/resource" and "name" not in ref and isinstance(ref.get("uri"), str):
        return ("Resource", ref["uri"])
    return None


def parse_message(obj: Any) -> McpMessage:
    """The facts of one decoded JSON-RPC value; anything malformed is `kind="invalid"`, never an error."""
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return McpMessage(kind="invalid")
    raw_id = obj.get("id")
    msg_id: JsonRpcId = raw_id if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
    method = obj.get("method")
    if isinstance(method, str):
        params = obj.get("params")
        params = params if isinstance(params, dict) else {}
        name = _str(params.get("name"))
        arguments = params.get("arguments")
        return McpMessage(
            kind="request" if "id" in obj else "notification",
            method=method,
            id=msg_id,
            tool_name=name if method == "tools/call" else None,
            prompt_name=name if method == "prompts/get" else None,
            resource_uri=_str(params.get("uri")) if method in _RESOURCE_METHODS else None,
            completion_ref=_completion_ref(params.get("ref")) if method == COMPLETE else None,
            arguments=arguments if isinstance(arguments, dict) else None,
            trace_context=_trace_context(params.get("_meta")),
        )
    if "result" in obj:
        result = obj["result"]
        is_error = isinstance(result, dict) and result.get("isError") is True
        return McpMessage(kind="response", id=msg_id, is_error=is_error)
    if "error" in obj:
        error = obj["error"]
        code = error.get("code") if isinstance(error, dict) else None
        return McpMessage(
            kind="response",
            id=msg_id,
            is_error=True,
            error_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        )
    return McpMessage(kind="invalid", id=msg_id)


# 19+ digits in a row may be an integer past 64 bits, which orjson would turn into a float.
_LONG_NUMBER = re.compile(rb"\d{19}")


def loads(body: bytes) -> Any:
    """`json.loads`, the same values and errors, faster: orjson first (UTF-8, RFC 8259), the standard
    library for what orjson refuses (UTF-16/32 bodies, NaN, lone surrogates, nesting past 1024) or
    would decode differently (integers past 64 bits), so what is accepted and what it decodes to
    never changes."""
    if _LONG_NUMBER.search(body):
        return json.loads(body)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


# What orjson would not write back as decoded: NaN, Infinity and numbers past the float range
# (1e400: decoded as inf; orjson writes all three as null), integers past 64 bits (it refuses them),
# UTF-16/32 bodies (a NUL byte: never in UTF-8 JSON). Such a body is re-encoded by `json`.
_STDLIB_ONLY = re.compile(rb"\d{19}|NaN|Infinity|[eE][+-]?\d{3}|\x00")

# Digits folded to 0, E to e and - to +: `\d{19}` and `[eE][+-]?\d{3}` become substring searches.
_FOLD = bytes.maketrans(b"123456789E-", b"000000000e+")
_NINETEEN_DIGITS = b"0" * 19


def stdlib_only(source: bytes) -> bool:
    """Whether `_STDLIB_ONLY` occurs in `source`, without its regex scan (~20 ns a byte; this is
    a C translation and substring searches: 2.5x faster on a 100-byte call, 15x on 8 KB)."""
    # `find`, not `in`: CPython 3.11's `bytes in bytes` first tries the needle as an integer and
    # formats and clears a TypeError each time (~2.5x the cost of `find`; ~1,600 instructions).
    find = source.find
    if find(b"NaN") != -1 or find(b"Infinity") != -1 or find(b"\x00") != -1:
        return True
    folded = source.translate(_FOLD).find
    return folded(_NINETEEN_DIGITS) != -1 or folded(b"e000") != -1 or folded(b"e+000") != -1


def dumps(document: Any, source: bytes) -> bytes:
    """Compact JSON for a document `loads` decoded from `source`, after the proxy changed it.

    orjson (a sixth of `json.dumps`'s cost) unless `source` held what only the standard library
    reads, or orjson refuses the document (lone surrogates, nesting past 255): the values sent on
    are always those decoded. Non-ASCII text is written as UTF-8, not as `\\u` escapes.
    """
    if not stdlib_only(source):
        try:
            return orjson.dumps(document)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(document, separators=(",", ":")).encode()


def parse_body(body: bytes) -> ParsedBody:
    """Decode a POST body once: a single message or a batch. Raises `BodyError` for non-JSON."""
    try:
        decoded = loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: not a message
        raise BodyError("request body is not valid JSON") from None
    if isinstance(decoded, list):
        if not decoded:
            raise BodyError("empty JSON-RPC batch", INVALID_REQUEST)
        if len(decoded) > MAX_BATCH_MESSAGES:
            raise BodyError(
                f"a JSON-RPC batch may hold at most {MAX_BATCH_MESSAGES} messages", INVALID_REQUEST
            )
        return ParsedBody(tuple(parse_message(o) for o in decoded), tuple(decoded), batch=True)
    return ParsedBody((parse_message(decoded),), (decoded,), batch=False)


def parse_response_body(body: bytes) -> tuple[McpMessage, ...]:
    """Facts of an upstream JSON answer (single or batch); unparseable answers give no messages."""
    try:
        decoded = loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: not a message
        return ()
    items = decoded if isinstance(decoded, list) else [decoded]
    return tuple(parse_message(o) for o in items)


# An `isError` result: the key, JSON whitespace, a colon and `true` (`"isError": false` is common).
_IS_ERROR_TRUE = re.compile(rb'"isError"[ \t\r\n]*:[ \t\r\n]*true')


def holds_no_error(body: bytes) -> bool:
    """True when no message of the JSON answer `body` can be an error or an `isError` result.

    Such messages are written with the key `"error"`, or `"isError"` and `true`, and only a `\\u`
    escape could spell either otherwise: a body without them needs no parsing for its messages'
    outcomes (`parse_response_body` would find successes only, or nothing). That holds for UTF-8;
    a UTF-16 or UTF-32 answer (which `loads` decodes too) spells its keys with NUL bytes between
    the letters, so any NUL byte means parsing.
    """
    find = body.find  # not `in`: see `stdlib_only`
    return (
        find(b"\x00") == -1
        and find(b'"error"') == -1
        and find(b"\\u") == -1
        and _IS_ERROR_TRUE.search(body) is None
    )


def error_object(msg_id: JsonRpcId, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


def error_body(ids: tuple[JsonRpcId, ...] | None, code: int, message: str, *, batch: bool = False) -> bytes:
    """A JSON-RPC error answer for every request id of the body (one `null`-id error when unknown)."""
    if batch and ids:
        return json.dumps([error_object(i, code, message) for i in ids]).encode()
    msg_id = ids[0] if ids else None
    return json.dumps(error_object(msg_id, code, message)).encode()


def decode_header_value(value: str | None) -> str | None:
    """The stateless revision's header encoding: verbatim, or `=?base64?<b64>?=` for non-ASCII values."""
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    payload = value[len("=?base64?") : -2]
    try:
        return base64.b64decode(payload, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def routing_header_mismatch(headers: Mapping[str, str], parsed: ParsedBody) -> str | None:
    """Why `Mcp-Method` / `Mcp-Name` disagree with the body (stateless revision), or None when they agree.

    Headers are only checked when present: older revisions do not send them, and the app re-checks
    presence itself. A proxy that routed on a lying header would police the wrong call. Every value
    of a repeated header is checked: a router or app that reads the last (or all) must not see a call
    other than the one judged.
    """
    method_headers = header_values(headers, "Mcp-Method")
    name_headers = header_values(headers, "Mcp-Name")
    if not method_headers and not name_headers:
        return None
    if parsed.batch:
        return "Mcp-Method/Mcp-Name headers cannot describe a JSON-RPC batch"
    message, obj = parsed.messages[0], parsed.objects[0]
    if any(value != message.method for value in method_headers):
        return "Mcp-Method header does not match the request body's method"
    key = NAME_BEARING_METHODS.get(message.method or "")
    if key is not None and name_headers:
        params = obj.get("params") if isinstance(obj, dict) else None
        body_value = params.get(key) if isinstance(params, dict) else None
        if any(decode_header_value(value) != body_value for value in name_headers):
            return f"Mcp-Name header does not match the request body's {key!r} parameter"
    return None


def header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of a header: a multidict (aiohttp's request headers) holds each repeat, a plain
    mapping one at most."""
    getall = getattr(headers, "getall", None)
    if callable(getall):
        return list(getall(name, ()))
    value = headers.get(name)
    return [] if value is None else [value]


@dataclass(frozen=True)
class SseEvent:
    event: str | None
    data: str
    id: str | None


class SseParser:
    """Incremental text/event-stream parser: fed raw chunks, returns whole events (for facts, not relaying).

    The proxy relays the original bytes untouched; this only watches them, with a cap so a huge
    event cannot grow memory without bound (its data is dropped, the stream still flows).
    """

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        # Held bytes of a line not ended yet, cut in place: slicing off "the rest" at every line (and
        # searching all of it for both line ends) made a chunk of many lines quadratic.
        self._buffer = bytearray()
        self._scan = 0  # how far into `_buffer` no line end was found
        self._data: list[str] = []
        self._size = 0
        self._event: str | None = None
        self._id: str | None = None
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[SseEvent]:
        events: list[SseEvent] = []
        buf = self._buffer
        buf += chunk
        pos = 0
        while True:
            cut = _line_end(buf, max(pos, self._scan))
            if cut is None:
                # A lone CR at the end may be the first half of CRLF: searched again next time.
                self._scan = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
                del buf[:pos]
                self._scan -= pos
                if len(buf) > self._max:
                    buf.clear()
                    self._scan, self._data, self._size = 0, [], self._max + 1
                return events
            line_end, next_start = cut
            line = buf[pos:line_end].decode("utf-8", "replace")
            pos = next_start
            self._scan = 0
            if not line:
                if (self._data or self._event) and self._size <= self._max:
                    events.append(SseEvent(self._event, "\n".join(self._data), self._id))
                self._data, self._size, self._event = [], 0, None
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._size += len(value)
                if self._size <= self._max:
                    self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                self._id = value


class SseIds:
    """The `id:` values of a raw text/event-stream fed in any split (to bind them, not to relay).

    Only whole lines count: a line longer than `max_line` is skipped to its end, so a fragment in
    the middle of a long `data:` line is never read as an `id:` line.
    """

    def __init__(self, max_line: int = 1024) -> None:
        self._tail = b""
        self._skipping = False  # inside a line longer than max_line: drop it up to its end
        self._max = max_line

    def feed(self, chunk: bytes) -> list[str]:
        data = self._tail + chunk if self._tail else chunk
        cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if cut < 0:
            self._tail = b"" if self._skipping or len(data) > self._max else data
            self._skipping = self._skipping or len(data) > self._max
            return []
        whole, self._tail = data[: cut + 1], data[cut + 1 :]
        if self._skipping:
            self._skipping = False
            whole = whole[min(i for i in (whole.find(b"\n"), whole.find(b"\r")) if i >= 0) + 1 :]
        if len(self._tail) > self._max:
            self._tail, self._skipping = b"", True
        if not (whole.startswith(b"id") or b"\nid" in whole or b"\rid" in whole):
            return []  # no line starts with "id" (JSON-RPC's `"id":` inside data lines does not count)
        ids: list[str] = []
        for line in whole.splitlines():
            if line == b"id" or line.startswith(b"id:"):
                value = line[3:]
                ids.append((value[1:] if value.startswith(b" ") else value).decode("utf-8", "replace"))
        return ids


_LINE_BREAK = re.compile(rb"[\r\n]")


def _line_end(buffer: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """(end of the first line from `start`, start of the next) for \\n, \\r\\n or \\r line ends."""
    found = _LINE_BREAK.search(buffer, start)
    if found is None:
        return None
    at = found.start()
    if buffer[at] == 0x0A:
        return at, at + 1
    if at + 1 == len(buffer):
        return None  # might be the first half of \r\n
    return (at, at + 2) if buffer[at + 1] == 0x0A else (at, at + 1)


class SseTooLarge(ValueError):
    """An SSE event grew past the framer's limit without ending."""


_EVENT_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")


class SseFramer:
    """Cuts a raw text/event-stream into whole events (raw bytes, terminator included).

    Used where events must be judged or rewritten before they are relayed (the policy gate); a
    trailing lone `\\r` waits for the next chunk, since it may be the first half of `\\r\\n`.
    """

    def __init__(self, max_event_bytes: int = 16 << 20) -> None:
        self._buffer = bytearray()
        # Where the next search for an event's end starts: what came before it holds none. Searching
        # the whole held event again at every chunk made a large event (a long tools/list) arriving
        # in many chunks quadratic.
        self._resume = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buffer
        buf += chunk
        events: list[bytes] = []
        start = 0
        resume = -1
        for match in _EVENT_END.finditer(buf, self._resume):
            if match.end() == len(buf) and buf.endswith(b"\r"):
                resume = match.start()
                break
            events.append(bytes(buf[start : match.end()]))
            start = match.end()
        if resume < 0:
            # Searched to the end: the next search starts at the run of line ends the buffer ends in
            # (a terminator may continue it), never inside it, where it could pair differently.
            resume = len(buf)
            while resume > start and buf[resume - 1] in (0x0A, 0x0D):
                resume -= 1
        del buf[:start]
        self._resume = resume - start
        if len(buf) > self._max:
            raise SseTooLarge(f"an SSE event exceeded {self._max} bytes")
        return events


def event_message_data(raw: bytes) -> str | None:
    """The data of one whole SSE event when it is a `message` event (or an unnamed one, which carries
    JSON-RPC too) with data, else None."""
    if b"data" not in raw:
        return None
    data: list[str] = []
    event_name: str | None = None
    for line in raw.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event_name = value
    if not data or event_name not in (None, "message"):
        return None
    return "\n".join(data)


def rewrite_event(raw: bytes, rewrite: Callable[[str], str | None]) -> bytes:
    """`raw` (one whole event) with its data replaced by `rewrite(data)`, when that is not None.

    Only `message` events (or unnamed ones) carry JSON-RPC; the other lines are kept in order.
    """
    data = event_message_data(raw)
    if data is None:
        return raw
    new = rewrite(data)
    if new is None:
        return raw
    lines = raw.decode("utf-8", "replace").splitlines()
    out: list[str] = []
    placed = False
    for line in lines:
        if not line:
            continue
        if line.partition(":")[0] == "data":
            if not placed:
                out.extend("data: " + part for part in new.split("\n"))
                placed = True
            continue
        out.append(line)
    return ("\n".join(out) + "\n\n").encode()


def sse_message(obj: Any) -> bytes:
    """One JSON-RPC message as an SSE `message` event."""
    return b"event: message\ndata: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
