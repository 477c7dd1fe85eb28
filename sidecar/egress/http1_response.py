"""HTTP/1.x response framing on a plaintext outbound connection: where each answer to a request ends.

A sans-IO counter fed the upstream's bytes. It lets the enforcer answer a refused request on a kept-alive
connection as soon as every earlier answer has been relayed, in order, instead of waiting for the upstream
to close. Anything it could frame differently from the client is a FramingError (RFC 9112 §6.3).
"""

from __future__ import annotations

import re
from collections import deque

from outrider.sidecar.egress.http1 import MAX_LINE, FramingError, check_trailer, chunk_size

# status-line = HTTP-version SP status-code SP [ reason-phrase ] (the SP before an empty reason is often
# left out, and tolerated: it does not change the framing).
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_NO_CHUNK_END = "chunk data not ended by CRLF (longer than its size)"
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_EOF, _FAILED = range(8)


class ResponseFramer:
    """Fed the upstream's answers in any split; counts the answers relayed to the client.

    `expect(method)` is called for each request as it is forwarded (before its bytes are sent: an
    answer can never come first). Heads are held until complete and checked; body bytes pass as they
    come, and a caller may move a known-length run itself (`body_pending`, `skip_body`). `feed` never
    raises: a framing problem stops the stream and is kept in `error` (with `error_at_boundary` when
    nothing of the offending answer was passed on, so the caller may still answer the request itself).
    """

    def __init__(self, max_head_bytes: int = 65536) -> None:
        self._max_head = max_head_bytes
        self._asked: deque[str] = deque()  # methods of forwarded requests not yet answered
        self._state = _HEAD
        self._buffer = bytearray()  # bytes of a head or line not complete yet
        self._scan = 0  # how far into `_buffer` a head's end was already looked for
        self._remaining = 0
        self.asked = 0  # requests forwarded
        self.answered = 0  # final answers complete (their last byte returned by `feed`)
        self.error: str | None = None
        self.error_at_boundary = False

    def expect(self, method: str) -> None:
        self._asked.append(method)
        self.asked += 1

    @property
    def unanswered(self) -> int:
        return len(self._asked)

    @property
    def until_eof(self) -> bool:
        """The answer in progress has no length: its body (and the stream) ends when the upstream closes."""
        return self._state == _UNTIL_EOF

    @property
    def body_pending(self) -> int:
        """Body bytes of the answer in progress the caller may move without feeding them."""
        return self._remaining if self._state in (_LENGTH, _CHUNK_DATA) else 0

    def skip_body(self, n: int) -> None:
        """`n` (at most `body_pending`) body bytes were passed on by the caller itself (zero-copy)."""
        if not 0 <= n <= self.body_pending:
            raise ValueError("skipped more than the pending body")
        self._remaining -= n
        if self._remaining == 0:
            if self._state == _LENGTH:
                self._complete()
            else:
                self._state = _CHUNK_END

    def eof(self) -> None:
        """The upstream closed: a close-delimited answer is complete; anything else half-read is not."""
        if self._state == _UNTIL_EOF:
            self._complete()
            self._state = _FAILED

    def feed(self, data: bytes | memoryview) -> bytes:
        """The bytes to pass on to the client, in order (a held head once it is complete and sound).

        What is passed on is always a prefix of what was fed: one pass by index, each byte looked at
        a bounded number of times (no copy of "the rest" per line, which made tiny chunks quadratic).
        """
        if self._state == _FAILED:
            return b""
        self._buffer += data
        buf = self._buffer
        size = len(buf)
        pos = 0
        try:
            while pos < size and self._state != _FAILED:
                state = self._state
                if state == _UNTIL_EOF:
                    pos = size
                elif state in (_LENGTH, _CHUNK_DATA):
                    n = min(self._remaining, size - pos)
                    pos += n
                    self.skip_body(n)
                elif state == _HEAD:
                    if buf.startswith(b"\r\n", pos):
                        # An empty line before a status line (some servers end a body with one CRLF
                        # too many) carries no answer: passed on as it came, as a relay does.
                        pos += 2
                        continue
                    if size - pos == 1 and buf[pos] == 0x0D:
                        break  # a CR alone: its LF decides
                    end = self._head(buf, pos)
                    if end < 0:
                        break
                    pos = end
                else:
                    end = self._chunk_line(buf, pos)
                    if end < 0:
                        break
                    pos = end
        except FramingError as exc:
            self.error = str(exc)
            self._state = _FAILED
        passed = bytes(buf[:pos])
        if self._state == _FAILED:
            buf.clear()
        else:
            del buf[:pos]
            self._scan = max(0, self._scan - pos)
        return passed

    def _complete(self) -> None:
        self._asked.popleft()
        self.answered += 1
        self._state = _HEAD

    def _head(self, buf: bytearray, pos: int) -> int:
        """The index just past the answer head at `pos` (checked, its framing taken), or -1 while it
        is incomplete."""
        self.error_at_boundary = True
        if not self._asked:
            raise FramingError("the upstream sent an answer to no request")
        end = buf.find(b"\r\n\r\n", max(pos, self._scan - 3), pos + self._max_head + 1)
        if end < 0:
            self._scan = len(buf)
            if len(buf) - pos > self._max_head:
                raise FramingError("response head too large")
            if b"HTTP/1."[: len(buf) - pos] != bytes(buf[pos : pos + 7]):
                raise FramingError("not an HTTP/1.x response")
            self.error_at_boundary = False
            return -1
        self._scan = 0
        if end + 4 - pos > self._max_head:
            raise FramingError("response head too large")
        status, framing, length = _framing(bytes(buf[pos : end + 4]), self._asked[0])
        if status == 101:
            # Upgrades are refused on the way up: after a 101 the bytes would no longer be HTTP.
            raise FramingError("101 Switching Protocols to a request that asked for no upgrade")
        self.error_at_boundary = False
        if status < 200:
            return end + 4  # interim (100 Continue, 103 Early Hints): the final answer follows
        if framing == "chunked":
            self._state = _CHUNK_SIZE
        elif framing == "eof":
            self._state = _UNTIL_EOF
        elif length:
            self._state, self._remaining = _LENGTH, length
        else:
            self._complete()
        return end + 4

    def _chunk_line(self, buf: bytearray, pos: int) -> int:
        """The index just past a chunk-size line, the CRLF after a chunk's data or a trailer at `pos`,
        or -1 while it is incomplete."""
        end = buf.find(b"\r\n", pos, pos + MAX_LINE + 2)
        if end < 0:
            held = len(buf) - pos
            if held > MAX_LINE:
                raise FramingError("chunk line too long")
            if self._state == _CHUNK_END and (held >= 2 or buf[pos] != 0x0D):
                raise FramingError(_NO_CHUNK_END)
            if b"\n" in buf[pos:]:
                raise FramingError("bare LF in chunked framing")
            return -1
        line = bytes(buf[pos:end])
        if b"\n" in line or b"\r" in line:
            raise FramingError("bare CR or LF in chunked framing")
        if self._state == _CHUNK_END:
            if line:
                raise FramingError(_NO_CHUNK_END)
            self._state = _CHUNK_SIZE
        elif self._state == _CHUNK_SIZE:
            self._remaining = chunk_size(line)
            self._state = _CHUNK_DATA if self._remaining else _TRAILERS
        elif line:
            check_trailer(line)
        else:
            self._complete()
        return end + 2


