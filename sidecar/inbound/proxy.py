"""The authenticated MCP reverse proxy on 15006: authenticate, exchange the token, forward, stream back.

Speaks every MCP HTTP transport by forwarding bytes faithfully; it only reads the JSON-RPC facts
(once per message) for telemetry and audit, and rewrites what must change (Host, credentials).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from outrider.sidecar.exchange import ExchangeError, TokenExchanger
from outrider.sidecar.exchange.routing import IssuerExchangers
from outrider.sidecar.inbound import jsonrpc
from outrider.sidecar.inbound.auth import (
    WELL_KNOWN,
    AuthFailure,
    TokenVerifier,
    peer_spiffe_id,
    protected_resource_metadata,
)
from outrider.sidecar.inbound.callers import (
    CallerVerifier,
    Presented,
    challenge_headers,
    metadata_extras,
    presented_token,
    step_up_challenge,
)
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.inbound.cors import CorsPolicy
from outrider.sidecar.inbound.credentials import query_credential, token_elsewhere, token_in_body
from outrider.sidecar.inbound.jsonrpc import McpMessage, ParsedBody
from outrider.sidecar.inbound.legacy_streams import LegacySessions, session_of_endpoint
from outrider.sidecar.inbound.sessions import (
    SessionTable,
    decide,
    fingerprint,
    legacy_endpoint_session,
    owner_key,
    request_session_ids,
)
from outrider.sidecar.inbound.upstream_slots import UpstreamSlots
from outrider.sidecar.policy import gate as policy_gate
from outrider.sidecar.policy.gate import Gate, Judgement
from outrider.sidecar.telemetry.observer import (
    NULL_SCOPE,
    CallScope,
    ExchangeOutcome,
    NullObserver,
    Observer,
    PolicyOutcome,
    Principal,
    RequestInfo,
)

log = logging.getLogger("outrider.inbound.proxy")

# RFC 9110 §7.6.1 plus the de-facto ones; never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
STATELESS_VERSION = "2026-07-28"
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
JSON_CT = "application/json"
# MCP uses GET, POST and DELETE; the rest of the ordinary methods pass to the app, which decides.
# CONNECT and TRACE (and anything unknown) are refused: they make no sense for an MCP endpoint.
ALLOWED_METHODS = frozenset({"GET", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH"})
# Headers that state facts about the connection; only the sidecar may say them to the app.
# A caller-sent copy would reach the app (e.g. uvicorn trusts X-Forwarded-* from 127.0.0.1) as if
# the sidecar had vouched for it.
SPOOFABLE = frozenset({"forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "x-original-forwarded-for"})
# An unauthenticated body is only glanced at (for the audit record) when it is this small and
# arrives at once; anything else is never read.
DENIED_PEEK_BYTES = 65536
DENIED_PEEK_TIMEOUT_S = 1.0
_BODY_CREDENTIAL_MESSAGE = (
    "the bearer token was also sent in the request body; send it only in the Authorization header"
)
# Request headers never forwarded to the app, whatever the config (built once, not per request).
_ALWAYS_DROPPED = (
    HOP_BY_HOP
    | SPOOFABLE
    | {
        "host",
        "expect",  # answered by the proxy itself, after authentication
        "authorization",
        "dpop",  # a DPoP proof is made for the sidecar's URL: it means nothing to the app
        "content-length",
    }
)


@dataclass(frozen=True)
class Answer:
    """A response the proxy makes itself (errors); the body is a JSON-RPC error."""

    status: int
    body: bytes
    headers: Mapping[str, str]


def upstream_request_headers(
    incoming: Mapping[str, str],
    config: InboundConfig,
    connection_tokens: Iterable[str] = (),
    *,
    client: str | None = None,
    scheme: str = "http",
) -> CIMultiDict[str]:
    """What the app sees: no hop-by-hop headers, no caller credentials, Host of the app itself.

    Forwarding facts (`X-Forwarded-For`/`-Proto`) are the sidecar's own; caller-sent ones are dropped.
    """
    drop = _dropped(config.token_header)
    named = {t.strip().lower() for t in connection_tokens} - {""}
    if named:
        drop = drop | named
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        # `_`: CGI-style servers (WSGI, PHP) file `Mcp_Session_Id` under the name of `Mcp-Session-Id`,
        # so such a header would pass every check made on the other spelling (nginx drops them too).
        if lower in drop or lower.startswith("x-forwarded-") or "_" in lower:
            continue
        if name.isascii() and value.isascii():  # the common case of `_safe_header`, inline
            if "\r" in value or "\n" in value or "\x00" in value:
                continue
        elif not _safe_header(name, value):
            continue
        headers.add(name, value)
    # The SDK answers 421 to any Host but its own loopback one (DNS-rebinding protection).
    headers["Host"] = f"127.0.0.1:{config.mcp_port}"
    if client:
        headers["X-Forwarded-For"] = client
    headers["X-Forwarded-Proto"] = scheme
    return headers


@functools.lru_cache(maxsize=8)
def _dropped(token_header: str | None) -> frozenset[str]:
    return _ALWAYS_DROPPED | {(token_header or "authorization").lower()}


def _safe_header(name: str, value: str) -> bool:
    """Only what can be written back on the wire as received (aiohttp decodes raw bytes leniently)."""
    if name.isascii() and value.isascii():  # the common case, without encoding anything
        return "\r" not in value and "\n" not in value and "\x00" not in value
    try:
        name.encode("ascii")
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return "\r" not in value and "\n" not in value and "\x00" not in value


# Request bodies aiohttp's parser decodes itself (`Content-Encoding`, one value, any case): what the
# proxy reads, judges and forwards is then the decoded body, which must not go on labelled encoded.
_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})


def _decoded(encoding: str) -> bool:
    return encoding.isascii() and encoding.lower() in _DECODED_ENCODINGS


def _too_big(limit: int) -> Answer:
    return Answer(
        413,
        jsonrpc.error_body(None, jsonrpc.INVALID_REQUEST, f"request body exceeds the {limit}-byte limit"),
        {"Connection": "close"},
    )


def _parse(body: bytes) -> tuple[ParsedBody | None, jsonrpc.BodyError | None]:
    """The body's messages; an unparseable body is recorded as one invalid message (audit sees it)."""
    if not body:
        return None, None
    try:
        return jsonrpc.parse_body(body), None
    except jsonrpc.BodyError as exc:
        return ParsedBody((McpMessage(kind="invalid"),), (None,), False), exc


