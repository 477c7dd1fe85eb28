"""HTTP/1.x request framing on a plaintext outbound connection: where each request starts and ends.

A sans-IO parser fed the client's bytes; it hands back each request head (to be judged) and the
body bytes verbatim. Anything two servers could frame differently (request smuggling: CL and TE
together, differing Content-Lengths, odd Transfer-Encodings, bare LF, obs-fold) is a FramingError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from outrider.sidecar.egress.sniff import RequestHead, split_host_port, uri_authority

# RFC 9110 §5.6.2 token; the request-target only needs to be free of whitespace and controls here.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
# chunk-ext (RFC 9112 §7.1.1): `;name[=value]` with tokens or quoted strings; BWS tolerated.
_TCHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e])*"'
_CHUNK_EXT = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TCHARS + rb"(?:[ \t]*=[ \t]*(?:" + _TCHARS + rb"|" + _QUOTED + rb"))?)*"
)
MAX_LINE = 8192  # one chunk-size line or trailer line


class FramingError(ValueError):
    """The bytes are not one unambiguous HTTP/1.x request stream; the message is safe to send back."""


@dataclass(frozen=True)
class Head:
    """A complete request head: parsed, and its exact bytes (to forward verbatim or rewrite)."""

    request: RequestHead
    raw: bytes


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS = range(6)


def parse_head(raw: bytes) -> RequestHead:
    """A strict request head (`raw` ends with CRLF CRLF); raises FramingError."""
    if b"\n" in raw.replace(b"\r\n", b"") or b"\r" in raw.replace(b"\r\n", b""):
        raise FramingError("bare CR or LF in the request head")
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise FramingError("malformed request line")
    if not _VERSION.fullmatch(parts[2]):
        raise FramingError("not an HTTP/1.0 or HTTP/1.1 request")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise FramingError("obsolete line folding in a header")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise FramingError("malformed header line")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise FramingError("control character in a header value")
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    return RequestHead(
        parts[0].decode("latin-1"),
        parts[1].decode("latin-1"),
        parts[2].decode("latin-1"),
        tuple(headers),
        len(raw),
    )


def body_framing(head: RequestHead) -> tuple[str, int]:
    """("length", n) or ("chunked", 0) for a request; raises FramingError when servers could disagree."""
    encodings = [v for k, v in head.headers if k.lower() == "transfer-encoding"]
    lengths = [v for k, v in head.headers if k.lower() == "content-length"]
    if encodings:
        if lengths:
            raise FramingError("both Content-Length and Transfer-Encoding")
        if head.version == "HTTP/1.0":
            raise FramingError("Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for v in encodings for c in v.split(",")]
        if codings != ["chunked"]:
            # gzip/deflate before chunked are legal but rare; anything but a lone `chunked` is a
            # classic smuggling lever (servers differ on `chunked, identity`, `xchunked`, ...).
            raise FramingError("Transfer-Encoding other than a single 'chunked'")
        return "chunked", 0
    if lengths:
        values = {v.strip() for value in lengths for v in value.split(",")}
        if len(values) != 1:
            raise FramingError("differing Content-Length values")
        (value,) = values
        if not _DIGITS.fullmatch(value.encode("latin-1")):
            raise FramingError("Content-Length is not a decimal number")
        return "length", int(value)
    return "length", 0  # a request without either has no body (RFC 9112 §6.3), whatever its method


class RequestParser:
    """Fed client bytes in any split; returns each request's Head followed by its body bytes."""

    def __init__(self, max_head_bytes: int = 65536) -> None:
        self._max_head = max_head_bytes
        self._state = _HEAD
        self._buffer = bytearray()  # bytes of a head or line not complete yet
        self._scan = 0  # how far into `_buffer` a head's end was already looked for
        self._remaining = 0
        self.requests = 0

    @property
    def between_requests(self) -> bool:
        """True when every request so far ended (no head or body is half-read)."""
        return self._state == _HEAD and not self._buffer

    @property
    def body_pending(self) -> int:
        """Body bytes the current request still has, which the caller may move without feeding them."""
        return self._remaining if self._state in (_LENGTH, _CHUNK_DATA) else 0

    def skip_body(self, n: int) -> None:
        """`n` (at most `body_pending`) body bytes were passed on by the caller itself (zero-copy)."""
        if not 0 <= n <= self.body_pending:
            raise ValueError("skipped more than the pending body")
        self._remaining -= n
        if self._remaining == 0:
            self._state = _HEAD if self._state == _LENGTH else _CHUNK_END

    def feed(self, data: bytes) -> list[Head | bytes]:
        # One pass by index over the held bytes and the new ones. Each byte is looked at a bounded
        # number of times: slicing off "the rest" at every line made a body of tiny chunks quadratic
        # (96 KB of `1\r\nx\r\n` held the event loop for over a second).
        self._buffer += data
        buf = self._buffer
        size = len(buf)
        out: list[Head | bytes] = []
        pos = run = 0  # run: where the body bytes not yet handed back start
        try:
            while pos < size:
                if self._state in (_LENGTH, _CHUNK_DATA):
                    n = min(self._remaining, size - pos)
                    pos += n
                    self.skip_body(n)
                    continue
                if self._state == _HEAD:
                    if run < pos:
                        out.append(bytes(buf[run:pos]))
                    while buf.startswith(b"\r\n", pos):
                        pos += 2  # RFC 9112 §2.2: tolerate (and drop) empty lines before a request line
                    run = pos
                    end = self._head_end(buf, pos)
                    if end < 0:
                        break
                    raw = bytes(buf[pos:end])
                    head = parse_head(raw)
                    kind, length = body_framing(head)
                    out.append(Head(head, raw))
                    self.requests += 1
                    if kind == "chunked":
                        self._state = _CHUNK_SIZE
                    elif length:
                        self._state, self._remaining = _LENGTH, length
                    pos = run = end
                    continue
                end = self._line_end(buf, pos)
                if end < 0:
                    break
                self._line(bytes(buf[pos : end - 2]))
                pos = end
            if run < pos:
                out.append(bytes(buf[run:pos]))
        finally:
            del buf[:pos]
            self._scan = max(0, self._scan - pos)
        return out

    def _head_end(self, buf: bytearray, pos: int) -> int:
        """The index just past the head starting at `pos`, or -1 while it is incomplete."""
        limit = pos + self._max_head
        end = buf.find(b"\r\n\r\n", max(pos, self._scan - 3), limit + 1)
        if end < 0:
            self._scan = len(buf)  # searched so far: the next feed goes on from here
            if len(buf) - pos > self._max_head:
                raise FramingError("request head too large")
            first = buf[pos : pos + 1]
            if first and not (first == b"\r" and len(buf) - pos == 1) and not first.isalpha():
                raise FramingError("malformed request line")
            return -1
        self._scan = 0
        if end + 4 - pos > self._max_head:
            raise FramingError("request head too large")
        return end + 4

    def _line_end(self, buf: bytearray, pos: int) -> int:
        """The index just past the CRLF of the line starting at `pos`, or -1 while it is incomplete."""
        end = buf.find(b"\r\n", pos, pos + MAX_LINE + 2)
        if end >= 0:
            return end + 2
        held = len(buf) - pos
        if held > MAX_LINE or (self._state == _CHUNK_END and held >= 2):
            raise FramingError(
                "chunk line too long" if self._state != _CHUNK_END else "chunk not ended by CRLF"
            )
        if b"\n" in buf[pos:]:
            raise FramingError("bare LF in chunked framing")
        return -1

    def _line(self, line: bytes) -> None:
        """One chunk-size line, chunk end or trailer (without its CRLF)."""
        if b"\n" in line or b"\r" in line:
            raise FramingError("bare CR or LF in chunked framing")
        if self._state == _CHUNK_END:
            if line:
                raise FramingError("chunk data longer than its size")
            self._state = _CHUNK_SIZE
        elif self._state == _CHUNK_SIZE:
            self._remaining = chunk_size(line)
            self._state = _CHUNK_DATA if self._remaining else _TRAILERS
        elif self._state == _TRAILERS:
            if not line:
                self._state = _HEAD
            else:
                check_trailer(line)


