"""A small gRPC client over HTTP/2 on a Unix socket (pure Python, `h2`): the Workload API's transport.

Why not grpcio: its core costs ~15 MB of RSS in every sidecar for three calls on a local socket.
Why not grpclib: a stream waiting for the next message is never woken when the agent closes the
connection, so an agent restart goes unnoticed. Here the connection's `connection_lost` (and a GOAWAY)
fails every open stream at once with UNAVAILABLE, which the caller's retry loop turns into a reconnect.

Scope: unary-unary and unary-stream calls, identity encoding only (no compression), one connection
shared by concurrent calls and opened again after it is lost. Messages are bytes; the caller owns the
protobuf classes. gRPC status codes come back as their names (`RpcError.code_name`).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Sequence
from typing import cast
from urllib.parse import unquote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import H2Error

# gRPC status codes by number (grpc/doc/statuscodes.md).
CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# What grpcio accepts by default; a bigger message is refused, not buffered.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_PREFIX = struct.Struct(">BI")


class RpcError(Exception):
    """A call ended without OK: the gRPC status name and the server's (or our) one-line detail."""

    def __init__(self, code_name: str, details: str) -> None:
        super().__init__(f"{code_name}: {details}")
        self.code_name = code_name
        self.details = details


def status_name(value: str | None) -> str:
    """The name of a `grpc-status` header value; anything unexpected is UNKNOWN."""
    if value is not None and value.isdigit() and int(value) < len(CODES):
        return CODES[int(value)]
    return "UNKNOWN"


def timeout_header(seconds: float) -> str:
    """`grpc-timeout` in milliseconds (at most 8 digits, as the spec allows)."""
    return f"{min(max(1, round(seconds * 1000)), 99_999_999)}m"


def frame(message: bytes) -> bytes:
    return _PREFIX.pack(0, len(message)) + message


class _Stream:
    """What one call has received: complete messages, then its end (None for OK, or an RpcError)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.items: asyncio.Queue[bytes | RpcError | None] = asyncio.Queue()
        self.headers: dict[str, str] = {}
        self.done = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= _PREFIX.size:
            compressed, length = _PREFIX.unpack_from(self.buffer)
            if compressed:
                self.finish(RpcError("INTERNAL", "the server sent a compressed message (not negotiated)"))
                return
            if length > MAX_MESSAGE_BYTES:
                self.finish(RpcError("RESOURCE_EXHAUSTED", f"a message of {length} bytes is over the limit"))
                return
            if len(self.buffer) < _PREFIX.size + length:
                return
            self.items.put_nowait(bytes(self.buffer[_PREFIX.size : _PREFIX.size + length]))
            del self.buffer[: _PREFIX.size + length]

    def end(self, trailers: dict[str, str]) -> None:
        """The server's status (trailers, or the headers of a trailers-only answer)."""
        if self.done:
            return
        code = status_name(trailers.get("grpc-status"))
        if code == "OK":
            if self.buffer:
                self.finish(RpcError("INTERNAL", "the stream ended inside a message"))
            else:
                self.finish(None)
        else:
            self.finish(RpcError(code, unquote(trailers.get("grpc-message", ""))))

    def finish(self, outcome: RpcError | None) -> None:
        if not self.done:
            self.done = True
            self.items.put_nowait(outcome)