async def _peek_body(request: web.BaseRequest) -> bytes | None:
    """A small body the caller already sent in full, for the audit record of a refused call; else None."""
    length = request.content_length
    if length is None or not 0 < length <= DENIED_PEEK_BYTES:
        return None
    try:
        async with asyncio.timeout(DENIED_PEEK_TIMEOUT_S):
            return await request.content.readexactly(length)
    except (TimeoutError, asyncio.IncompleteReadError, aiohttp.ClientError, OSError):
        return None


_ANSWER_DROPPED = HOP_BY_HOP | {"content-length", "date", "server"}


def downstream_response_headers(upstream: Mapping[str, str], *, streaming: bool) -> CIMultiDict[str]:
    connection = upstream.get("Connection")
    drop = _ANSWER_DROPPED
    if connection:
        drop = drop | {t.strip().lower() for t in connection.split(",") if t.strip()}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in drop:
            headers.add(name, value)
    return headers


def classify_transport(
    method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str], config: InboundConfig
) -> str:
    if method == "GET" and path == config.legacy_sse_path:
        return "sse-legacy"
    if method == "POST" and "session_id" in query and "Mcp-Session-Id" not in headers:
        return "sse-legacy"
    version = headers.get("MCP-Protocol-Version")
    if "Mcp-Method" in headers or (version is not None and version >= STATELESS_VERSION):
        return "stateless"
    return "streamable-http"


def _policy_outcome(verdict: policy_gate.Verdict) -> PolicyOutcome:
    decision = {"ok": "allow", "denied": "deny", "limited": "rate_limited"}.get(verdict.outcome, "invalid")
    if verdict.outcome == "limited":
        rate = "store_unavailable" if verdict.store_error else "limited"
    elif verdict.store_error:
        rate = "store_unavailable"
    else:
        rate = None
    return PolicyOutcome(
        decision=decision,
        policies=verdict.decision.policies if verdict.decision is not None else (),
        rate_limit=rate,
        retry_after_s=verdict.retry_after_s or None,
    )


def rewrite_endpoint_data(data: str) -> str:
    """A legacy `endpoint` event must point back through the proxy: keep it relative (path + query)."""
    parts = urlsplit(data.strip())
    if not parts.scheme and not parts.netloc:
        return data
    return urlunsplit(("", "", parts.path or "/", parts.query, ""))


def rewrite_first_event(raw: bytes) -> bytes:
    """Rewrite the `data:` of an `endpoint` event in one complete raw SSE event."""
    text = raw.decode("utf-8", "replace")
    lines = text.splitlines(keepends=True)
    if not any(
        line.rstrip("\r\n") == "event: endpoint" or line.rstrip("\r\n") == "event:endpoint" for line in lines
    ):
        return raw
    out = []
    for line in lines:
        if line.startswith("data:"):
            body = line[5:].rstrip("\r\n")
            ending = line[len(line.rstrip("\r\n")) :]
            out.append("data: " + rewrite_endpoint_data(body.removeprefix(" ")) + ending)
        else:
            out.append(line)
    return "".join(out).encode()


def _event_end(buffer: bytes) -> int | None:
    for sep in (b"\r\n\r\n", b"\n\n", b"\r\r"):
        at = buffer.find(sep)
        if at != -1:
            return at + len(sep)
    return None


_REQUEST_INFOS_MAX = 1024
# `RequestInfo`'s fields but the trace headers: method, transport, protocol version, session, client.
_RequestFacts = tuple[str, str, str | None, str | None, str | None]

# What the calls of a request carry when nothing records them (NullObserver never reads it).
_UNRECORDED_INFO = RequestInfo(http_method="", transport="")


