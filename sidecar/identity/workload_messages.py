"""The SPIFFE Workload API messages the sidecar sends and reads, as protobuf wire bytes (pure).

Why not the generated protobuf classes: `google.protobuf` and the descriptor pool cost ~1.9 MB of
idle RSS for three small messages. Decoding follows protobuf's rules for these proto3 messages
(`workload.proto`): unknown fields and known fields of another wire type are skipped, the last value
of a singular field wins, a map's later entry for a key replaces an earlier one, strings must be
UTF-8. Groups (wire types 3 and 4, long deprecated and never sent by a Workload API) are refused.
`tests/identity/test_workload_messages.py` holds this to the generated classes, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10
_MAX_TAG = 0xFFFFFFFF  # field numbers end at 2**29 - 1; a tag is a 32-bit varint

# Requests without fields (X509SVIDRequest, JWTBundlesRequest) encode to nothing.
EMPTY_REQUEST = b""


class MessageError(ValueError):
    """The bytes are not a well-formed message of the expected type (never holds their content)."""


@dataclass(frozen=True)
class X509Svid:
    spiffe_id: str
    x509_svid: bytes  # ASN.1 DER certificates, leaf first
    x509_svid_key: bytes = field(repr=False)  # PKCS#8 DER private key: never in a repr
    bundle: bytes  # ASN.1 DER CA certificates of the SVID's own trust domain
    hint: str = ""


@dataclass(frozen=True)
class X509SvidResponse:
    svids: tuple[X509Svid, ...]
    crl: tuple[bytes, ...]
    federated_bundles: dict[str, bytes]


@dataclass(frozen=True)
class JwtSvid:
    spiffe_id: str
    svid: str = field(repr=False)  # the bearer token: never in a repr
    hint: str = ""


@dataclass(frozen=True)
class JwtSvidResponse:
    svids: tuple[JwtSvid, ...]


@dataclass(frozen=True)
class JwtBundlesResponse:
    bundles: dict[str, bytes]  # JWKS JSON by trust domain (SPIFFE ID or name, as the agent sends it)


def encode_jwt_svid_request(audiences: Sequence[str], spiffe_id: str = "") -> bytes:
    """JWTSVIDRequest: `repeated string audience = 1; string spiffe_id = 2;`"""
    out = bytearray()
    for audience in audiences:
        _put_bytes(out, 1, audience.encode())
    if spiffe_id:
        _put_bytes(out, 2, spiffe_id.encode())
    return bytes(out)


def decode_x509_svid_response(data: bytes) -> X509SvidResponse:
    svids: list[X509Svid] = []
    crl: list[bytes] = []
    federated: dict[str, bytes] = {}
    for number, value in _length_fields(data, "X509SVIDResponse"):
        if number == 1:
            svids.append(_x509_svid(value))
        elif number == 2:
            crl.append(value)
        elif number == 3:
            key, entry = _map_entry(value, "X509SVIDResponse.federated_bundles")
            federated[key] = entry
    return X509SvidResponse(svids=tuple(svids), crl=tuple(crl), federated_bundles=federated)


def decode_jwt_svid_response(data: bytes) -> JwtSvidResponse:
    svids = []
    for number, value in _length_fields(data, "JWTSVIDResponse"):
        if number == 1:
            strings = _strings(value, "JWTSVID", 3)
            svids.append(JwtSvid(spiffe_id=strings[1], svid=strings[2], hint=strings[3]))
    return JwtSvidResponse(svids=tuple(svids))


def decode_jwt_bundles_response(data: bytes) -> JwtBundlesResponse:
    bundles: dict[str, bytes] = {}
    for number, value in _length_fields(data, "JWTBundlesResponse"):
        if number == 1:
            key, entry = _map_entry(value, "JWTBundlesResponse.bundles")
            bundles[key] = entry
    return JwtBundlesResponse(bundles=bundles)


def _x509_svid(data: bytes) -> X509Svid:
    raw: dict[int, bytes] = {}
    for number, value in _length_fields(data, "X509SVID"):
        if 1 <= number <= 5:
            raw[number] = value  # singular: the last occurrence wins
    return X509Svid(
        spiffe_id=_text(raw.get(1, b""), "X509SVID.spiffe_id"),
        x509_svid=raw.get(2, b""),
        x509_svid_key=raw.get(3, b""),
        bundle=raw.get(4, b""),
        hint=_text(raw.get(5, b""), "X509SVID.hint"),
    )


def _strings(data: bytes, where: str, count: int) -> dict[int, str]:
    """A message whose fields 1..count are all singular strings."""
    raw: dict[int, bytes] = {}
    for number, value in _length_fields(data, where):
        if 1 <= number <= count:
            raw[number] = value
    return {n: _text(raw.get(n, b""), f"{where} field {n}") for n in range(1, count + 1)}


def _map_entry(data: bytes, where: str) -> tuple[str, bytes]:
    """A `map<string, bytes>` entry: `string key = 1; bytes value = 2;`"""
    key, value = b"", b""
    for number, item in _length_fields(data, where):
        if number == 1:
            key = item
        elif number == 2:
            value = item
    return _text(key, f"{where} key"), value


def _text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(f"{where} is not UTF-8") from None


def _length_fields(data: bytes, where: str) -> Iterator[tuple[int, bytes]]:
    """(field number, bytes) of every length-delimited field; other wire types are skipped."""
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = _varint(view, pos, where)
        number, wire = tag >> 3, tag & 7
        if number == 0 or tag > _MAX_TAG:
            raise MessageError(f"{where}: field number {number} out of range")
        if wire == _VARINT:
            _, pos = _varint(view, pos, where)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LENGTH:
            length, pos = _varint(view, pos, where)
            if length > end - pos:
                raise MessageError(f"{where}: field {number} runs past the end of the message")
            yield number, bytes(view[pos : pos + length])
            pos += length
            continue
        else:
            raise MessageError(f"{where}: unsupported wire type {wire} (field {number})")
        if pos > end:
            raise MessageError(f"{where}: field {number} runs past the end of the message")


def _varint(view: memoryview, pos: int, where: str) -> tuple[int, int]:
    result = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(view):
            raise MessageError(f"{where}: truncated varint")
        byte = view[pos + i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos + i + 1
        shift += 7
    raise MessageError(f"{where}: varint longer than {_MAX_VARINT_BYTES} bytes")


def _put_bytes(out: bytearray, number: int, value: bytes) -> None:
    _put_varint(out, number << 3 | _LENGTH)
    _put_varint(out, len(value))
    out += value


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
