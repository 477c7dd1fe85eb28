"""The response framing counter: every framing RFC 9112 §6.3 knows, in any split, and adversarial streams.

Property tests (hypothesis) build keep-alive streams of answers (Content-Length, chunked with
extensions and trailers, interim 1xx, HEAD/204/304 without a body, one close-delimited last), feed
them in random pieces, and check the counter passes every byte through unchanged and counts each
answer exactly when its last byte has been passed on. The named cases are the ones a hostile or
broken upstream sends: each stops the stream with a clear error, never a wait for more bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.sidecar.egress.http1_response import ResponseFramer

OK = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK + b"Transfer-Encoding: chunked\r\n\r\n"
BODIES = st.binary(max_size=300)
EXTENSIONS = st.sampled_from(["", ";a", ";a=b", '; name="quoted \\" value"', " ;x=1;y"])


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, bytes]:
    """(request method, wire bytes) of one well-formed answer that ends on its own."""
    kind = draw(st.sampled_from(["length", "chunked", "head", "204", "304", "interim"]))
    body = draw(BODIES)
    if kind == "head":
        # The length describes the GET answer: no body follows a HEAD answer.
        return "HEAD", f"HTTP/1.1 200 OK\r\nContent-Length: {len(body) + 5}\r\n\r\n".encode()
    if kind in ("204", "304"):
        # Even a (wrong) Content-Length does not give them a body.
        return "GET", f"HTTP/1.1 {kind} X\r\nContent-Length: 9\r\n\r\n".encode()
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    prefix = interim if kind == "interim" else b""
    if kind in ("length", "interim"):
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        return "POST", prefix + head + body
    wire = CHUNKED
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    for piece in (body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)):
        if piece:
            wire += f"{len(piece):X}{draw(EXTENSIONS)}\r\n".encode() + piece + b"\r\n"
    wire += f"0{draw(EXTENSIONS)}\r\n".encode()
    if draw(st.booleans()):
        wire += b"X-Checksum: abc\r\nX-Other:\r\n"
    return "GET", wire + b"\r\n"


def run(framer: ResponseFramer, data: bytes, cuts: list[int]) -> bytes:
    """Feed `data` cut at `cuts`; the bytes passed on."""
    out = b""
    previous = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += framer.feed(data[previous:cut])
        previous = cut
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(answers(), min_size=1, max_size=5), st.booleans(), st.lists(st.integers(0, 4000), max_size=12)
)
def test_keep_alive_answers_are_counted_exactly_in_any_split(
    stream: list[tuple[str, bytes]], close_delimited_last: bool, cuts: list[int]
) -> None:
    wire = b"".join(w for _, w in stream)
    tail = b"HTTP/1.0 200 OK\r\n\r\nuntil the upstream closes" if close_delimited_last else b""
    methods = [m for m, _ in stream] + (["GET"] if tail else [])
    framer = ResponseFramer()
    for method in methods:
        framer.expect(method)
    assert run(framer, wire + tail, cuts) == wire + tail and framer.error is None
    assert framer.answered == len(stream) and framer.unanswered == (1 if tail else 0)
    assert framer.until_eof == close_delimited_last
    framer.eof()
    assert framer.answered == len(methods) and framer.unanswered == 0
    # Byte by byte: an answer counts exactly once its last byte is passed on, not a byte before.
    ends = [sum(len(w) for _, w in stream[: i + 1]) for i in range(len(stream))]
    framer = ResponseFramer()
    for method in methods:
        framer.expect(method)
    passed = 0
    for at in range(len(wire + tail)):
        passed += len(framer.feed((wire + tail)[at : at + 1]))
        assert framer.answered == sum(1 for end in ends if end <= passed) and passed <= at + 1


def test_an_answer_is_not_counted_before_its_last_byte() -> None:
    framer = ResponseFramer()
    framer.expect("GET")
    assert framer.feed(CHUNKED + b"5;x=1\r\nhello\r\n0\r\n") != b""
    assert framer.answered == 0
    assert framer.feed(b"T: 1\r\n\r") == b"T: 1\r\n" and framer.answered == 0
    assert framer.feed(b"\n") == b"\r\n" and framer.answered == 1 and framer.unanswered == 0


def test_a_head_is_held_until_complete_and_body_runs_may_be_moved_by_the_caller() -> None:
    framer = ResponseFramer()
    framer.expect("GET")
    assert framer.feed(OK + b"Content-Le") == b""
    assert framer.feed(b"ngth: 100000\r\n\r\nab") == b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nab"
    assert framer.body_pending == 99998
    framer.skip_body(99998)
    assert framer.answered == 1
    with pytest.raises(ValueError):
        framer.skip_body(1)


def test_no_length_means_the_body_ends_with_the_connection() -> None:
    framer = ResponseFramer()
    framer.expect("GET")
    framer.expect("GET")
    # `gzip` alone (no chunked) is close-delimited too; the next "answer" is its body.
    assert framer.feed(OK + b"Transfer-Encoding: gzip\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
    assert framer.until_eof and framer.answered == 0
    framer.eof()
    assert framer.answered == 1 and framer.unanswered == 1


@pytest.mark.parametrize(
    ("wire", "error", "at_boundary"),
    [
        (b"SSH-2.0-OpenSSH\r\n", "not an HTTP/1.x response", True),
        (b"GET / HTTP/1.1\r\n\r\n", "not an HTTP/1.x response", True),
        (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x response", True),
        (b"HTTP/1.1 20 OK\r\n\r\n", "malformed status line", True),
        (b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", "bare CR or LF in the response head", True),
        (OK + b" Folded: x\r\n\r\n", "obsolete line folding in a response header", True),
        (OK + b"Bad Name: x\r\n\r\n", "malformed response header line", True),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "both Content-Length and Transfer-Encoding in a response",
            True,
        ),
        (OK + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", "differing Content-Length", True),
        (OK + b"Content-Length: -1\r\n\r\n", "not a decimal number", True),
        (OK + b"Content-Length: 0x10\r\n\r\n", "not a decimal number", True),
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding in an HTTP/1.0", True),
        (OK + b"Transfer-Encoding: chunked, gzip\r\n\r\n", "not the last transfer coding", True),
        (OK + b"Transfer-Encoding: chunked, chunked\r\n\r\n", "not the last transfer coding", True),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "101 Switching Protocols", True),
        (OK + b"X: " + b"a" * 70000, "response head too large", True),
        # Chunked bodies: what a client and the counter could read differently ends the stream.
        (CHUNKED + b"zz\r\n", "malformed chunk size line", False),
        (CHUNKED + b"-1\r\n", "malformed chunk size line", False),
        (CHUNKED + b"0x5\r\n", "malformed chunk size line", False),
        (
            CHUNKED + b"F" * 16 + b"\r\n",
            "malformed chunk size line",
            False,
        ),
        (CHUNKED + b"5;a=\x01\r\n", "malformed chunk size line", False),
        (CHUNKED + b"5; =b\r\n", "malformed chunk size line", False),
        (CHUNKED + b"5\nhello", "bare LF in chunked framing", False),
        (CHUNKED + b"5\r\nhello!!\r\n", "not ended by CRLF", False),
        (CHUNKED + b"1\r\nab", "not ended by CRLF", False),
        (
            CHUNKED + b"1" * 9000,
            "chunk line too long",
            False,
        ),
        (CHUNKED + b"0\r\nbad trailer\r\n", "malformed trailer", False),
        (CHUNKED + b"0\r\n T: folded\r\n", "malformed trailer", False),
        (CHUNKED + b"0\r\nT: a\x7fb\r\n", "control character", False),
        # More answers than requests: the extra one would be read as the answer to the next request.
        (b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", "an answer to no request", True),
    ],
)
def test_adversarial_answers_stop_the_stream_with_a_clear_error_in_any_split(
    wire: bytes, error: str, at_boundary: bool
) -> None:
    for step in (1, 7, len(wire)):
        framer = ResponseFramer()
        framer.expect("GET")
        passed = b""
        for at in range(0, len(wire), step):
            passed += framer.feed(wire[at : at + step])
        assert framer.error is not None and error in framer.error, (step, framer.error)
        assert framer.error_at_boundary == at_boundary
        # Nothing more passes once the stream is stopped, and a stopped head was never passed on.
        assert framer.feed(OK + b"\r\n") == b""
        if at_boundary and not wire.startswith(b"HTTP/1.1 204"):
            assert passed == b""


def test_empty_lines_between_answers_pass_and_answer_nothing() -> None:
    framer = ResponseFramer()
    framer.expect("GET")
    framer.expect("GET")
    wire = b"HTTP/1.1 204 No Content\r\n\r\n\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\r\n"
    # Byte by byte too: a CR alone is held until its LF shows it is an empty line.
    assert b"".join(framer.feed(wire[i : i + 1]) for i in range(len(wire))) == wire
    assert framer.answered == 2 and framer.error is None
    assert framer.feed(b"\r\nH") == b"\r\n" and framer.error == "the upstream sent an answer to no request"


def test_an_answer_to_nothing_asked_is_refused_before_any_byte_passes() -> None:
    framer = ResponseFramer()
    assert framer.feed(b"H") == b"" and framer.error == "the upstream sent an answer to no request"
    assert framer.error_at_boundary


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["GET", "HEAD", "POST"]), min_size=1, max_size=4),
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(
                [
                    OK,
                    CHUNKED,
                    b"Content-Length: 3\r\n",
                    b"\r\n",
                    b"5;x\r\n",
                    b"0\r\n",
                    b"HTTP/1.1 100 C\r\n\r\n",
                ]
            ),
        ),
        max_size=12,
    ),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_any_bytes_in_any_split_pass_a_prefix_and_never_raise(
    methods: list[str], pieces: list[bytes], cuts: list[int]
) -> None:
    """Whatever an upstream sends: `feed` returns (no exception, no wait for bytes it already has),
    passes on a prefix of what it was fed, and counts at most one answer per request."""
    data = b"".join(pieces)
    framer = ResponseFramer()
    for method in methods:
        framer.expect(method)
    passed = run(framer, data, cuts)
    assert data.startswith(passed)
    assert 0 <= framer.answered <= len(methods) and framer.answered + framer.unanswered == len(methods)
    if framer.error is None and not framer.until_eof:
        # Everything not passed on is a held head or chunk line, never more than a line's worth.
        assert len(data) - len(passed) <= 65536 + 8192


def test_an_answer_of_tiny_chunks_is_framed_in_one_pass() -> None:
    """As the request parser: no copy of the rest of the read per chunk line (quadratic time), and
    memory a small multiple of the input (tracemalloc's peak: deterministic, not a time)."""
    import tracemalloc

    wire = CHUNKED + b"1\r\nx\r\n" * 16000 + b"0\r\n\r\n"
    framer = ResponseFramer()
    framer.expect("GET")
    tracemalloc.start()
    try:
        passed = framer.feed(wire)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert passed == wire and framer.answered == 1
    assert peak < 5 * len(wire), peak
