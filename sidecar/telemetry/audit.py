"""The JSON audit log: one line per MCP call, token exchange and egress decision.

Event builders are pure (schema `audit-event.schema.json` beside this module); `AuditLog` writes lines.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import IO, Any

import orjson

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry.aggregate import DenialAggregator
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.observer import (
    EgressDecision,
    ExchangeOutcome,
    PolicyOutcome,
    Principal,
    RequestInfo,
)
from outrider.sidecar.telemetry.semconv import method_label, scrub

SCHEMA_ID = "https://outrider.dev/schemas/audit-event/v1.json"
SCHEMA_VERSION = "outrider.audit/v1"
REDACTED = "[REDACTED]"

Event = dict[str, Any]


def load_schema() -> dict[str, Any]:
    """The audit event JSON Schema shipped with the package."""
    text = resources.files("outrider.sidecar.telemetry").joinpath("audit-event.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@dataclass(frozen=True)
class Workload:
    """Where the sidecar runs: its SPIFFE ID (once known), pod and namespace."""

    spiffe_id: str | None = None
    pod: str | None = None
    namespace: str | None = None

    def as_json(self) -> dict[str, str | None]:
        return {"spiffe_id": self.spiffe_id, "pod": self.pod, "namespace": self.namespace}


@dataclass(frozen=True, slots=True)
class EventStamp:
    """The per-event facts a pure builder cannot make up: id, time and trace linkage.

    `time` is a datetime, or already the event's `time` text (`at_ns`: the telemetry worker formats
    nanosecond clocks without a datetime per event).
    """

    event_id: str
    time: datetime | str
    trace_id: str | None = None
    span_id: str | None = None

    @classmethod
    def now(cls, trace_id: str | None = None, span_id: str | None = None) -> EventStamp:
        return cls.at(datetime.now(UTC), trace_id, span_id)

    @classmethod
    def at(cls, when: datetime, trace_id: str | None = None, span_id: str | None = None) -> EventStamp:
        return cls(event_id=random_uuid4(), time=when, trace_id=trace_id, span_id=span_id)

    @classmethod
    def at_ns(cls, time_ns: int, trace_id: str | None = None, span_id: str | None = None) -> EventStamp:
        """At `time.time_ns()` value `time_ns`, as `at(datetime.fromtimestamp(time_ns / 1e9, UTC))`."""
        return cls(random_uuid4(), time_text_ns(time_ns), trace_id, span_id)


# The version (4) and variant (RFC 4122) bits of a version 4 UUID, as `uuid.UUID(version=4)` sets them.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def random_uuid4() -> str:
    """`str(uuid.UUID(int=random.getrandbits(128), version=4))`, without building the UUID object.

    From the process's PRNG: an event id must be unique, not secret, and uuid4() costs an
    os.urandom system call per audited call.
    """
    h = "%032x" % ((random.getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET)  # (cheaper than a format spec)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _time(value: datetime | str) -> str:
    if isinstance(value, str):
        return value
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# The last whole second `time_text_ns` formatted, and its text: calls come many per second. One
# tuple, replaced whole, so a thread never reads one second's number with another's text.
_second: tuple[int, str] = (-(1 << 62), "")
# "000" to "999": a format spec per event costs ~1,500 instructions more than this look-up (~60 KB).
_MILLIS = [f"{n:03d}" for n in range(1000)]


def time_text_ns(time_ns: int) -> str:
    """`_time(datetime.fromtimestamp(time_ns / 1e9, UTC))`, without the datetime.

    Rounded as `fromtimestamp` rounds a float (to the microsecond, half to even), then cut to
    milliseconds as `isoformat` cuts; the date and time of day are formatted once per second.
    """
    global _second
    fraction, whole = math.modf(time_ns / 1e9)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1.0, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1.0, micros + 1_000_000
    second = int(whole)
    cached, text = _second
    if cached != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, text)
    return f"{text}.{_MILLIS[micros // 1000]}Z"


def _normalise_key(key: str) -> str:
    return key.lower().replace("-", "_")


@functools.lru_cache(maxsize=8)
def _wanted_keys(keys: tuple[str, ...]) -> frozenset[str]:
    # The configured keys are fixed: normalise them once, not on every audited call.
    return frozenset(_normalise_key(k) for k in keys)


def redact_arguments(arguments: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of tool arguments with the values of `keys` (at any depth, case-insensitive) masked."""
    wanted = _wanted_keys(keys)

    def walk(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {
                str(k): (REDACTED if _normalise_key(str(k)) in wanted else walk(v)) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        if isinstance(value, str):
            # A free-text argument may still hold a pasted bearer token or JWT.
            return scrub(value, limit=2000)
        if value is None or isinstance(value, bool | int | float):
            return value
        return str(value)

    result: dict[str, Any] = walk(arguments)
    return result


def _user(principal: Principal | None) -> dict[str, Any] | None:
    if principal is None:
        return None
    return {"kind": principal.kind, "sub": principal.subject, "iss": principal.issuer}


def _base(
    event_type: str,
    stamp: EventStamp,
    *,
    outcome: str,
    reason: str | None,
    workload: Workload,
    principal: Principal | None,
    duration_s: float | None,
) -> Event:
    return {
        "schema": SCHEMA_VERSION,
        "event_id": stamp.event_id,
        "time": _time(stamp.time),
        "type": event_type,
        "outcome": outcome,
        "reason": scrub(reason),
        "user": _user(principal),
        "client_id": principal.client_id if principal else None,
        "act": list(principal.delegation) if principal else [],
        "workload": workload.as_json(),
        "duration_ms": None if duration_s is None else round(duration_s * 1000.0, 3),
        "trace_id": stamp.trace_id,
        "span_id": stamp.span_id,
    }


def _mcp(message: McpMessage, request: RequestInfo | None) -> dict[str, Any]:
    return {
        "method": method_label(message),
        "kind": message.kind,
        "tool": message.tool_name,
        "prompt": message.prompt_name,
        "resource": message.resource_uri,
        "jsonrpc_id": message.id,
        "protocol_version": request.protocol_version if request else None,
        "session_id": request.session_id if request else None,
        "transport": request.transport if request else None,
        "client_address": request.client_address if request else None,
    }


def mcp_call_event(
    stamp: EventStamp,
    *,
    message: McpMessage,
    request: RequestInfo,
    principal: Principal | None,
    workload: Workload,
    outcome: str,
    reason: str | None,
    http_status: int,
    error_type: str | None,
    duration_s: float,
    config: TelemetryConfig,
    token_exchange: str | None = None,
    policy: PolicyOutcome | None = None,
) -> Event:
    # One literal, in `_base` and `_mcp` order: the event every call writes, built without the
    # intermediate dicts and updates (a test holds it equal to `_base` + `_mcp`).
    mcp: dict[str, Any] = {
        "method": message.method or ("response" if message.kind == "response" else "invalid"),
        "kind": message.kind,
        "tool": message.tool_name,
        "prompt": message.prompt_name,
        "resource": message.resource_uri,
        "jsonrpc_id": message.id,
        "protocol_version": request.protocol_version,
        "session_id": request.session_id,
        "transport": request.transport,
        "client_address": request.client_address,
        "http_status": http_status,
        "error_type": error_type,
        "token_exchange": token_exchange,
    }
    if config.record_arguments and message.arguments is not None:
        mcp["arguments"] = redact_arguments(message.arguments, config.redact_keys)
    event: Event = {
        "schema": SCHEMA_VERSION,
        "event_id": stamp.event_id,
        "time": _time(stamp.time),
        "type": "mcp.call",
        "outcome": outcome,
        "reason": None if reason is None else scrub(reason),
        "user": None
        if principal is None
        else {"kind": principal.kind, "sub": principal.subject, "iss": principal.issuer},
        "client_id": None if principal is None else principal.client_id,
        "act": [] if principal is None else list(principal.delegation),
        "workload": workload.as_json(),
        "duration_ms": round(duration_s * 1000.0, 3),
        "trace_id": stamp.trace_id,
        "span_id": stamp.span_id,
        "mcp": mcp,
    }
    if policy is not None:
        event["policy"] = {
            "decision": policy.decision,
            "policies": list(policy.policies),
            "rate_limit": policy.rate_limit,
            "retry_after_s": policy.retry_after_s,
        }
    return event


# The `mcp.call` line from cached blocks (`CallLines`): what a call's line shares with the calls
# before it (who, where, which tool and how it ended) is encoded once per distinct value and reused.
_LINE_HEAD = b'{"schema":"' + SCHEMA_VERSION.encode() + b'","event_id":"'
_LINE_BLOCKS_MAX = 1024


# (who and how, the message's names, the transport and answer), as `CallLines.blocks` encodes them.
LineBlocks = tuple[bytes, bytes, bytes]


def assemble_line(
    event_id: str,
    time_text: str,
    trace_id: str | None,
    span_id: str | None,
    blocks: LineBlocks,
    duration_s: float,
    jsonrpc_id: Any,
    policy: PolicyOutcome | None,
) -> bytes | None:
    """An `mcp.call` line from its blocks and the values unique to the call (None: orjson refuses one)."""
    try:
        duration = orjson.dumps(round(duration_s * 1000.0, 3))
        rpc_id = orjson.dumps(jsonrpc_id, default=str, option=_ORJSON_OPTIONS)
        tail = (
            b"}}\n"
            if policy is None
            else b'},"policy":'
            + orjson.dumps(
                {
                    "decision": policy.decision,
                    "policies": list(policy.policies),
                    "rate_limit": policy.rate_limit,
                    "retry_after_s": policy.retry_after_s,
                },
                default=str,
                option=_ORJSON_OPTIONS,
            )
            + b"}\n"
        )
    except (TypeError, orjson.JSONEncodeError):
        return None
    # The ids are hex (`format(id, "x")`): written as they are, as orjson would write them.
    trace = "null" if trace_id is None else f'"{trace_id}"'
    span = "null" if span_id is None else f'"{span_id}"'
    who, names, answers = blocks
    return b"".join(
        (
            _LINE_HEAD,
            f'{event_id}","time":"{time_text}","type":"mcp.call",'.encode(),
            who,
            duration,
            f',"trace_id":{trace},"span_id":{span},"mcp":{{'.encode(),
            names,
            rpc_id,
            answers,
            tail,
        )
    )


class CallLines:
    """Writes `encode_line_bytes(mcp_call_event(...))` from blocks cached per distinct value.

    An `mcp.call` line is the same bytes as the event's, in the same order, with three blocks that
    repeat across calls encoded once by orjson (as the whole event would encode them): who and how
    (`outcome` to `workload`, keyed by the principal and workload objects, which the authenticator's
    cache and the identity component keep, and the outcome and reason), the message's names
    (`method` to `resource`) and the transport and answer (`protocol_version` to `token_exchange`).
    The values unique to a call (event id, time, duration, trace and span id, JSON-RPC id, the
    policy's verdict) are written per call. None where only the event can be written: recorded
    arguments, or a value orjson refuses (the event path then falls back as it always did).
    """

    __slots__ = ("_answers", "_names", "_who")

    def __init__(self) -> None:
        self._who: dict[tuple[Any, ...], tuple[Principal | None, Workload, bytes]] = {}
        self._names: dict[tuple[Any, ...], bytes] = {}
        self._answers: dict[tuple[Any, ...], bytes] = {}

    def line(
        self,
        event_id: str,
        time_text: str,
        trace_id: str | None,
        span_id: str | None,
        *,
        message: McpMessage,
        request: RequestInfo,
        principal: Principal | None,
        workload: Workload,
        outcome: str,
        reason: str | None,
        http_status: int,
        error_type: str | None,
        duration_s: float,
        token_exchange: str | None,
        policy: PolicyOutcome | None,
    ) -> bytes | None:
        blocks = self.blocks(
            message, request, principal, workload, outcome, reason, http_status, error_type, token_exchange
        )
        if blocks is None:
            return None
        return assemble_line(event_id, time_text, trace_id, span_id, blocks, duration_s, message.id, policy)

    def blocks(
        self,
        message: McpMessage,
        request: RequestInfo,
        principal: Principal | None,
        workload: Workload,
        outcome: str,
        reason: str | None,
        http_status: int,
        error_type: str | None,
        token_exchange: str | None,
    ) -> LineBlocks | None:
        """The three blocks of a call's line that repeat across calls (None: a value orjson refuses).
        A caller that sees the same facts again may keep them and call `assemble_line` itself."""
        try:
            return (
                self._who_block(principal, workload, outcome, reason),
                self._names_block(message),
                self._answers_block(request, http_status, error_type, token_exchange),
            )
        except (TypeError, orjson.JSONEncodeError):
            return None

    def _who_block(
        self, principal: Principal | None, workload: Workload, outcome: str, reason: str | None
    ) -> bytes:
        key = (id(principal), id(workload), outcome, reason)
        entry = self._who.get(key)
        if entry is not None and entry[0] is principal and entry[1] is workload:
            return entry[2]
        block = (
            orjson.dumps(
                {
                    "outcome": outcome,
                    "reason": None if reason is None else scrub(reason),
                    "user": None
                    if principal is None
                    else {"kind": principal.kind, "sub": principal.subject, "iss": principal.issuer},
                    "client_id": None if principal is None else principal.client_id,
                    "act": [] if principal is None else list(principal.delegation),
                    "workload": workload.as_json(),
                },
                default=str,
                option=_ORJSON_OPTIONS,
            )[1:-1]
            + b',"duration_ms":'
        )
        if len(self._who) >= _LINE_BLOCKS_MAX:
            self._who.clear()
        # The objects are kept beside the block: an id is only theirs while they live.
        self._who[key] = (principal, workload, block)
        return block

    def _names_block(self, message: McpMessage) -> bytes:
        key = (message.method, message.kind, message.tool_name, message.prompt_name, message.resource_uri)
        block = self._names.get(key)
        if block is None:
            block = (
                orjson.dumps(
                    {
                        "method": message.method or ("response" if message.kind == "response" else "invalid"),
                        "kind": message.kind,
                        "tool": message.tool_name,
                        "prompt": message.prompt_name,
                        "resource": message.resource_uri,
                    },
                    default=str,
                    option=_ORJSON_OPTIONS,
                )[1:-1]
                + b',"jsonrpc_id":'
            )
            if len(self._names) >= _LINE_BLOCKS_MAX:
                self._names.clear()
            self._names[key] = block
        return block

    def _answers_block(
        self, request: RequestInfo, http_status: int, error_type: str | None, token_exchange: str | None
    ) -> bytes:
        key = (
            request.protocol_version,
            request.session_id,
            request.transport,
            request.client_address,
            http_status,
            error_type,
            token_exchange,
        )
        block = self._answers.get(key)
        if block is None:
            block = (
                b","
                + orjson.dumps(
                    {
                        "protocol_version": request.protocol_version,
                        "session_id": request.session_id,
                        "transport": request.transport,
                        "client_address": request.client_address,
                        "http_status": http_status,
                        "error_type": error_type,
                        "token_exchange": token_exchange,
                    },
                    default=str,
                    option=_ORJSON_OPTIONS,
                )[1:-1]
            )
            if len(self._answers) >= _LINE_BLOCKS_MAX:
                self._answers.clear()
            self._answers[key] = block
        return block


def exchange_event(
    stamp: EventStamp,
    *,
    outcome: ExchangeOutcome,
    principal: Principal | None,
    message: McpMessage | None,
    request: RequestInfo | None,
    workload: Workload,
) -> Event:
    ok = outcome.outcome in ("issued", "cache_hit")
    event = _base(
        "token.exchange",
        stamp,
        outcome="ok" if ok else "error",
        reason=outcome.reason,
        workload=workload,
        principal=principal,
        duration_s=outcome.duration_s,
    )
    event["exchange"] = {
        "outcome": outcome.outcome,
        "audience": outcome.audience,
        "cache_hit": outcome.outcome == "cache_hit",
        "idp_status": outcome.idp_status,
    }
    if message is not None:
        event["mcp"] = _mcp(message, request)
    return event


def egress_event(stamp: EventStamp, *, decision: EgressDecision, workload: Workload) -> Event:
    event = _base(
        "egress.decision",
        stamp,
        outcome="allowed" if decision.allowed else "denied",
        reason=decision.reason,
        workload=workload,
        principal=None,
        duration_s=None,
    )
    event["egress"] = {
        "allowed": decision.allowed,
        "mode": decision.mode,
        "protocol": decision.protocol,
        "destination_ip": decision.destination_ip,
        "destination_port": decision.destination_port,
        "name": decision.name,
        "rule": decision.rule,
        "rule_source": decision.source,
    }
    return event


_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS
_ORJSON_LINE = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE


def encode_line(event: Event) -> str:
    """`encode(event)` and a newline."""
    return encode_line_bytes(event).decode()


def encode_line_bytes(event: Event) -> bytes:
    """`encode(event)` and a newline, as UTF-8 (what `AuditLog` holds and writes)."""
    try:
        return orjson.dumps(event, default=str, option=_ORJSON_LINE)
    except (TypeError, orjson.JSONEncodeError):
        return (encode(event) + "\n").encode()


def encode(event: Event) -> str:
    """One compact JSON line (no trailing newline); non-JSON values become strings."""
    try:
        # orjson: the same compact UTF-8 JSON at a tenth of the json module's cost per event.
        return orjson.dumps(event, default=str, option=_ORJSON_OPTIONS).decode()
    except (TypeError, orjson.JSONEncodeError):  # e.g. an integer past 64 bits in recorded arguments
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate a caller sent (`"\\ud800"`): escaped, never lost
            text = json.dumps(event, separators=(",", ":"), ensure_ascii=True, default=str)
        return text


def _utf8_buffer(stream: IO[str] | None) -> IO[bytes] | None:
    """The binary stream under a UTF-8 text stream with no newline translation, else None."""
    buffer = getattr(stream, "buffer", None)
    encoding = getattr(stream, "encoding", None) or ""
    if buffer is None or encoding.lower().replace("-", "").replace("_", "") != "utf8":
        return None
    if os.linesep != "\n":
        return None
    result: IO[bytes] = buffer
    return result


# Held lines past this many are written at once: a long batch on the worker still writes regularly.
MAX_HELD = 64


class AuditLog:
    """Writes audit events as JSON lines to a stream (stdout by default) or an appended file.

    Writes are small and synchronous: a line must not be lost to a crash after the call returns,
    and a lock keeps lines whole when identity callbacks arrive on py-spiffe's threads.
    """

    def __init__(
        self, stream: IO[str] | None, *, owns_stream: bool = False, aggregate_s: float = 0.0
    ) -> None:
        self._stream = stream
        self._owns = owns_stream
        self._lock = threading.Lock()
        self._held: list[bytes] = []  # encoded lines `flush_held` writes
        # A UTF-8 text stream over a binary one (stdout, the appended file): the lines, already UTF-8
        # from orjson, go to the binary layer as they are instead of being decoded and re-encoded.
        self._binary: IO[bytes] | None = _utf8_buffer(stream)
        # Repeated identical denials become one event per interval with a count (0: off).
        self.aggregator = DenialAggregator(aggregate_s)
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if aggregate_s > 0 and stream is not None:
            self._flusher = threading.Thread(
                target=self._flush_loop, name="outrider-audit-aggregate", daemon=True
            )
            self._flusher.start()

    @classmethod
    def open(cls, destination: str, *, aggregate_s: float = 0.0) -> AuditLog:
        if destination == "off":
            return cls(None)
        if destination == "stdout":
            return cls(sys.stdout, aggregate_s=aggregate_s)
        path = Path(destination)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stream = path.open("a", encoding="utf-8", buffering=1)
        except OSError as exc:
            from outrider.sidecar.config_error import ConfigError

            raise ConfigError(
                f"telemetry.audit: cannot open {destination} for appending: {exc.strerror}"
            ) from None
        return cls(stream, owns_stream=True, aggregate_s=aggregate_s)

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def write(self, event: Event, *, hold: bool = False) -> None:
        """Write `event` after any held lines; with `hold`, keep its line for `flush_held` instead.

        The telemetry worker holds the lines of one batch of calls and writes them at its end (one
        system call, not one per line; `MAX_HELD` bounds a batch); everything else writes at once.
        """
        if self._stream is None:
            return
        with self._lock:
            if self.aggregator.passes(event):  # nothing to fold or due: no clock, no list
                if hold and len(self._held) < MAX_HELD:
                    self._held.append(encode_line_bytes(event))
                    return
                self._write([event])
                return
            events = self.aggregator.offer(event, time.monotonic())
            if hold and len(self._held) < MAX_HELD:
                self._held.extend(encode_line_bytes(e) for e in events)
                return
            self._write(events)

    def write_line(self, line: bytes, outcome: str, *, hold: bool = False) -> bool:
        """`write(event, hold=hold)` for an event already encoded as `line` (with its newline) whose
        `outcome` is `outcome`; False, with nothing written, when the denial aggregator must see the
        event itself (a window is open, or a denial it would fold)."""
        if self._stream is None:
            return True
        with self._lock:
            if not self.aggregator.passes_outcome(outcome):
                return False
            held = self._held
            held.append(line)
            if not hold or len(held) > MAX_HELD:
                self._write([])
            return True

    def flush_held(self) -> None:
        """Write the lines `write(..., hold=True)` kept."""
        if self._held:
            with self._lock:
                self._write([])

    def _write(self, events: list[Event]) -> None:
        if self._stream is None:
            return
        lines = self._held
        if events:
            lines.extend(encode_line_bytes(e) for e in events)
        if not lines:
            return
        self._held = []
        data = b"".join(lines)
        binary = self._binary
        if binary is None:
            self._stream.write(data.decode())
            self._stream.flush()
            return
        self._stream.flush()  # text someone else wrote to the stream (stdout) goes first
        binary.write(data)
        binary.flush()

    def _flush_loop(self) -> None:
        interval = max(self.aggregator.window_s / 4, 0.05)
        while not self._stop.wait(interval):
            with self._lock:
                self._write(self.aggregator.due(time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._write(self.aggregator.flush())
            if self._owns and self._stream is not None:
                self._stream.close()
            self._stream = None
            self._binary = None