class Calls:
    """The observer scopes of one HTTP request: one per JSON-RPC message, each finished exactly once.

    A context manager: leaving it exits every message's scope, last first, as an `ExitStack` of them
    would (a scope records a call left unanswered, with the exception that left it), without the
    stack's cost per request (~1-2 us for one message).
    """

    def __init__(self, observer: Observer, parsed: ParsedBody | None, info: RequestInfo) -> None:
        self.parsed = parsed
        # Set when the policy gate is active: whose answers to filter, and the errors for refused
        # requests that must join the answer of the ones that were forwarded.
        self.principal: Principal | None = None
        self.extra: list[dict[str, Any]] = []
        self.scopes: list[CallScope] = []
        self._open: dict[int, tuple[CallScope, McpMessage]] = {}
        self._by_id: dict[Any, int] = {}
        self._entered: list[AbstractContextManager[CallScope]] = []  # the scopes' managers, to exit
        if parsed is None:
            return
        records = not isinstance(observer, NullObserver)
        try:
            for index, message in enumerate(parsed.messages):
                # NullObserver's scope records nothing: one shared no-op scope, no context manager.
                if records:
                    manager = observer.mcp_call(message, info)
                    scope = manager.__enter__()
                    self._entered.append(manager)
                else:
                    scope = NULL_SCOPE
                self.scopes.append(scope)
                self._open[index] = (scope, message)
                if message.kind == "request" and message.id is not None:
                    self._by_id[message.id] = index
        except BaseException as exc:  # the scopes opened so far still end (`with` never entered)
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def __enter__(self) -> Calls:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Exit every scope, last first; one that raises does not keep the others from exiting.

        Never suppresses the exception (no scope does).
        """
        entered, self._entered = self._entered, []
        raised: BaseException | None = None
        for manager in reversed(entered):
            try:
                manager.__exit__(kind, exc, tb)
            except BaseException as error:
                raised = error
        if raised is not None:
            raise raised

    @property
    def pending(self) -> bool:
        return bool(self._by_id)

    def ids(self) -> tuple[jsonrpc.JsonRpcId, ...]:
        if self.parsed is None:
            return ()
        return tuple(m.id for m in self.parsed.messages if m.kind == "request")

    def each(self) -> Iterable[CallScope]:
        return self.scopes

    def refuse(self, index: int, *, http_status: int, outcome: str, error_type: str, reason: str) -> None:
        """Finish one message the policy gate refused (it is never forwarded)."""
        entry = self._open.pop(index, None)
        if entry is None:
            return
        scope, message = entry
        if message.kind == "request" and self._by_id.get(message.id) == index:
            del self._by_id[message.id]
        scope.finish(http_status=http_status, outcome=outcome, error_type=error_type, reason=reason)

    def answered(self, response: McpMessage, http_status: int) -> None:
        index = self._by_id.pop(response.id, None)
        if index is None:
            return
        scope, _ = self._open.pop(index)
        if not response.is_error:
            scope.finish(http_status=http_status, outcome="ok", response=response)
        elif response.error_code is None:
            scope.finish(
                http_status=http_status, outcome="tool_error", error_type="tool_error", response=response
            )
        else:
            scope.finish(
                http_status=http_status,
                outcome="error",
                error_type=str(response.error_code),
                response=response,
            )

    def finish_all(
        self, *, http_status: int, outcome: str, error_type: str | None = None, reason: str | None = None
    ) -> None:
        for scope, _ in self._open.values():
            scope.finish(http_status=http_status, outcome=outcome, error_type=error_type, reason=reason)
        self._open.clear()
        self._by_id.clear()


def upstream_sender(session: aiohttp.ClientSession) -> Callable[..., Awaitable[aiohttp.ClientResponse]]:
    """The coroutine `ClientSession.request` wraps (`_request`): the wrapper is a subscripted generic
    whose call runs typing's Python code and drops an AttributeError per request, for an `async with`
    the proxy does not use. It is aiohttp's private name, so the public method (awaitable too) stands
    in should a release rename it."""
    private = getattr(session, "_request", None)
    return private if callable(private) else session.request


class InboundProxy:
    """The request handler; state is per instance (config, verifier, exchanger, upstream session)."""

    def __init__(
        self,
        config: InboundConfig,
        *,
        observer: Observer,
        verifier: TokenVerifier | CallerVerifier | None,
        exchanger: TokenExchanger | IssuerExchangers | None,
        upstream: aiohttp.ClientSession,
        gate: Gate | None = None,
    ) -> None:
        self.config = config
        self.gate = gate
        self.legacy_streams = LegacySessions()
        self.observer = observer
        # Nothing records the answers' facts: JSON answers and SSE events are not parsed for them.
        self.records = not isinstance(observer, NullObserver)
        # `RequestInfo`s without trace headers by their facts (`_request_info`; bounded: session ids
        # and client addresses come from callers).
        self._request_infos: dict[_RequestFacts, RequestInfo] = {}
        self.verifier = verifier
        self.exchanger = exchanger
        self.upstream = upstream
        self._send_upstream = upstream_sender(upstream)
        self.base = f"http://127.0.0.1:{config.mcp_port}"
        self.requests_total = 0
        self.metadata_requests_total = 0
        self.denied_total = 0
        self.upstream_errors_total = 0
        self.sessions = SessionTable(config.sessions) if config.sessions.enabled else None
        # SSE event ids relayed to each caller: a `Last-Event-ID` resumes a stream, and the SDK's
        # event store replays any session's stream by its event id alone.
        self.event_ids = SessionTable(config.sessions) if config.sessions.enabled else None
        self.slots = UpstreamSlots(
            config.upstream_max_connections,
            config.upstream_max_connections_per_caller,
            config.upstream_wait_s,
        )
        self.session_refusals_total = 0
        # None unless origins are listed: then `handler()` wraps `dispatch` and `_stream` decorates.
        self.cors = CorsPolicy(config.cors) if config.cors.enabled else None
        # Requests aiohttp could not parse as HTTP (they never reach `handle`); set by the component.
        self.malformed_count: Callable[[], int] = lambda: 0

    def handler(self) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """What serves 15006: `dispatch`, behind the CORS policy when one is configured."""
        return self.dispatch if self.cors is None else self.cors.wrap(self.dispatch)

    def dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        """Every request on 15006: the RFC 9728 metadata (public), else the proxy pipeline.

        Returns the chosen handler's coroutine rather than awaiting it: one coroutine frame fewer
        that every resumption of the request would pass through.
        """
        path = request.path
        if request.method in ("GET", "HEAD") and (path == WELL_KNOWN or path.startswith(WELL_KNOWN + "/")):
            return self.metadata(request)
        return self.handle(request)

    async def metadata(self, request: web.BaseRequest) -> web.Response:
        self.metadata_requests_total += 1
        if not self.config.resource:
            return web.json_response(
                {"error": "this MCP server has no OAuth resource configured"}, status=404
            )
        document = protected_resource_metadata(self.config) | metadata_extras(self.config)
        return web.json_response(document, headers={"Cache-Control": "max-age=300"})

    # -- the pipeline ---------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests_total += 1
        headers = request.headers
        if request.method not in ALLOWED_METHODS:
            return self._answer(
                Answer(
                    405,
                    jsonrpc.error_body(
                        None, jsonrpc.INVALID_REQUEST, f"method {request.method} is not allowed"
                    ),
                    {"Allow": ", ".join(sorted(ALLOWED_METHODS))},
                )
            )
        if not request.rel_url.raw_path.startswith("/"):
            # `OPTIONS *` or an authority-form target: nothing on the app to forward it to.
            return self._answer(
                Answer(
                    400,
                    jsonrpc.error_body(None, jsonrpc.INVALID_REQUEST, "the request target must be a path"),
                    {},
                )
            )
        info = self._request_info(request) if self.records else _UNRECORDED_INFO
        # Authenticate from the headers alone, before the body: an unauthenticated caller never
        # makes the proxy buffer (or even wait for) a request body.
        credential = presented_token(headers.get("Authorization"))
        presented = (
            None
            if credential is None
            else Presented(*credential, tuple(headers.getall("DPoP", ())), request.method, request.path)
        )
        token = presented.token if presented is not None else None
        principal = self._query_credential(request) or await self._authenticate(request, presented)
        if not isinstance(principal, AuthFailure) and token is not None:
            # Only a verified token is looked for elsewhere (a junk short one would match anything).
            principal = self._token_elsewhere(request, token) or principal
        if isinstance(principal, AuthFailure):
            return await self._deny(request, principal, info)
        owner = owner_key(principal)
        if not self._owns_sessions(request, owner):
            return await self._refuse_session(request, principal, info)
        body = b""
        if request.method in ("POST", "PUT", "PATCH") or request.can_read_body:
            if headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
                # Only an authenticated caller is invited to send its body.
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            read = await self._read_body(request)
            if isinstance(read, Answer):
                return self._answer(read)
            body = read
        parsed, parse_error = _parse(body)
        with Calls(self.observer, parsed, info) as calls:
            for scope in calls.each():
                scope.set_principal(principal)
            if token is not None and token_in_body(token, body):
                answer = Answer(
                    400,
                    jsonrpc.error_body(
                        calls.ids(),
                        jsonrpc.INVALID_REQUEST,
                        _BODY_CREDENTIAL_MESSAGE,
                        batch=bool(parsed and parsed.batch),
                    ),
                    {},
                )
                return self._fail(calls, answer, "denied", "credential_misplaced", _BODY_CREDENTIAL_MESSAGE)
            try:
                return await self._handle_calls(
                    request, body, parsed, calls, parse_error, principal, presented, owner
                )
            except asyncio.CancelledError:
                # The client went away (aiohttp cancels the handler): every open call still ends.
                calls.finish_all(http_status=499, outcome="error", error_type="client_disconnected")
                raise

    def _request_info(self, request: web.BaseRequest) -> RequestInfo:
        """The transport facts the observer records for each call of the request.

        One (frozen) `RequestInfo` per distinct facts when the request carries no trace headers:
        building one costs ~1.5 us, a lookup a tenth of that.
        """
        headers = request.headers
        trace = {k: v for k in TRACE_HEADERS if (v := headers.get(k)) is not None}
        facts: _RequestFacts = (
            request.method,
            self._transport(request),
            headers.get("MCP-Protocol-Version"),
            headers.get("Mcp-Session-Id"),
            request.remote,
        )
        if trace:
            return RequestInfo(*facts, headers=trace)
        infos = self._request_infos
        info = infos.get(facts)
        if info is None:
            if len(infos) >= _REQUEST_INFOS_MAX:
                infos.clear()
            info = infos[facts] = RequestInfo(*facts)
        return info

    def _transport(self, request: web.BaseRequest) -> str:
        return classify_transport(request.method, request.path, request.headers, request.query, self.config)

    # -- sessions (the decisions live in sessions.py) ------------------------------------------------

    def _owns_sessions(self, request: web.BaseRequest, owner: str) -> bool:
        """Whether the caller owns every session the request names; an unbound id is nobody's (404)."""
        if self.sessions is None:
            return True
        header, query = request.headers.get("Mcp-Session-Id"), request.query
        if self.event_ids is not None and "Last-Event-ID" in request.headers:
            resumed = request.headers.getall("Last-Event-ID", ())
            if not all(decide(self.event_ids.owner(e.strip()), owner) == "owner" for e in resumed):
                return False  # an event id this sidecar never relayed to the caller
        if header is None and not query:
            return True  # names no session (request_session_ids would give none)
        ids = request_session_ids(request.headers.getall("Mcp-Session-Id", ()), query.items())
        return all(decide(self.sessions.owner(sid), owner) == "owner" for sid in ids)

    async def _refuse_session(
        self, request: web.BaseRequest, principal: Principal, info: RequestInfo
    ) -> web.Response:
        """404 exactly as the MCP server answers an unknown session, and a denied audit record."""
        self.session_refusals_total += 1
        log.warning(
            "refused a request for an MCP session this caller did not create, or for an SSE "
            "event id it was not sent (session %s)",
            ",".join(
                fingerprint(sid)
                for sid in request_session_ids(
                    request.headers.getall("Mcp-Session-Id", ()), request.query.items()
                )
            ),
        )
        parsed = await self._peek_parsed(request) or ParsedBody((McpMessage(kind="invalid"),), (None,), False)
        with Calls(self.observer, parsed, info) as calls:
            for scope in calls.each():
                scope.set_principal(principal)
            calls.finish_all(
                http_status=404,
                outcome="denied",
                error_type="session_not_owned",
                reason="the MCP session was not created by this caller (or is unknown to the sidecar)",
            )
        if "Mcp-Session-Id" not in request.headers:
            # The 2024-11-05 SSE transport's own answer for an unknown `session_id`.
            return web.Response(status=404, text="Could not find session")
        return self._answer(
            Answer(404, jsonrpc.error_body(None, jsonrpc.INVALID_REQUEST, "Session not found"), {})
        )

    def _track_session(
        self,
        request: web.BaseRequest,
        parsed: ParsedBody | None,
        owner: str,
        status: int,
        answered: str | None,
    ) -> None:
        """Bind a session `initialize` opened; forget one the caller deleted or the server does not know."""
        if self.sessions is None:
            return
        asked = request.headers.get("Mcp-Session-Id")
        if asked is not None:
            if (request.method == "DELETE" and 200 <= status < 300) or status == 404:
                self.sessions.forget(asked.strip())
            return
        opens = parsed is not None and any(
            m.kind == "request" and m.method == "initialize" for m in parsed.messages
        )
        bindable = request.method == "POST" and opens and answered is not None and status < 400
        if bindable and answered is not None and not self.sessions.bind(answered.strip(), owner):
            log.warning(
                "the MCP server answered initialize with session %s, which is not bindable "
                "or belongs to another caller: it will be refused",
                fingerprint(answered),
            )

    def _bind_event_ids(self, event_ids: list[str], owner: str) -> None:
        """Bind the SSE event ids relayed to `owner`, so only they may resume after them."""
        if self.event_ids is not None:
            for event_id in event_ids:
                self.event_ids.bind(event_id.strip(), owner)

    async def _peek_parsed(self, request: web.BaseRequest) -> ParsedBody | None:
        if not request.body_exists:
            return None
        peeked = await _peek_body(request)
        parsed, _ = _parse(peeked) if peeked else (None, None)
        return parsed

    async def _deny(self, request: web.BaseRequest, failure: AuthFailure, info: RequestInfo) -> web.Response:
        """Refuse an unauthenticated request; its body is only glanced at when small and already sent."""
        self.denied_total += 1
        parsed: ParsedBody | None = None
        if request.body_exists:
            parsed = await self._peek_parsed(request)
            if parsed is None:
                # The body was not read (too big, chunked or slow): audit still sees the refusal.
                parsed = ParsedBody((McpMessage(kind="invalid"),), (None,), False)
        with Calls(self.observer, parsed, info) as calls:
            answer = Answer(
                failure.status,
                jsonrpc.error_body(
                    calls.ids(),
                    jsonrpc.UNAUTHORIZED,
                    failure.description,
                    batch=bool(parsed and parsed.batch),
                ),
                challenge_headers(failure, self.config),
            )
            return self._fail(
                calls, answer, "denied", failure.error or "unauthenticated", failure.description
            )

    async def _handle_calls(
        self,
        request: web.BaseRequest,
        body: bytes,
        parsed: ParsedBody | None,
        calls: Calls,
        parse_error: jsonrpc.BodyError | None,
        principal: Principal,
        presented: Presented | None,
        owner: str,
    ) -> web.StreamResponse:
        if parse_error is not None:
            answer = Answer(400, jsonrpc.error_body(None, parse_error.code, str(parse_error)), {})
            return self._fail(calls, answer, "error", "parse_error")
        if parsed is not None and (why := jsonrpc.routing_header_mismatch(request.headers, parsed)):
            answer = Answer(400, jsonrpc.error_body(calls.ids(), jsonrpc.HEADER_MISMATCH, why), {})
            return self._fail(calls, answer, "error", "header_mismatch", why)
        judgement: Judgement | None = None
        if self.gate is not None and self.gate.active:
            calls.principal = principal
            if parsed is None and request.method in ("POST", "PUT", "PATCH"):
                # Nothing the gate can judge: refused, never passed on for the app to interpret.
                answer = Answer(
                    400, jsonrpc.error_body(None, jsonrpc.INVALID_REQUEST, "empty request body"), {}
                )
                return self._fail(calls, answer, "error", "empty_body")
            if parsed is not None:
                # Judged before the token exchange: a refused call costs no IdP round trip.
                judgement = await self.gate.judge(principal, parsed, self._transport(request))
                refused = self._apply_judgement(request, parsed, judgement, calls, principal)
                if refused is not None:
                    return refused
        connection = request.headers.get("Connection")
        out_headers = upstream_request_headers(
            request.headers,
            self.config,
            connection.split(",") if connection else (),
            client=request.remote,
            scheme=request.scheme,
        )
        if (encoding := out_headers.get("Content-Encoding")) is not None and _decoded(encoding):
            del out_headers["Content-Encoding"]  # the body read is the decoded one
        if self.cors is not None:
            self.cors.vouch(request, out_headers)
        exchanger = (
            self.exchanger.for_issuer(principal.issuer)
            if isinstance(self.exchanger, IssuerExchangers)
            else self.exchanger
        )
        if presented is not None and principal.kind == "oidc" and exchanger is not None:
            failure = await self._exchange(exchanger, presented, calls, out_headers)
            if failure is not None:
                return failure
        body = self._inject_context(calls, out_headers, parsed, body)
        if judgement is not None and parsed is not None:
            # Only what was judged goes on, re-encoded: the app never parses bytes the gate did not
            # (duplicate keys, odd encodings), and refused batch members are left out.
            document = policy_gate.forwarded_document(parsed, judgement)
            body = json.dumps(document, separators=(",", ":")).encode()
        return await self._forward(request, body, out_headers, calls, owner)

    def _apply_judgement(
        self,
        request: web.BaseRequest,
        parsed: ParsedBody,
        judgement: Judgement,
        calls: Calls,
        principal: Principal,
    ) -> web.StreamResponse | None:
        """Record the gate's verdicts; answer now when nothing is left to forward."""
        for index, (scope, verdict) in enumerate(zip(calls.scopes, judgement.verdicts, strict=True)):
            if verdict.decision is None and verdict.outcome == "ok" and not verdict.store_error:
                continue
            scope.policy(_policy_outcome(verdict))
            if verdict.forward:
                continue
            if verdict.outcome == "limited":
                status, error_type = 429, "rate_limited"
            elif verdict.outcome == "invalid":
                status, error_type = 400, "invalid_request"
            else:
                status, error_type = 200, "policy_denied"
            calls.refuse(
                index,
                http_status=status,
                outcome="denied" if verdict.outcome != "invalid" else "error",
                error_type=error_type,
                reason=verdict.reason,
            )
        if not judgement.refused:
            return None
        errors = policy_gate.refused_errors(parsed, judgement)
        legacy = request.method == "POST" and "session_id" in request.query
        if legacy and self.legacy_streams.deliver(request.query.get("session_id", ""), principal, errors):
            # The 2024-11-05 transport answers on the session's SSE stream; the POST only gets 202.
            if judgement.nothing_to_forward:
                return web.Response(status=202, text="Accepted")
            return None
        if not judgement.nothing_to_forward:
            calls.extra.extend(errors)
            return None
        headers: dict[str, str] = {}
        outcomes = {v.outcome for v in judgement.verdicts if not v.forward}
        if "limited" in outcomes and "denied" not in outcomes:
            status = 429
            headers["Retry-After"] = str(judgement.retry_after_s)
        elif outcomes == {"invalid"}:
            status = 400
        elif not errors:
            # Only notifications, none let through: there is no JSON-RPC answer to one, so the
            # caller sees what a server that ignores a notification sends (the audit has the denial).
            return web.Response(status=202)
        else:
            status = 200
        body = policy_gate.refusal_body(parsed, judgement) if errors else b""
        return self._answer(Answer(status, body, headers))

    async def _read_body(self, request: web.BaseRequest) -> bytes | Answer:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_big(limit)
        content = request.content
        chunks: list[bytes] = []
        size = 0
        try:
            # `at_eof`: the whole body is in (the common case: one chunk), so no read just to learn that.
            while not content.at_eof():
                chunk = await content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    return _too_big(limit)
                chunks.append(chunk)
        except web.RequestPayloadError:
            # aiohttp decodes gzip/deflate/br/zstd bodies as they arrive; this one did not decode.
            message = "the request body does not decode as its Content-Encoding says"
            return Answer(
                400, jsonrpc.error_body(None, jsonrpc.INVALID_REQUEST, message), {"Connection": "close"}
            )
        return b"".join(chunks)

    def _query_credential(self, request: web.BaseRequest) -> AuthFailure | None:
        """A credential parameter in the URL is refused, never stripped (docs/inbound.md)."""
        name = query_credential(request.query.keys())
        if name is None:
            return None
        return AuthFailure(
            400,
            "invalid_request",
            f"credentials are not accepted in the query string (parameter {name!r}); "
            "send the token in the Authorization header",
        )

    def _token_elsewhere(self, request: web.BaseRequest, token: str) -> AuthFailure | None:
        """The caller's token in the URL or another header would reach the MCP server: refused."""
        where = token_elsewhere(token, request.rel_url.raw_path_qs, request.headers.items())
        if where is None:
            return None
        return AuthFailure(
            400,
            "invalid_request",
            f"the bearer token was also sent in {where}; send it only in the Authorization header",
        )

    async def _authenticate(
        self, request: web.BaseRequest, presented: Presented | None
    ) -> Principal | AuthFailure:
        if len(request.headers.getall("Authorization", ())) > 1:
            # Which one would the app believe? Refuse rather than guess (RFC 9110: not a list header).
            return AuthFailure(401, "invalid_request", "more than one Authorization header")
        if presented is not None:
            if self.verifier is None:
                return AuthFailure(401, "invalid_token", "bearer tokens are not accepted by this server")
            if isinstance(self.verifier, CallerVerifier):
                return await self.verifier.authenticate(presented)
            if presented.scheme != "bearer":
                return AuthFailure(401, "invalid_request", "this server does not accept DPoP tokens")
            return await self.verifier.verify(presented.token, fingerprint=presented.fingerprint)
        if request.headers.get("Authorization"):
            return AuthFailure(401, "invalid_request", "the Authorization header is not a Bearer token")
        if self.config.mtls.enabled and request.transport is not None:
            peer = peer_spiffe_id(request.transport.get_extra_info("peercert"))
            if peer is not None:
                if self.config.mtls.allows(peer):
                    return Principal(kind="spiffe", subject=peer)
                return AuthFailure(
                    403, "insufficient_scope", "this SPIFFE ID is not allowed to call this server"
                )
        if self.config.allow_unauthenticated:
            return Principal(kind="anonymous", subject="anonymous")
        return AuthFailure(401, None, "authentication required")

    async def _exchange(
        self, exchanger: TokenExchanger, presented: Presented, calls: Calls, headers: CIMultiDict[str]
    ) -> web.StreamResponse | None:
        started = time.perf_counter()
        try:
            # The digest authentication computed: the token is hashed once per request.
            issued = await exchanger.exchange(presented.token, subject_hash=presented.fingerprint)
        except ExchangeError as exc:
            outcome = ExchangeOutcome(
                outcome=exc.outcome,
                reason=exc.message,
                idp_status=exc.idp_status,
                duration_s=time.perf_counter() - started,
            )
            for scope in calls.each():
                scope.token_exchange(outcome)
            message = f"token exchange failed: {exc.message}"
            # A step-up (Conditional Access) reaches the MCP client as a challenge it can act on.
            challenge = step_up_challenge(exc, self.config) if exc.step_up else {}
            answer = Answer(
                exc.http_status, jsonrpc.error_body(calls.ids(), jsonrpc.UPSTREAM_ERROR, message), challenge
            )
            return self._fail(calls, answer, "error", f"exchange_{exc.outcome}", exc.message)
        if self.records:  # (nothing records the outcome of a successful exchange otherwise)
            outcome = ExchangeOutcome.succeeded(
                "cache_hit" if issued.cache_hit else "issued", issued.audience, time.perf_counter() - started
            )
            for scope in calls.each():
                scope.token_exchange(outcome)
        header = self.config.token_header or "Authorization"
        if header.lower() == "authorization":
            headers["Authorization"] = f"Bearer {issued.access_token}"
        else:
            headers[header] = issued.access_token
        return None

    def _inject_context(
        self, calls: Calls, headers: CIMultiDict[str], parsed: ParsedBody | None, body: bytes
    ) -> bytes:
        if parsed is None or not self.records:
            # Nothing records the call, so nothing puts trace context anywhere: the body goes as sent.
            return body
        changed = False
        plain: dict[str, str] = {}
        for scope, obj in zip(calls.scopes, parsed.objects, strict=True):
            # The scope says whether it changed the message: no copy of `_meta` to compare against.
            if scope.inject_context(plain, obj if isinstance(obj, dict) else None):
                changed = True
        for name, value in plain.items():
            headers[name] = value
        if not changed:
            return body
        document = list(parsed.objects) if parsed.batch else parsed.objects[0]
        return jsonrpc.dumps(document, body)

    async def _forward(
        self, request: web.BaseRequest, body: bytes, headers: CIMultiDict[str], calls: Calls, owner: str
    ) -> web.StreamResponse:
        # rel_url, not raw_path: an absolute-form target (`POST http://elsewhere/x`) must not pick the host.
        url = URL(self.base + (request.rel_url.raw_path_qs or "/"), encoded=True)
        if not self.slots.take_free(owner):
            busy = await self.slots.acquire(owner)
            if busy is not None:
                return self._busy(calls, busy)
        try:
            return await self._forward_held(request, url, body, headers, calls, owner)
        finally:
            self.slots.release(owner)

    def _busy(self, calls: Calls, limit: str) -> web.Response:
        """Every upstream connection (or this caller's share) is held: refuse now, never queue forever."""
        if limit == "caller":
            message = (
                "this caller already holds its share of connections to the MCP server "
                "(inbound.upstream_max_connections_per_caller); close a stream or retry later"
            )
        else:
            message = "the MCP server's connections are all in use; retry later"
        log.warning(
            "refused a request: no free connection to the MCP server (%s limit: %d in use)",
            limit,
            self.slots.held,
        )
        answer = Answer(
            503, jsonrpc.error_body(calls.ids(), jsonrpc.INTERNAL_ERROR, message), {"Retry-After": "1"}
        )
        return self._fail(calls, answer, "error", "upstream_busy", message)

    async def _forward_held(
        self,
        request: web.BaseRequest,
        url: URL,
        body: bytes,
        headers: CIMultiDict[str],
        calls: Calls,
        owner: str,
    ) -> web.StreamResponse:
        try:
            async with asyncio.timeout(self.config.upstream_timeout_s):
                # The coroutine `ClientSession.request` wraps: its wrapper is a subscripted generic
                # (`_RequestContextManager`), whose call runs typing's Python code and sets and drops
                # an AttributeError (`__orig_class__` on a slotted object) per request, for an
                # `async with` the proxy does not use.
                upstream = await self._send_upstream(
                    request.method, url, headers=headers, data=body if body else None, allow_redirects=False
                )
        except TimeoutError:
            self.upstream_errors_total += 1
            return self._fail(
                calls,
                self._upstream_answer(calls, 504, "the MCP server did not answer in time"),
                "error",
                "timeout",
            )
        except aiohttp.ClientError as exc:
            self.upstream_errors_total += 1
            log.warning(
                "MCP server on 127.0.0.1:%d unreachable: %s", self.config.mcp_port, type(exc).__name__
            )
            return self._fail(
                calls,
                self._upstream_answer(calls, 502, "the MCP server is not reachable"),
                "error",
                "upstream_unreachable",
            )
        self._track_session(
            request, calls.parsed, owner, upstream.status, upstream.headers.get("Mcp-Session-Id")
        )
        try:
            content_type = upstream.headers.get("Content-Type", "")
            if content_type.startswith("text/event-stream"):
                return await self._stream(request, upstream, calls, owner)
            return await self._buffered(upstream, calls)
        finally:
            # An answer read to its end has released its connection already (`closed`); closing it
            # again would only mark its drained content as cut (through asyncio.isfuture, which
            # sets and drops an AttributeError for aiohttp's StreamReader).
            if not upstream.closed:
                upstream.close()

    async def _buffered(self, upstream: aiohttp.ClientResponse, calls: Calls) -> web.StreamResponse:
        try:
            if upstream.content.is_eof():
                # The whole answer came with its headers (the common case): reading it cannot wait,
                # so no timer is armed (and cancelled) for it.
                payload = await upstream.read()
            else:
                async with asyncio.timeout(self.config.upstream_timeout_s):
                    payload = await upstream.read()
        except TimeoutError:
            self.upstream_errors_total += 1
            return self._fail(
                calls,
                self._upstream_answer(calls, 504, "the MCP server did not finish its answer in time"),
                "error",
                "timeout",
            )
        except aiohttp.ClientError:
            self.upstream_errors_total += 1
            return self._fail(
                calls,
                self._upstream_answer(calls, 502, "the MCP server broke off its answer"),
                "error",
                "upstream_reset",
            )
        status = upstream.status
        if (
            calls.pending
            and self.records
            and not (status < 400 and jsonrpc.holds_no_error(payload))
            and upstream.headers.get("Content-Type", "").startswith(JSON_CT)
        ):
            # Only an answer that may hold errors is parsed: a call answered with a success is
            # recorded by `finish_all` below as `answered` would record it ("ok", the same status).
            for message in jsonrpc.parse_response_body(payload):
                calls.answered(message, status)
        headers = downstream_response_headers(upstream.headers, streaming=False)
        if calls.principal is not None and self.gate is not None:
            if headers.get("Content-Type", "").startswith(JSON_CT):
                payload = await self.gate.filter_answer(calls.principal, payload)
            payload, status = self._gated_payload(payload, status, calls, headers)
        outcome = "ok" if status < 400 else "error"
        calls.finish_all(
            http_status=status, outcome=outcome, error_type=None if status < 400 else str(status)
        )
        return web.Response(status=status, body=payload, headers=headers)

    def _gated_payload(
        self, payload: bytes, status: int, calls: Calls, headers: CIMultiDict[str]
    ) -> tuple[bytes, int]:
        """A JSON answer (list results already filtered for the caller) with refused batch members' errors."""
        assert self.gate is not None and calls.principal is not None
        is_json = headers.get("Content-Type", "").startswith(JSON_CT)
        if not calls.extra:
            return payload, status
        answers: list[Any] = []
        if is_json and payload.strip():
            try:
                decoded = json.loads(payload)
            except (ValueError, UnicodeDecodeError, RecursionError):
                decoded = None
            if isinstance(decoded, list):
                answers.extend(decoded)
            elif isinstance(decoded, dict):
                answers.append(decoded)
        answers.extend(calls.extra)
        headers["Content-Type"] = JSON_CT
        return json.dumps(answers, separators=(",", ":")).encode(), 200 if status == 202 else status

    async def _stream(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, calls: Calls, owner: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status, headers=downstream_response_headers(upstream.headers, streaming=True)
        )
        # Flush each event as it comes: no compression, no buffering in front of the client.
        response.headers["Cache-Control"] = upstream.headers.get("Cache-Control", "no-cache")
        response.headers["X-Accel-Buffering"] = "no"
        if self.cors is not None:
            self.cors.apply(request, response)
        legacy = request.method == "GET" and request.path == self.config.legacy_sse_path
        if calls.principal is not None and self.gate is not None:
            return await self._stream_gated(request, upstream, calls, response, legacy, owner)
        watcher = jsonrpc.SseParser() if calls.pending and self.records else None
        ids = jsonrpc.SseIds() if self.event_ids is not None else None
        head: bytes | None = b""
        legacy_session: str | None = None
        try:
            await response.prepare(request)
            while True:
                try:
                    async with asyncio.timeout(self.config.sse_idle_timeout_s):
                        chunk = await upstream.content.readany()
                except TimeoutError:
                    calls.finish_all(
                        http_status=upstream.status,
                        outcome="error",
                        error_type="timeout",
                        reason="SSE stream idle",
                    )
                    break
                if not chunk:
                    break
                if legacy and head is not None:
                    head += chunk
                    end = _event_end(head)
                    if end is None and len(head) < 65536:
                        continue
                    chunk = (rewrite_first_event(head[:end]) + head[end:]) if end else head
                    if end:
                        legacy_session = self._bind_legacy(head[:end], owner)
                    head = None
                if watcher is not None:
                    for event in watcher.feed(chunk):
                        self._watch_event(event, calls, upstream.status)
                if ids is not None:
                    self._bind_event_ids(ids.feed(chunk), owner)
                await response.write(chunk)
            if calls.pending:
                calls.finish_all(
                    http_status=upstream.status,
                    outcome="error",
                    error_type="stream_closed",
                    reason="the SSE stream ended before the answer",
                )
            else:
                calls.finish_all(http_status=upstream.status, outcome="ok")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            # The client went away: stop reading the app's stream (closed in _forward's finally).
            calls.finish_all(http_status=499, outcome="error", error_type="client_disconnected")
            raise
        except aiohttp.ClientError:
            calls.finish_all(http_status=upstream.status, outcome="error", error_type="upstream_reset")
        finally:
            if legacy_session is not None and self.sessions is not None:
                # A 2024-11-05 session lives as long as its GET stream: the server forgets it then too.
                self.sessions.forget(legacy_session)
        return response

    async def _stream_gated(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        calls: Calls,
        response: web.StreamResponse,
        legacy: bool,
        owner: str,
    ) -> web.StreamResponse:
        """The SSE relay with the policy gate: whole events, list answers filtered, refusals injected.

        Events are relayed as they complete (never buffered past one event), so streaming still
        works; an event too large to judge ends the stream rather than passing unfiltered.
        """
        assert self.gate is not None and calls.principal is not None
        principal = calls.principal
        watcher = jsonrpc.SseParser() if calls.pending else None
        ids = jsonrpc.SseIds() if self.event_ids is not None else None
        framer = jsonrpc.SseFramer()
        inbox: asyncio.Queue[bytes] | None = None
        session: str | None = None
        legacy_session: str | None = None
        first = legacy
        read: asyncio.Future[bytes] | None = None
        getter: asyncio.Future[bytes] | None = None
        status = upstream.status

        async def send(raw: bytes) -> None:
            if watcher is not None:
                for event in watcher.feed(raw):
                    self._watch_event(event, calls, status)
            if ids is not None:
                self._bind_event_ids(ids.feed(raw), owner)
            await response.write(raw)

        try:
            await response.prepare(request)
            for error in calls.extra:
                await send(jsonrpc.sse_message(error))
            while True:
                if read is None:
                    read = asyncio.ensure_future(upstream.content.readany())
                waiting: set[asyncio.Future[bytes]] = {read}
                if inbox is not None:
                    if getter is None:
                        getter = asyncio.ensure_future(inbox.get())
                    waiting.add(getter)
                done, _ = await asyncio.wait(
                    waiting, timeout=self.config.sse_idle_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    calls.finish_all(
                        http_status=status, outcome="error", error_type="timeout", reason="SSE stream idle"
                    )
                    break
                if getter is not None and getter in done:
                    await send(getter.result())
                    getter = None
                if read not in done:
                    continue
                chunk = read.result()
                read = None
                if not chunk:
                    break
                try:
                    events = framer.feed(chunk)
                except jsonrpc.SseTooLarge:
                    calls.finish_all(
                        http_status=status,
                        outcome="error",
                        error_type="event_too_large",
                        reason="an SSE event exceeded the size the policy gate judges",
                    )
                    break
                for raw in events:
                    if first:
                        legacy_session = self._bind_legacy(raw.rstrip(b"\r\n"), owner)
                        raw = rewrite_first_event(raw)
                        first = False
                        session = session_of_endpoint(raw)
                        if session is not None:
                            inbox = self.legacy_streams.open(session, principal)
                    await send(await self.gate_filter(principal, raw))
            if calls.pending:
                calls.finish_all(
                    http_status=status,
                    outcome="error",
                    error_type="stream_closed",
                    reason="the SSE stream ended before the answer",
                )
            else:
                calls.finish_all(http_status=status, outcome="ok")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            calls.finish_all(http_status=499, outcome="error", error_type="client_disconnected")
            raise
        except aiohttp.ClientError:
            calls.finish_all(http_status=status, outcome="error", error_type="upstream_reset")
        finally:
            for pending in (read, getter):
                if pending is not None and not pending.done():
                    pending.cancel()
            if session is not None:
                self.legacy_streams.close(session, inbox)
            if legacy_session is not None and self.sessions is not None:
                self.sessions.forget(legacy_session)
        return response

    async def gate_filter(self, principal: Principal, raw: bytes) -> bytes:
        """One whole SSE event, its JSON's list results filtered for `principal` (`raw` when unchanged)."""
        assert self.gate is not None
        data = jsonrpc.event_message_data(raw)
        if data is None:
            return raw
        encoded = data.encode()
        filtered = await self.gate.filter_answer(principal, encoded)
        if filtered is encoded:
            return raw
        return jsonrpc.rewrite_event(raw, lambda _: filtered.decode())

    def _bind_legacy(self, event: bytes, owner: str) -> str | None:
        """Bind the `session_id` the legacy `endpoint` event announces to the caller who opened the stream."""
        if self.sessions is None:
            return None
        parsed = jsonrpc.SseParser().feed(event + b"\n\n")
        for sse in parsed:
            if sse.event == "endpoint" and sse.data and (sid := legacy_endpoint_session(sse.data)):
                return sid if self.sessions.bind(sid, owner) else None
        return None

    def _watch_event(self, event: jsonrpc.SseEvent, calls: Calls, status: int) -> None:
        if not event.data or (event.event not in (None, "message")):
            return
        for message in jsonrpc.parse_response_body(event.data.encode()):
            if message.kind == "response":
                calls.answered(message, status)

    # -- answers the proxy makes itself -----------------------------------------------------------

    def _upstream_answer(self, calls: Calls, status: int, message: str) -> Answer:
        return Answer(status, jsonrpc.error_body(calls.ids(), jsonrpc.INTERNAL_ERROR, message), {})

    def _fail(
        self, calls: Calls, answer: Answer, outcome: str, error_type: str, reason: str | None = None
    ) -> web.Response:
        calls.finish_all(http_status=answer.status, outcome=outcome, error_type=error_type, reason=reason)
        return self._answer(answer)

    def _answer(self, answer: Answer) -> web.Response:
        return web.Response(
            status=answer.status, body=answer.body, content_type=JSON_CT, headers=dict(answer.headers)
        )

    def metrics_text(self) -> bytes:
        # (the policy gate's own counters are published by the component)
        return (
            "# HELP outrider_inbound_requests_total HTTP requests received on the inbound MCP port: "
            "kind mcp went through the proxy pipeline, cors_preflight were CORS preflights the sidecar "
            "answered itself, resource_metadata were GET/HEAD of /.well-known/oauth-protected-resource.\n"
            "# TYPE outrider_inbound_requests_total counter\n"
            f'outrider_inbound_requests_total{{kind="mcp"}} {self.requests_total}\n'
            f'outrider_inbound_requests_total{{kind="cors_preflight"}} '
            f"{self.cors.preflights_total if self.cors is not None else 0}\n"
            f'outrider_inbound_requests_total{{kind="resource_metadata"}} {self.metadata_requests_total}\n'
            "# HELP outrider_inbound_denied_total Requests refused by caller authentication.\n"
            "# TYPE outrider_inbound_denied_total counter\n"
            f"outrider_inbound_denied_total {self.denied_total}\n"
            "# HELP outrider_inbound_upstream_errors_total Requests the MCP server did not answer.\n"
            "# TYPE outrider_inbound_upstream_errors_total counter\n"
            f"outrider_inbound_upstream_errors_total {self.upstream_errors_total}\n"
            "# HELP outrider_inbound_session_refusals_total Requests refused (404) for a session the "
            "caller did not create.\n"
            "# TYPE outrider_inbound_session_refusals_total counter\n"
            f"outrider_inbound_session_refusals_total {self.session_refusals_total}\n"
            "# HELP outrider_inbound_sessions Bound MCP sessions held now.\n"
            "# TYPE outrider_inbound_sessions gauge\n"
            f"outrider_inbound_sessions {len(self.sessions) if self.sessions is not None else 0}\n"
            "# HELP outrider_inbound_sessions_evicted_total Session bindings dropped least recently "
            "used first beyond sessions.max_sessions (their owners get 404 and start again).\n"
            "# TYPE outrider_inbound_sessions_evicted_total counter\n"
            f"outrider_inbound_sessions_evicted_total {self.sessions.evicted_total if self.sessions else 0}\n"
            "# HELP outrider_inbound_sessions_expired_total Session bindings dropped after "
            "sessions.idle_timeout_s without a request.\n"
            "# TYPE outrider_inbound_sessions_expired_total counter\n"
            f"outrider_inbound_sessions_expired_total {self.sessions.expired_total if self.sessions else 0}\n"
            "# HELP outrider_inbound_upstream_connections Connections to the MCP server held now.\n"
            "# TYPE outrider_inbound_upstream_connections gauge\n"
            f"outrider_inbound_upstream_connections {self.slots.held}\n"
            "# HELP outrider_inbound_upstream_busy_total Requests refused (503) because no connection to "
            "the MCP server was free within inbound.upstream_wait_s.\n"
            "# TYPE outrider_inbound_upstream_busy_total counter\n"
            f"outrider_inbound_upstream_busy_total {self.slots.refused_total}\n"
            "# HELP outrider_inbound_malformed_total Requests refused because they were not valid HTTP.\n"
            "# TYPE outrider_inbound_malformed_total counter\n"
            f"outrider_inbound_malformed_total {self.malformed_count()}\n"
        ).encode()
