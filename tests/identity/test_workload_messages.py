"""The Workload API wire codec (`workload_messages`) against the generated protobuf classes.

The generated classes py-spiffe ships (`spiffe/_proto/workload_pb2.py`, run on the real protobuf
runtime) are the reference: what they write, the codec reads to the same values; what they refuse,
the codec refuses; the request bytes are the same.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spiffe._proto import workload_pb2

from outrider.sidecar.identity import workload_messages as wm

text = st.text(max_size=40)
blob = st.binary(max_size=64)
fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _varint(value: int) -> bytes:
    out = bytearray()
    wm._put_varint(out, value)
    return bytes(out)


@st.composite
def unknown_fields(draw: st.DrawFn, known: tuple[int, ...]) -> bytes:
    """Fields the reader must skip: unknown numbers, and known numbers with another wire type."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        number = draw(st.integers(1, 40) | st.sampled_from(known))
        wire = draw(st.sampled_from((0, 1, 2, 5)))
        if number in known and wire == 2:
            wire = 0
        tag = _varint(number << 3 | wire)
        if wire == 0:
            out += tag + _varint(draw(st.integers(0, 2**64 - 1)))
        elif wire == 1:
            out += tag + draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += tag + draw(st.binary(min_size=4, max_size=4))
        else:
            value = draw(blob)
            out += tag + _varint(len(value)) + value
    return out


def _x509_svid(draw: st.DrawFn) -> Any:
    return workload_pb2.X509SVID(
        spiffe_id=draw(text),
        x509_svid=draw(blob),
        x509_svid_key=draw(blob),
        bundle=draw(blob),
        hint=draw(text),
    )


@st.composite
def x509_responses(draw: st.DrawFn) -> bytes:
    message = workload_pb2.X509SVIDResponse(
        svids=[_x509_svid(draw) for _ in range(draw(st.integers(0, 3)))],
        crl=draw(st.lists(blob, max_size=2)),
        federated_bundles=draw(st.dictionaries(text, blob, max_size=3)),
    )
    raw: bytes = message.SerializeToString()
    # unknown fields at the top level and inside an SVID, and a repeated singular field (last wins)
    extra = draw(unknown_fields((1, 2, 3)))
    if message.svids and draw(st.booleans()):
        inner = message.svids[0].SerializeToString() + draw(unknown_fields((1, 2, 3, 4, 5)))
        inner += b"\x0a" + _varint(len(b"spiffe://last")) + b"spiffe://last"
        extra += b"\x0a" + _varint(len(inner)) + inner
    return raw + extra


def _same_x509(ours: wm.X509SvidResponse, theirs: Any) -> None:
    assert [(s.spiffe_id, s.x509_svid, s.x509_svid_key, s.bundle, s.hint) for s in ours.svids] == [
        (s.spiffe_id, s.x509_svid, s.x509_svid_key, s.bundle, s.hint) for s in theirs.svids
    ]
    assert list(ours.crl) == list(theirs.crl)
    assert ours.federated_bundles == dict(theirs.federated_bundles)


@fast
@given(x509_responses())
def test_x509_responses_read_as_protobuf_reads_them(raw: bytes) -> None:
    _same_x509(wm.decode_x509_svid_response(raw), workload_pb2.X509SVIDResponse.FromString(raw))


@st.composite
def jwt_responses(draw: st.DrawFn) -> bytes:
    svids = [
        workload_pb2.JWTSVID(spiffe_id=draw(text), svid=draw(text), hint=draw(text))
        for _ in range(draw(st.integers(0, 3)))
    ]
    return bytes(workload_pb2.JWTSVIDResponse(svids=svids).SerializeToString()) + draw(unknown_fields((1,)))


@fast
@given(jwt_responses())
def test_jwt_svid_responses_read_as_protobuf_reads_them(raw: bytes) -> None:
    theirs = workload_pb2.JWTSVIDResponse.FromString(raw)
    ours = wm.decode_jwt_svid_response(raw)
    assert [(s.spiffe_id, s.svid, s.hint) for s in ours.svids] == [
        (s.spiffe_id, s.svid, s.hint) for s in theirs.svids
    ]


