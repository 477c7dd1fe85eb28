"""Posts encoded OTLP/HTTP protobuf requests with the standard library, configured by `OTEL_EXPORTER_OTLP_*`.

`ExporterSettings.from_env` reads the settings as the SDK's OTLP/HTTP exporter reads them (pure);
`OtlpHttpClient` sends, retries and backs off as the SDK's client does, on `http.client` and `ssl`.
"""

from __future__ import annotations

import http.client
import logging
import math
import random
import re
import ssl
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal
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


@dataclass(frozen=True)
class _Attempt:
    status: int | None  # None: no response (the connection failed)
    reason: str
    retry_after: str | None = None


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
        self._port = url.port
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.usable = url.scheme in ("http", "https") and bool(self._host)
        if not self.usable:
            # The endpoint may carry credentials (user:password@): name the variable, not the value.
            log.error(
                "telemetry: the OTLP %s endpoint is not an http:// or https:// URL "
                "(OTEL_EXPORTER_OTLP_%s_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT); nothing will be exported",
                settings.signal,
                settings.signal.upper(),
            )
        self._headers = {k: _header_bytes(v) for k, v in settings.headers.items()}
        self._connection: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            context = ssl.create_default_context(cafile=self.settings.certificate)
            if self.settings.client_certificate:
                context.load_cert_chain(self.settings.client_certificate, self.settings.client_key)
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=context)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _post(self, body: bytes, timeout: float) -> _Attempt:
        timeout = max(timeout, 0.001)
        connection = self._connection
        try:
            if connection is None:
                # A new connection reads the TLS files again (rotated certificates are picked up).
                connection = self._connection = self._connect(timeout)
            else:
                connection.timeout = timeout
                if connection.sock is not None:
                    connection.sock.settimeout(timeout)
            connection.request("POST", self._path, body, self._headers)
            response = connection.getresponse()
            response.read()  # drained, so the connection can be reused
            if response.will_close:
                self._close()
            return _Attempt(response.status, response.reason, response.getheader("retry-after"))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self._close()
            return _Attempt(None, _describe(exc))

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

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
                backoff = 2**retry * random.uniform(1 - _JITTER, 1 + _JITTER)
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
                if delay is not None:
                    backoff = delay
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