class _Connection(asyncio.Protocol):
    """One HTTP/2 client connection; fails every open stream the moment it is lost."""

    def __init__(self) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an `asyncio.Transport` subclass, but has its methods).
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(RpcError("UNAVAILABLE", "the connection to the server was lost"))

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2Error as exc:
            self._fail_all(
                RpcError("INTERNAL", f"HTTP/2 protocol error from the server: {type(exc).__name__}")
            )
            self.abort()
            return
        for event in events:
            self._handle(event)
        self._flush()

    def _handle(self, event: object) -> None:
        if isinstance(event, ConnectionTerminated):
            # GOAWAY: streams above the last one the server processed will never be answered.
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for stream_id, waiting in list(self.streams.items()):
                if stream_id > last:
                    waiting.finish(RpcError("UNAVAILABLE", "the server is going away"))
            self.closed = True
            return
        stream = self.streams.get(getattr(event, "stream_id", 0))
        if stream is None:
            return
        if isinstance(event, ResponseReceived):
            stream.headers = {str(k): str(v) for k, v in event.headers}
            status = stream.headers.get(":status")
            if status != "200":
                stream.finish(
                    RpcError(
                        "UNAVAILABLE" if status in {"502", "503", "504"} else "UNKNOWN",
                        f"HTTP status {status}",
                    )
                )
        elif isinstance(event, DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream.feed(event.data)
        elif isinstance(event, TrailersReceived):
            stream.end({str(k): str(v) for k, v in event.headers})
        elif isinstance(event, StreamEnded):
            # Without trailers: a trailers-only answer carries the status in its headers.
            stream.end(stream.headers)
            self.streams.pop(event.stream_id, None)
        elif isinstance(event, StreamReset):
            stream.finish(
                RpcError(
                    "CANCELLED" if event.error_code == ErrorCodes.CANCEL else "UNAVAILABLE",
                    f"the server reset the stream ({event.error_code!s})",
                )
            )
            self.streams.pop(event.stream_id, None)

    def _fail_all(self, error: RpcError) -> None:
        self.closed = True
        for stream in self.streams.values():
            stream.finish(error)
        self.streams.clear()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def open_stream(
        self, path: str, message: bytes, metadata: Sequence[tuple[str, str]], timeout: float | None
    ) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", timeout_header(timeout)))
        self.streams[stream_id] = _Stream()
        self.h2.send_headers(stream_id, headers)
        # A request is a few bytes: always within the initial 64 KiB flow-control window.
        self.h2.send_data(stream_id, frame(message), end_stream=True)
        self._flush()
        return stream_id

    def cancel(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None or self.closed:
            return
        with contextlib.suppress(H2Error):
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            self._flush()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UnixChannel:
    """Calls to one gRPC server on a Unix socket; connects on demand, again after a loss."""

    def __init__(self, path: str, *, connect_timeout_s: float = 5.0) -> None:
        self._path = path
        self._connect_timeout_s = connect_timeout_s
        self._connection: _Connection | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> _Connection:
        async with self._lock:
            connection = self._connection
            if connection is not None and not connection.closed:
                return connection
            if connection is not None:
                connection.abort()
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    _, connection = await loop.create_unix_connection(_Connection, self._path)
            except TimeoutError:
                raise RpcError("UNAVAILABLE", f"no connection to {self._path} within the timeout") from None
            except OSError as exc:
                raise RpcError(
                    "UNAVAILABLE", f"cannot connect to {self._path}: {exc.strerror or exc}"
                ) from None
            self._connection = connection
            return connection

    async def unary_stream(
        self,
        path: str,
        request: bytes,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,  # noqa: ASYNC109 - it is also sent to the server (grpc-timeout)
    ) -> AsyncIterator[bytes]:
        """Every message the server streams; RpcError when the call ends in anything but OK."""
        connection = await self._connected()
        stream_id = connection.open_stream(path, request, metadata, timeout)
        stream = connection.streams[stream_id]
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            while True:
                if deadline is None:
                    item = await stream.items.get()
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await stream.items.get()
                    except TimeoutError:
                        raise RpcError("DEADLINE_EXCEEDED", "the call took longer than its timeout") from None
                if item is None:
                    return
                if isinstance(item, RpcError):
                    raise item
                yield item
        finally:
            connection.cancel(stream_id)

    async def unary_unary(
        self,
        path: str,
        request: bytes,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,  # noqa: ASYNC109 - it is also sent to the server (grpc-timeout)
    ) -> bytes:
        answer: bytes | None = None
        stream = self.unary_stream(path, request, metadata, timeout)
        try:
            async for message in stream:
                if answer is not None:
                    raise RpcError("INTERNAL", "the server sent more than one answer to a unary call")
                answer = message
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        if answer is None:
            raise RpcError("INTERNAL", "the server sent no answer to a unary call")
        return answer

    async def close(self) -> None:
        async with self._lock:
            if self._connection is not None:
                self._connection.abort()
                self._connection = None