@st.composite
def bundle_responses(draw: st.DrawFn) -> bytes:
    raw = workload_pb2.JWTBundlesResponse(bundles=draw(st.dictionaries(text, blob, max_size=4)))
    out = bytes(raw.SerializeToString()) + draw(unknown_fields((1,)))
    if draw(st.booleans()):  # a later entry for the same key replaces the earlier one
        entry = workload_pb2.JWTBundlesResponse(bundles={"td": draw(blob)}).SerializeToString()
        out = (
            bytes(workload_pb2.JWTBundlesResponse(bundles={"td": b"first"}).SerializeToString()) + out + entry
        )
    return out


@fast
@given(bundle_responses())
def test_jwt_bundle_responses_read_as_protobuf_reads_them(raw: bytes) -> None:
    theirs = workload_pb2.JWTBundlesResponse.FromString(raw)
    assert wm.decode_jwt_bundles_response(raw).bundles == dict(theirs.bundles)


@fast
@given(st.lists(text, max_size=4), text)
def test_jwt_svid_requests_are_the_bytes_protobuf_writes(audiences: list[str], spiffe_id: str) -> None:
    expected = workload_pb2.JWTSVIDRequest(audience=audiences, spiffe_id=spiffe_id).SerializeToString()
    assert wm.encode_jwt_svid_request(audiences, spiffe_id) == expected
    assert workload_pb2.X509SVIDRequest().SerializeToString() == wm.EMPTY_REQUEST
    assert workload_pb2.JWTBundlesRequest().SerializeToString() == wm.EMPTY_REQUEST


DECODERS = [
    (wm.decode_x509_svid_response, workload_pb2.X509SVIDResponse),
    (wm.decode_jwt_svid_response, workload_pb2.JWTSVIDResponse),
    (wm.decode_jwt_bundles_response, workload_pb2.JWTBundlesResponse),
]


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=48), st.integers(0, 2))
def test_what_protobuf_refuses_is_refused(raw: bytes, which: int) -> None:
    """Arbitrary bytes: refused by both, or read to the same values. The codec may refuse more
    (groups, which protobuf skips and no Workload API sends), never less."""
    decode, cls = DECODERS[which]
    try:
        theirs = cls.FromString(raw)
    except DecodeError:
        with pytest.raises(wm.MessageError):
            decode(raw)
        return
    try:
        ours = decode(raw)
    except wm.MessageError:
        return
    assert decode(theirs.SerializeToString()) == ours


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x0a\x05abc", "runs past the end"),  # a length beyond the message
        (b"\x0a", "truncated varint"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "varint longer"),
        (b"\x0b\x0c", "wire type 3"),  # a group
        (b"\x00\x00", "field number 0 out of range"),
        (b"\x80\x80\x80\x80\x10\x00", "out of range"),  # a tag past 32 bits
        (b"\x0a\x04\x0a\x02\xff\xfe", "not UTF-8"),  # an SVID whose spiffe_id is not UTF-8
        (b"\x09\x01\x02", "runs past the end"),  # a fixed64 cut short
    ],
)
def test_malformed_answers_are_refused_with_a_reason(raw: bytes, why: str) -> None:
    with pytest.raises(wm.MessageError, match=why) as caught:
        wm.decode_x509_svid_response(raw)
    assert "\xff" not in str(caught.value)


def test_key_material_and_tokens_stay_out_of_reprs() -> None:
    svid = wm.X509Svid(spiffe_id="spiffe://td/a", x509_svid=b"c", x509_svid_key=b"SECRET-KEY", bundle=b"b")
    token = wm.JwtSvid(spiffe_id="spiffe://td/a", svid="SECRET.TOKEN.X")
    assert "SECRET" not in repr(svid) and "SECRET" not in repr(token)
