"""The plaintext HTTP request framing parser: well-formed streams in any split, and every smuggling class.

Property tests (hypothesis) build keep-alive streams of requests with Content-Length and chunked
bodies (extensions, trailers), feed them in random pieces, and check the parser finds exactly those
heads and passes every byte through unchanged; the named cases are the request-smuggling classes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.sidecar.egress.http1 import FramingError, Head, RequestParser, request_authority

METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
HOSTS = st.sampled_from(["allowed.test", "denied.test", "a.b.test:8080", "10.0.0.1", "[fd00::1]:80"])
BODIES = st.binary(max_size=300)
EXTENSIONS = st.sampled_from(["", ";a", ";a=b", '; name="quoted \\" value"', " ;x=1;y"])


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bytes, str]:
    """(wire bytes, body, host) of one well-formed request."""
    method, host, body = draw(METHODS), draw(HOSTS), draw(BODIES)
    framing = (
        draw(st.sampled_from(["none", "length", "chunked"]))
        if not body
        else draw(st.sampled_from(["length", "chunked"]))
    )
    headers = [f"Host: {host}", "User-Agent: t"]
    if draw(st.booleans()):
        headers.append("Expect: 100-continue")
    wire_body = b""
    if framing == "length":
        headers.append(f"Content-Length: {len(body)}")
        wire_body = body
    elif framing == "chunked":
        headers.append("Transfer-Encoding: chunked")
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for piece in pieces:
            if piece:
                wire_body += f"{len(piece):x}{draw(EXTENSIONS)}\r\n".encode() + piece + b"\r\n"
        wire_body += f"0{draw(EXTENSIONS)}\r\n".encode()
        if draw(st.booleans()):
            wire_body += b"X-Checksum: abc\r\n"
        wire_body += b"\r\n"
    head = f"{method} /p?q=1 HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    return head.encode() + wire_body, body, host


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[Head | bytes]:
    parser = RequestParser()
    out: list[Head | bytes] = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += parser.feed(data[previous:cut])
        previous = cut
    assert parser.between_requests
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=5), st.lists(st.integers(0, 4000), max_size=12))
def test_keep_alive_streams_are_framed_exactly_in_any_split(
    stream: list[tuple[bytes, bytes, str]], cuts: list[int]
) -> None:
    data = b"".join(wire for wire, _, _ in stream)
    out = feed_in_pieces(data, [c for c in cuts if c < len(data)])
    heads = [item for item in out if isinstance(item, Head)]
    assert [h.request.header("Host") for h in heads] == [host for _, _, host in stream]
    # Every byte is passed on unchanged and in order (heads verbatim, bodies verbatim).
    assert b"".join(item.raw if isinstance(item, Head) else item for item in out) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_arbitrary_bytes_only_ever_raise_framing_error(data: bytes, cuts: list[int]) -> None:
    parser = RequestParser(max_head_bytes=256)
    previous = 0
    try:
        for cut in [*sorted(c for c in set(cuts) if c < len(data)), len(data)]:
            parser.feed(data[previous:cut])
            previous = cut
    except FramingError:
        pass


CHUNKED = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
SMUGGLING = {
    "cl_and_te": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
    "te_and_cl": "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
    "differing_cl": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
    "differing_cl_list": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 5\r\n\r\n",
    "signed_cl": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n",
    "hex_cl": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x4\r\n\r\n",
    "te_identity_chunked": "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
    "te_chunked_twice": "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    "Transfer-Encoding: chunked\r\n\r\n",
    "te_xchunked": "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "te_on_http10": "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    "te_space_before_colon": "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
    "obs_fold": "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
    "bare_lf_in_head": "GET / HTTP/1.1\nHost: a\r\n\r\n",
    "bare_cr_in_head": "GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
    "nul_in_value": "GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    "http2_preface": "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "chunk_size_overflow": "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    + "1" * 20
    + "\r\n",
    "chunk_size_negative": CHUNKED + "-1\r\n",
    "chunk_size_bare_lf": CHUNKED + "3\nabc\r\n0\r\n\r\n",
    "chunk_data_too_long": CHUNKED + "3\r\nabcd\r\n0\r\n\r\n",
    "chunk_bad_extension": CHUNKED + "3;\r\nabc\r\n0\r\n\r\n",
    "chunk_space_prefix": CHUNKED + " 3\r\nabc\r\n0\r\n\r\n",
    "bad_trailer": CHUNKED + "0\r\nno colon\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_ambiguous_framing_is_refused_in_any_split(case: str) -> None:
    data = SMUGGLING[case].encode("latin-1")
    for cut in range(len(data) + 1):
        parser = RequestParser()
        with pytest.raises(FramingError):
            parser.feed(data[:cut])
            parser.feed(data[cut:])


def test_identical_repeated_content_lengths_are_one_length() -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
    data += b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
    out = RequestParser().feed(data)
    assert [i.request.header("Host") for i in out if isinstance(i, Head)] == ["a", "b"]


def test_a_get_without_length_has_no_body_so_the_next_bytes_are_a_request() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: denied.test\r\n\r\n"
    heads = [i for i in RequestParser().feed(data) if isinstance(i, Head)]
    assert [h.request.header("Host") for h in heads] == ["a", "denied.test"]


def test_a_body_that_looks_like_a_request_is_body() -> None:
    inner = b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n"
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(inner), inner)
    heads = [i for i in RequestParser().feed(data) if isinstance(i, Head)]
    assert len(heads) == 1


def test_oversized_heads_are_refused() -> None:
    parser = RequestParser(max_head_bytes=100)
    with pytest.raises(FramingError, match="too large"):
        parser.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 200)


@pytest.mark.parametrize(
    ("head", "explicit", "expected"),
    [
        ("GET / HTTP/1.1\r\nHost: a.test:81\r\n\r\n", False, ("a.test", 81)),
        ("GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", False, ("a.test", None)),
        ("GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n", True, ("a.test", None)),
        ("GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n", False, "disagrees"),
        ("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nHost: a\r\n\r\n", False, "upgrade"),
        ("GET / HTTP/1.1\r\nUpgrade: h2c\r\nHost: a\r\n\r\n", True, "upgrade"),
        ("CONNECT b.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n", False, "CONNECT"),
        ("GET / HTTP/1.1\r\n\r\n", False, "no Host"),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", False, "more than one Host"),
        ("GET /x HTTP/1.1\r\nHost: a\r\n\r\n", True, "absolute http:// URI"),
    ],
)
def test_request_authority(head: str, explicit: bool, expected: tuple[str, int | None] | str) -> None:
    (parsed,) = [i for i in RequestParser().feed(head.encode()) if isinstance(i, Head)]
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            request_authority(parsed.request, explicit=explicit)
    else:
        assert request_authority(parsed.request, explicit=explicit) == expected


def test_a_caller_may_move_body_bytes_itself_and_framing_continues() -> None:
    parser = RequestParser()
    out = parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab")
    assert [i for i in out if isinstance(i, bytes)] == [b"ab"] and parser.body_pending == 8
    parser.skip_body(8)
    out = parser.feed(b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe")
    assert parser.body_pending == 3
    parser.skip_body(3)
    assert parser.feed(b"\r\n0\r\n\r\n") == [b"\r\n0\r\n\r\n"]
    assert parser.between_requests
    with pytest.raises(ValueError):
        parser.skip_body(1)


def test_a_body_of_tiny_chunks_is_parsed_in_one_pass() -> None:
    """Each chunk line used to slice off a copy of the rest of the read and hand back one small bytes
    object per line: 96 KB of `1\\r\\nx\\r\\n` from a hostile app cost over a second of the event loop
    (quadratic) and ~18x its size in memory. Parsed by index now: the same items, one run of body
    bytes, and memory a small multiple of the input (tracemalloc's peak: deterministic, not a time)."""
    import tracemalloc

    body = b"1\r\nx\r\n" * 16000 + b"0\r\n\r\n"
    request = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    parser = RequestParser()
    tracemalloc.start()
    try:
        items = parser.feed(request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [type(i) for i in items] == [Head, bytes] and items[1] == body and parser.between_requests
    assert peak < 5 * len(request), peak