def chunk_size(line: bytes) -> int:
    """The size a chunk-size line (without its CRLF) announces; FramingError unless it is strict hex
    (at most 15 digits) followed by well-formed extensions."""
    size, _, _ = line.partition(b";")
    ext = line[len(size) :]
    size = size.rstrip(b" \t")
    if not _HEX.fullmatch(size) or not _CHUNK_EXT.fullmatch(ext):
        raise FramingError("malformed chunk size line")
    return int(size, 16)


def check_trailer(line: bytes) -> None:
    """FramingError unless `line` (without its CRLF) is one well-formed trailer field."""
    name, sep, value = line.partition(b":")
    if line[:1] in (b" ", b"\t") or not sep or not _TOKEN.fullmatch(name):
        raise FramingError("malformed trailer line")
    if not _FIELD_VALUE.fullmatch(value.strip(b" \t")):
        raise FramingError("control character in a trailer")


def request_authority(head: RequestHead, *, explicit: bool) -> tuple[str, int | None]:
    """The (host, port) one request is for; ValueError (safe to send back) when it cannot be judged.

    Captured connections name it with `Host` (or an absolute-form target, which must then agree with
    `Host`); proxy connections with an absolute `http://` URI. Upgrades and CONNECT are refused: after
    them the connection no longer carries HTTP requests that could be judged (docs/egress.md).
    """
    if head.method == "CONNECT":
        raise ValueError("CONNECT is not allowed inside an HTTP connection")
    upgrade = [v for k, v in head.headers if k.lower() == "upgrade"]
    if upgrade:
        raise ValueError(f"protocol upgrade ({upgrade[0][:32]!r}) is not allowed on plaintext HTTP")
    hosts = [v for k, v in head.headers if k.lower() == "host"]
    if len(hosts) > 1:
        raise ValueError("more than one Host header")
    absolute = head.target.lower().startswith(("http://", "https://"))
    if explicit and not head.target.lower().startswith("http://"):
        raise ValueError("expected an absolute http:// URI on a proxy connection")
    if absolute:
        host, port = split_host_port(uri_authority(head.target), None)
        if hosts and not explicit:
            named, _ = split_host_port(hosts[0], None)
            if named.lower().rstrip(".") != host.lower().rstrip("."):
                raise ValueError("the Host header disagrees with the absolute request target")
        if not host:
            raise ValueError("no host in the request target")
        return host, port
    if not hosts or not hosts[0]:
        raise ValueError("no Host header")
    return split_host_port(hosts[0], None)
