"""First-bytes parsing: real ClientHellos from Python's TLS stack (whole, fragmented, split), HTTP heads."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.sidecar.egress.sniff import (
    HTTP,
    NEED_MORE,
    TCP,
    TLS,
    parse_request_head,
    sniff,
    split_host_port,
)


def client_hello(server_name: str | None) -> bytes:
    """The bytes a real TLS client sends first (Python's OpenSSL), captured through memory BIOs."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake message split into several TLS records of at most `size` payload bytes."""
    assert hello[0] == 0x16
    payload = hello[5:]
    out = b""
    for start in range(0, len(payload), size):
        piece = payload[start : start + size]
        out += hello[:3] + len(piece).to_bytes(2, "big") + piece
    return out


def test_sni_from_real_client_hello() -> None:
    found = sniff(client_hello("api.example.com"))
    assert (found.kind, found.name) == (TLS, "api.example.com")


def test_client_hello_without_sni() -> None:
    found = sniff(client_hello(None))
    assert found.kind == TLS and found.name is None


@pytest.mark.parametrize("size", [1, 7, 64, 300])
def test_sni_from_hello_fragmented_over_records(size: int) -> None:
    found = sniff(refragment(client_hello("frag.example.com"), size))
    assert (found.kind, found.name) == (TLS, "frag.example.com")


def test_every_prefix_asks_for_more_then_decides() -> None:
    hello = refragment(client_hello("prefix.example.com"), 100)
    for cut in range(1, len(hello)):
        assert sniff(hello[:cut]).kind == NEED_MORE, cut
    assert sniff(hello).name == "prefix.example.com"


def test_not_a_client_hello() -> None:
    assert sniff(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00").name is None  # ServerHello type
    assert sniff(b"\x16\x02\x00\x00\x05hello").kind == TLS  # bad version: judged by IP alone
    assert sniff(b"SSH-2.0-OpenSSH_9.6\r\n").kind == TCP
    assert sniff(b"\x00\x01\x02").kind == TCP


@given(st.binary(max_size=600))
@settings(deadline=None)  # never fail on a busy machine's timing
def test_sniff_never_raises(data: bytes) -> None:
    assert sniff(data).kind in (TLS, HTTP, TCP, NEED_MORE)


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0, max_value=400))
@settings(deadline=None)  # each example runs a real TLS client: never fail on a busy machine's timing
def test_corrupted_hello_never_raises(noise: bytes, at: int) -> None:
    hello = bytearray(client_hello("fuzz.example.com"))
    at = at % len(hello)
    hello[at : at + len(noise)] = noise
    assert sniff(bytes(hello)).kind in (TLS, HTTP, TCP, NEED_MORE)


def test_http_host() -> None:
    found = sniff(b"GET /x HTTP/1.1\r\nHost: Api.Example.com:8080\r\nAccept: */*\r\n\r\n")
    assert (found.kind, found.name) == (HTTP, "Api.Example.com")
    assert sniff(b"GET /x HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n").name == "fd00::1"
    assert sniff(b"GET http://user@abs.example/x HTTP/1.1\r\nHost: other\r\n\r\n").name == "abs.example"


def test_http_incomplete_and_odd() -> None:
    assert sniff(b"GET / HTTP/1.1\r\nHost: a").kind == NEED_MORE
    assert sniff(b"GE").kind == NEED_MORE
    assert sniff(b"GET / HTTP/1.1\r\n\r\n").name is None
    assert sniff(b"HELLO world\r\n").kind == TCP


def test_request_head_and_authority() -> None:
    raw = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\nrest"
    head = parse_request_head(raw)
    assert head is not None and head.method == "CONNECT" and raw[head.size :] == b"rest"
    assert head.header("HOST") == "a.test:443"
    assert split_host_port("a.test:443", None) == ("a.test", 443)
    assert split_host_port("[::1]:8443", None) == ("::1", 8443)
    assert split_host_port("a.test", 80) == ("a.test", 80)
    with pytest.raises(ValueError):
        split_host_port("a.test:99999", None)
    with pytest.raises(ValueError):
        parse_request_head(b"garbage\r\n\r\n")