def _framing(raw: bytes, method: str) -> tuple[int, str, int]:
    """(status, "length" | "chunked" | "eof", length) of a response head to a `method` request."""
    if b"\n" in raw.replace(b"\r\n", b"") or b"\r" in raw.replace(b"\r\n", b""):
        raise FramingError("bare CR or LF in the response head")
    lines = raw[:-4].split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise FramingError("not an HTTP/1.x response (malformed status line)")
    minor, status = status_line.group(1), int(status_line.group(2))
    if status < 100:
        raise FramingError("status code below 100")
    encodings: list[bytes] = []
    lengths: list[bytes] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise FramingError("obsolete line folding in a response header")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise FramingError("malformed response header line")
        lname = name.lower()
        if lname == b"transfer-encoding":
            encodings.append(value)
        elif lname == b"content-length":
            lengths.append(value)
    # RFC 9112 §6.3: no body after HEAD, 1xx, 204 and 304 whatever the headers say.
    if method == "HEAD" or status < 200 or status in (204, 304):
        return status, "length", 0
    if encodings:
        if lengths:
            raise FramingError("both Content-Length and Transfer-Encoding in a response")
        if minor == b"0":
            raise FramingError("Transfer-Encoding in an HTTP/1.0 response")
        codings = [c.strip().lower() for v in encodings for c in v.split(b",")]
        if codings[-1] == b"chunked" and codings.count(b"chunked") == 1:
            return status, "chunked", 0
        if b"chunked" in codings:
            raise FramingError("'chunked' that is not the last transfer coding once")
        return status, "eof", 0
    if lengths:
        values = {v.strip() for value in lengths for v in value.split(b",")}
        if len(values) != 1:
            raise FramingError("differing Content-Length values in a response")
        (value,) = values
        if not _DIGITS.fullmatch(value):
            raise FramingError("response Content-Length is not a decimal number")
        return status, "length", int(value)
    return status, "eof", 0
