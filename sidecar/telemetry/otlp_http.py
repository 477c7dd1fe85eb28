"""Posts encoded OTLP/HTTP protobuf requests with the standard library, configured by `OTEL_EXPORTER_OTLP_*`.

`ExporterSettings.from_env` reads the settings as the SDK's OTLP/HTTP exporter reads them (pure);
`OtlpHttpClient` sends, retries and backs off as the SDK's client does, on `socket` and `ssl`: one
HTTP/1.1 POST at a time on a kept-alive connection, the request head written once per client.
"""

from __future__ import annotations

import logging
import math
import random
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal, NamedTuple
from urllib.parse import unquote, urlsplit

log = logging.getLogger("outrider.telemetry")

Signal = Literal["traces", "metrics"]
Compression = Literal["none", "gzip", "deflate"]

DEFAULT_TIMEOUT_S = 10.0
# The SDK exporter's request size limit (64 MiB, measured before compression).
MAX_REQUEST_BYTES = 64 * 1024 * 1024
_MAX_RETRIES = 6
_JITTER = 0.2
_RETRYABLE = frozenset({429, 502, 503, 504})
# The SDK's exporter names itself with its version; this one is told apart by the comment.
USER_AGENT = "OTel-OTLP-Exporter-Python (outrider lean exporter)"

# OTEL_EXPORTER_OTLP_HEADERS, as `opentelemetry.util.re.parse_env_headers(liberal=True)` reads it: the
# W3C baggage syntax with URL-encoded values, or (liberal) values with spaces taken as they are.
_OWS = r"[ \t]*"
_KEY = r"[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+"
_STRICT = re.compile(rf"{_OWS}{_KEY}{_OWS}={_OWS}[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*{_OWS}")
_LIBERAL = re.compile(rf"{_OWS}{_KEY}{_OWS}={_OWS}[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*{_OWS}")
_DELIMITER = re.compile(r"[ \t]*,[ \t]*")
_UNSENDABLE = re.compile(r"[\r\n\x00]")


def parse_headers(text: str, variable: str) -> dict[str, str]:
    """Pure: the headers of one `*_HEADERS` value, keys lower-cased, as the SDK parses them.

    Entries that are not `key=value` are skipped with a warning naming their position only: a
    header value may be an API key, so no part of the text is ever logged.
    """
    headers: dict[str, str] = {}
    for position, entry in enumerate(_DELIMITER.split(text), start=1):
        if not entry:
            continue
        entry = entry.strip()
        if _STRICT.fullmatch(entry):
            name, value = entry.split("=", 1)
            name, value = unquote(name).strip().lower(), unquote(value).strip()
        elif _LIBERAL.fullmatch(entry):
            name, value = entry.split("=", 1)
            name, value = name.strip().lower(), value.strip()
        else:
            log.warning("telemetry: %s: entry %d is not key=value (URL-encoded); ignored", variable, position)
            continue
        if _UNSENDABLE.search(value):
            log.warning("telemetry: %s: the value of header %r has a line break; ignored", variable, name)
            continue
        headers[name] = value
    return headers


def _pick(env: Mapping[str, str], signal: Signal, setting: str) -> tuple[str, str | None]:
    """(variable name, value): the per-signal variable if set and non-empty, else the generic one."""
    specific = f"OTEL_EXPORTER_OTLP_{signal.upper()}_{setting}"
    if env.get(specific):
        return specific, env[specific]
    generic = f"OTEL_EXPORTER_OTLP_{setting}"
    return generic, env.get(generic) or None


def signal_endpoint(env: Mapping[str, str], signal: Signal) -> str:
    """The per-signal endpoint as given, else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/<signal>` (the spec)."""
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return f"{base.removesuffix('/')}/v1/{signal}"


