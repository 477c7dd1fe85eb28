"""What the first bytes of an outbound connection say: TLS ClientHello SNI, HTTP Host, or nothing.

Pure parsers over a byte buffer; `sniff` answers NEED_MORE until it can decide, so the caller
reads (bounded) and asks again. ClientHellos split over several TLS records are reassembled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TLS = "tls"
HTTP = "http"
TCP = "tcp"
NEED_MORE = "need_more"

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SNI_EXTENSION = 0x0000
_HOST_NAME = 0x00
_METHOD = re.compile(rb"^[A-Z]{3,12} ")
_HTTP_METHODS = frozenset(
    b"GET HEAD POST PUT DELETE OPTIONS TRACE PATCH CONNECT PROPFIND PROPPATCH MKCOL COPY MOVE LOCK".split()
)


@dataclass(frozen=True)
class Sniffed:
    kind: str  # TLS | HTTP | TCP | NEED_MORE
    name: str | None = None  # SNI host_name or Host header (raw, not normalised), if any
    detail: str = ""


class _Short(Exception):
    """The buffer ends before the structure does: read more."""


class _Bad(Exception):
    """The bytes are not the structure we expected."""


def sniff(data: bytes) -> Sniffed:
    if not data:
        return Sniffed(NEED_MORE)
    if data[0] == _HANDSHAKE:
        return _sniff_tls(data)
    head = data[:13]
    match = _METHOD.match(head)
    if match or (len(data) < 13 and data.isalpha() and data.isupper()):
        if match and match.group(0)[:-1] not in _HTTP_METHODS:
            return Sniffed(TCP, detail="not an HTTP method")
        if not match:
            return Sniffed(NEED_MORE)
        return _sniff_http(data)
    return Sniffed(TCP)


# --- TLS ------------------------------------------------------------------------------------------


def _sniff_tls(data: bytes) -> Sniffed:
    try:
        message = _handshake_message(data)
        return Sniffed(TLS, name=_server_name(message))
    except _Short:
        return Sniffed(NEED_MORE)
    except _Bad as exc:
        return Sniffed(TLS, detail=f"malformed ClientHello: {exc}")


def _handshake_message(data: bytes) -> bytes:
    """Concatenate handshake-record payloads until the first handshake message is complete."""
    payload = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            raise _Short
        content_type, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5], "big")
        if content_type != _HANDSHAKE or major != 3:
            raise _Bad("not a TLS handshake record")
        if length == 0 or length > 16384 + 2048:
            raise _Bad("bad record length")
        if len(data) < pos + 5 + length:
            payload += data[pos + 5 :]
            if len(payload) >= 4 and payload[0] != _CLIENT_HELLO:
                raise _Bad("first handshake message is not a ClientHello")
            raise _Short
        payload += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(payload) >= 4:
            if payload[0] != _CLIENT_HELLO:
                raise _Bad("first handshake message is not a ClientHello")
            size = int.from_bytes(payload[1:4], "big")
            if len(payload) >= 4 + size:
                return bytes(payload[4 : 4 + size])


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Bad("ClientHello truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def _server_name(hello: bytes) -> str | None:
    reader = _Reader(hello)
    reader.take(2 + 32)  # legacy_version, random
    reader.vector(1)  # session id
    reader.vector(2)  # cipher suites
    reader.vector(1)  # compression methods
    if reader.done:
        return None
    extensions = _Reader(reader.vector(2))
    found: str | None = None
    seen_sni = False
    # Read every extension: a second server_name extension or a second host_name is ambiguous (servers
    # differ on which one they honour), so such a ClientHello is refused instead of guessed at.
    while not extensions.done:
        ext_type = extensions.number(2)
        body = extensions.vector(2)
        if ext_type != _SNI_EXTENSION:
            continue
        if seen_sni:
            raise _Bad("more than one server_name extension")
        seen_sni = True
        names = _Reader(_Reader(body).vector(2))
        while not names.done:
            name_type = names.number(1)
            name = names.vector(2)
            if name_type != _HOST_NAME:
                continue
            if found is not None:
                raise _Bad("more than one SNI host_name")
            try:
                found = name.decode("ascii")
            except UnicodeDecodeError:
                raise _Bad("SNI host_name is not ASCII") from None
            if not found or "\0" in found:
                raise _Bad("SNI host_name is empty or holds a NUL byte")
    return found


# --- HTTP -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    size: int  # bytes of the head including the blank line

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)


def parse_request_head(data: bytes) -> RequestHead | None:
    """The request line and headers once `\\r\\n\\r\\n` arrived; None while incomplete.

    Raises ValueError for bytes that are not an HTTP/1.x request head.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    try:
        text = data[:end].decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise ValueError("undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError("malformed header line")
        headers.append((name, value.strip()))
    return RequestHead(parts[0], parts[1], parts[2], tuple(headers), end + 4)


def split_host_port(authority: str, default_port: int | None) -> tuple[str, int | None]:
    """`host`, `host:80`, `[::1]:443` -> (host, port); raises ValueError for a bad port."""
    authority = authority.strip()
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise ValueError("missing ']' in IPv6 authority")
        host, rest = authority[1:close], authority[close + 1 :]
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError("junk after ']' in authority")
        port_text = rest[1:]
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    else:
        return authority, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def uri_authority(target: str) -> str:
    """The `host[:port]` of an absolute-URI request target (`http://user@host:80/x`), without userinfo."""
    return target.split("/", 3)[2].rpartition("@")[2]


def _sniff_http(data: bytes) -> Sniffed:
    try:
        head = parse_request_head(data)
    except ValueError as exc:
        return Sniffed(HTTP, detail=str(exc))
    if head is None:
        return Sniffed(NEED_MORE)
    hosts = [value for key, value in head.headers if key.lower() == "host"]
    if len(hosts) > 1:
        # Servers and proxies disagree on which of several Host headers wins (RFC 9112 says 400).
        return Sniffed(HTTP, detail="more than one Host header")
    host = hosts[0] if hosts else None
    if head.target.lower().startswith(("http://", "https://")):
        host = uri_authority(head.target)
    if not host:
        return Sniffed(HTTP, detail="no Host header")
    try:
        name, _ = split_host_port(host, None)
    except ValueError as exc:
        return Sniffed(HTTP, detail=f"bad Host header: {exc}")
    return Sniffed(HTTP, name=name)