@dataclass(frozen=True)
class ExporterSettings:
    """Where and how one signal's requests are posted. `repr` never shows header values."""

    signal: Signal
    endpoint: str
    headers: Mapping[str, str] = field(repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    compression: Compression = "none"
    certificate: str | None = None  # CA bundle; None: the system's
    client_certificate: str | None = None
    client_key: str | None = None

    @classmethod
    def from_env(cls, signal: Signal, env: Mapping[str, str]) -> ExporterSettings:
        """Pure apart from warnings: the settings the SDK's OTLP/HTTP exporter takes from `env`.

        `*_TIMEOUT` is read in seconds, as the Python SDK reads it (the specification says
        milliseconds); `*_CLIENT_KEY` is used only together with `*_CLIENT_CERTIFICATE`.
        """
        headers = {"content-type": "application/x-protobuf", "user-agent": USER_AGENT}
        variable, raw_headers = _pick(env, signal, "HEADERS")
        headers.update(parse_headers(raw_headers or "", variable))
        variable, raw_timeout = _pick(env, signal, "TIMEOUT")
        timeout = DEFAULT_TIMEOUT_S
        if raw_timeout is not None:
            try:
                timeout = float(raw_timeout)
            except ValueError:
                log.warning("telemetry: %s=%r is not a number of seconds; using 10", variable, raw_timeout)
        variable, raw_compression = _pick(env, signal, "COMPRESSION")
        compression = (raw_compression or "none").strip().lower()
        if compression not in ("none", "gzip", "deflate"):
            log.warning(
                "telemetry: %s=%r is not none, gzip or deflate; not compressing", variable, compression
            )
            compression = "none"
        if compression != "none" and "content-encoding" not in headers:
            headers["content-encoding"] = compression
        client_certificate = _pick(env, signal, "CLIENT_CERTIFICATE")[1]
        return cls(
            signal=signal,
            endpoint=signal_endpoint(env, signal),
            headers=headers,
            timeout_s=timeout,
            compression=compression,  # type: ignore[arg-type]  # checked above
            certificate=_pick(env, signal, "CERTIFICATE")[1],
            client_certificate=client_certificate,
            client_key=_pick(env, signal, "CLIENT_KEY")[1] if client_certificate else None,
        )


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        packer = zlib.compressobj(wbits=31)  # the gzip format
        return packer.compress(data) + packer.flush()
    if compression == "deflate":
        return zlib.compress(data)
    return data


def retry_after_s(value: str | None) -> float | None:
    """`Retry-After` (seconds or an HTTP date) as a delay, as the SDK's client reads it."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - time.time(), 0.0)


class _Attempt(NamedTuple):  # (a tuple: a frozen dataclass costs twice as much to make, per post)
    status: int | None  # None: no response (the connection failed)
    reason: str
    retry_after: str | None = None


class BadResponse(ValueError):
    """The receiver's answer is not HTTP/1.x as this client reads it (or the connection closed early)."""


class Response(NamedTuple):
    status: int
    reason: str
    retry_after: str | None
    will_close: bool  # the connection cannot carry another request


# Limits as `http.client` keeps them: a line of 64 KiB, 100 header fields.
_MAX_LINE = 65536
_MAX_HEADERS = 100
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
# What `http.client` refuses to send: a name that is not a token, a value with a bare line break.
_TOKEN = re.compile(r"[^:\s][^:\r\n]*")
_BROKEN_VALUE = re.compile(r"\n(?![ \t])|\r(?![ \t\n])")


def request_head(
    path: str, host: str, port: int | None, https: bool, headers: Mapping[str, str]
) -> tuple[bytes, bytes] | None:
    """Pure: a POST's head around its `Content-Length` value, as `http.client` writes it: the request
    line, Host (with the port unless it is the scheme's) and Accept-Encoding: identity unless
    `headers` has them, Content-Length, then `headers` in order. None for what `http.client` would
    refuse to send (a path with control characters, spaces or non-ASCII, a header name that is not
    a token, a value with a bare line break). A Content-Length or Transfer-Encoding in `headers` is
    left out: the body's own length is sent."""
    if _CONTROL.search(path) or not path.isascii():
        return None
    for name, value in headers.items():
        if not name.isascii() or not _TOKEN.fullmatch(name) or _BROKEN_VALUE.search(value):
            return None
    names = {name.lower() for name in headers}
    lines = [b"POST " + path.encode("ascii") + b" HTTP/1.1"]
    if "host" not in names:
        try:
            host_text = host.encode("ascii")
        except UnicodeEncodeError:
            host_text = host.encode("idna")
        if b":" in host_text:
            host_text = b"[" + host_text + b"]"
        if port is not None and port != (443 if https else 80):
            host_text += b":%d" % port
        lines.append(b"Host: " + host_text)
    if "accept-encoding" not in names:
        lines.append(b"Accept-Encoding: identity")
    after = [
        name.encode("ascii") + b": " + _header_bytes(value)
        for name, value in headers.items()
        if name.lower() not in ("content-length", "transfer-encoding")
    ]
    return b"\r\n".join(lines) + b"\r\nContent-Length: ", b"".join(
        b"\r\n" + line for line in after
    ) + b"\r\n\r\n"


class _Reader:
    """Reads one response from a socket, in as few `recv`s as the receiver's writes allow."""

    __slots__ = ("_buffer", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _more(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise BadResponse("the receiver closed the connection")
        self._buffer += data

    def line(self) -> bytes:
        """The next line without its end (CRLF, or a bare LF as `http.client` also accepts)."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buffer) > _MAX_LINE:
                raise BadResponse("a response line is too long")
            self._more()

    def exactly(self, count: int) -> None:
        """Read and drop `count` bytes."""
        while len(self._buffer) < count:
            count -= len(self._buffer)
            self._buffer = b""
            self._more()
        self._buffer = self._buffer[count:]

    def until_closed(self) -> None:
        self._buffer = b""
        while self._sock.recv(65536):
            pass

    def left(self) -> bool:
        return bool(self._buffer)


def read_response(sock: socket.socket) -> Response:
    """Read one answer to a POST (its body read and dropped, so the connection can be reused)."""
    reader = _Reader(sock)
    while True:
        status_line = reader.line()
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise BadResponse("not an HTTP/1.x status line")
        status = int(code)
        fields: dict[bytes, bytes] = {}
        for _ in range(_MAX_HEADERS + 1):
            line = reader.line()
            if not line:
                break
            name, colon, value = line.partition(b":")
            if colon:
                fields[name.strip().lower()] = value.strip()
        else:
            raise BadResponse("more than 100 header fields")
        if status < 100:
            raise BadResponse("a status under 100")
        if status >= 200:
            break
        # 1xx (100 Continue): an interim answer, skipped as `http.client` skips it
    connection = fields.get(b"connection", b"").lower()
    # (`find`, not `in`: CPython 3.11's bytes `in` formats and drops a TypeError first.)
    will_close = connection.find(b"close") >= 0 or (
        version == b"HTTP/1.0" and connection.find(b"keep-alive") < 0
    )
    if fields.get(b"transfer-encoding", b"").lower().endswith(b"chunked"):
        while True:
            size_text = reader.line().partition(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadResponse("a chunk size is not hexadecimal") from None
            if size == 0:
                while reader.line():  # trailers, then the empty line
                    pass
                break
            reader.exactly(size + 2)
    elif b"content-length" in fields:
        try:
            length = int(fields[b"content-length"])
        except ValueError:
            raise BadResponse("Content-Length is not a number") from None
        if length < 0:
            raise BadResponse("Content-Length is negative")
        reader.exactly(length)
    elif status not in (204, 304):
        reader.until_closed()  # no length: the body ends with the connection
        will_close = True
    if reader.left():  # bytes nobody asked for: do not read the next answer from them
        will_close = True
    retry_after = fields.get(b"retry-after")
    return Response(
        status,
        reason.decode("latin-1").strip(),
        None if retry_after is None else retry_after.decode("latin-1"),
        will_close,
    )


class OtlpHttpClient:
    """One signal's persistent connection; `export` posts a request body, retrying as the SDK does.

    Retries (exponential backoff 1, 2, 4 ... s with 20 % jitter, or the server's `Retry-After`) on
    429, 502, 503, 504 and on connection errors, within the timeout; a connection error is retried
    once at once first (a pooled connection the server closed). Only 2xx accepts; any other answer
    (a 3xx redirect too) fails the export. Used by one export thread at a time.
    """

    def __init__(self, settings: ExporterSettings) -> None:
        self.settings = settings
        url = urlsplit(settings.endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or ""
        self._port = url.port or (443 if self._https else 80)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.usable = url.scheme in ("http", "https") and bool(self._host)
        if not self.usable:
            # The endpoint may carry credentials (user:password@): name the variable, not the value.
            log.error(
                "telemetry: the OTLP %s endpoint is not an http:// or https:// URL "
                "(OTEL_EXPORTER_OTLP_%s_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT); nothing will be exported",
                settings.signal,
                settings.signal.upper(),
            )
        # Everything before the body's length, written once: the request line and the headers
        # `http.client` would send (Host, Accept-Encoding: identity, then the settings' own).
        self._head = request_head(path, self._host, url.port, self._https, settings.headers)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self._host, self._port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # head and body go in one send
            if self._https:
                context = ssl.create_default_context(cafile=self.settings.certificate)
                if self.settings.client_certificate:
                    context.load_cert_chain(self.settings.client_certificate, self.settings.client_key)
                sock = context.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _post(self, body: bytes, timeout: float) -> _Attempt:
        timeout = max(timeout, 0.001)
        sock = self._sock
        try:
            if self._head is None:
                raise ValueError("the endpoint's path or a header cannot be sent")
            if sock is None:
                # A new connection reads the TLS files again (rotated certificates are picked up).
                sock = self._sock = self._connect(timeout)
            else:
                sock.settimeout(timeout)
            head, after = self._head
            sock.sendall(b"%b%d%b%b" % (head, len(body), after, body))
            response = read_response(sock)
            if response.will_close:
                self._close()
            return _Attempt(response.status, response.reason, response.retry_after)
        except (OSError, ValueError) as exc:
            self._close()
            return _Attempt(None, _describe(exc))

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def export(self, data: bytes) -> bool:
        """Post one encoded request; True when the receiver accepted it (2xx only: OTLP's success is
        200). Other answers fail; 429, 502, 503, 504 and lost connections are retried first. A
        redirect is neither followed nor retried: nothing was delivered (the SDK's client counts
        200-399 as success, which here would report lost data as sent)."""
        signal = self.settings.signal
        if len(data) > MAX_REQUEST_BYTES:
            log.warning(
                "telemetry: dropping a %s request of %d bytes (over the %d byte limit)%s",
                signal,
                len(data),
                MAX_REQUEST_BYTES,
                "; lower OTEL_BSP_MAX_EXPORT_BATCH_SIZE" if signal == "traces" else "",
            )
            return False
        if not self.usable:
            return False
        body = compress(data, self.settings.compression)
        with self._lock:
            deadline = time.monotonic() + self.settings.timeout_s
            for retry in range(_MAX_RETRIES):
                attempt = self._post(body, deadline - time.monotonic())
                if attempt.status is None and deadline > time.monotonic():
                    attempt = self._post(body, deadline - time.monotonic())  # once more, straight away
                if attempt.status is not None and 200 <= attempt.status < 300:
                    return True
                if attempt.status is not None and attempt.status not in _RETRYABLE:
                    log.error(
                        "telemetry: failed to export %s: HTTP %s %s%s",
                        signal,
                        attempt.status,
                        attempt.reason,
                        _redirect_hint(attempt.status, signal),
                    )
                    return False
                delay = retry_after_s(attempt.retry_after)
                backoff = 2**retry * random.uniform(1 - _JITTER, 1 + _JITTER) if delay is None else delay
                if retry + 1 == _MAX_RETRIES or backoff > deadline - time.monotonic() or self._stop.is_set():
                    log.error(
                        "telemetry: failed to export %s (%s): timeout, retries or shutdown",
                        signal,
                        _outcome(attempt),
                    )
                    return False
                log.warning(
                    "telemetry: transient error exporting %s (%s), retrying in %.2fs",
                    signal,
                    _outcome(attempt),
                    backoff,
                )
                if self._stop.wait(backoff):
                    log.warning("telemetry: shutdown in progress, %s export abandoned", signal)
                    return False
        return False

    def shutdown(self) -> None:
        """Abandon any backoff in progress and close the connection (left to an export still
        sending after a second: it ends within its timeout)."""
        self._stop.set()
        if self._lock.acquire(timeout=1.0):
            try:
                self._close()
            finally:
                self._lock.release()


def _header_bytes(value: str) -> bytes:
    # http.client sends str values as Latin-1; a URL-decoded value may hold other characters.
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode()


def _describe(exc: BaseException) -> str:
    """The error for a log line: OS and TLS errors say what failed; others only their type."""
    if isinstance(exc, OSError) and exc.args:
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def _redirect_hint(status: int, signal: Signal) -> str:
    # The Location is not logged: it may carry credentials (user:password@, a token in the query).
    if not 300 <= status < 400:
        return ""
    return (
        f" (a redirect, not followed: point OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_ENDPOINT at the receiver itself)"
    )


def _outcome(attempt: _Attempt) -> str:
    return f"HTTP {attempt.status} {attempt.reason}" if attempt.status is not None else attempt.reason
