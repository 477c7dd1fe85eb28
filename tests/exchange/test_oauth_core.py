"""The OAuth core every exchange profile shares, pinned answer by answer: what the caller is told (message,
HTTP status, outcome) for each kind of token-endpoint answer, and that no credential ever shows in it."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from outrider.sidecar.exchange import ExchangeError
from outrider.sidecar.exchange.oauth import (
    basic_authorization,
    cache_key,
    carries_credential,
    classify_error,
    parse_success,
    redact,
)

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
MALFORMED = "the identity provider's token exchange answer is malformed: "


def _answer(**fields: Any) -> bytes:
    return json.dumps(
        {"access_token": "tok-123", "issued_token_type": ACCESS, "token_type": "Bearer", **fields}
    ).encode()


def _refusal(body: bytes, **kwargs: Any) -> ExchangeError:
    with pytest.raises(ExchangeError) as caught:
        parse_success(
            body, requested_token_type=kwargs.pop("requested", None), audience="api", now=100.0, **kwargs
        )
    return caught.value


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>", "the answer is not JSON"),
        (b"\xff\xfe", "the answer is not JSON"),
        (b"[1, 2]", "the answer is not a JSON object"),
        (_answer(access_token=""), "access_token is missing or not a string"),
        (_answer(access_token=7), "access_token is missing or not a string"),
        (_answer(issued_token_type=""), "issued_token_type is missing (RFC 8693 requires it)"),
        (_answer(issued_token_type=None), "issued_token_type is missing (RFC 8693 requires it)"),
        (_answer(token_type="mac"), "token_type 'mac' is not Bearer (the only type the proxy can forward)"),
        (_answer(token_type=None), "token_type '?' is not Bearer (the only type the proxy can forward)"),
        (_answer(expires_in=0), "expires_in is not a positive number"),
        (_answer(expires_in=True), "expires_in is not a positive number"),
        (_answer(expires_in="60"), "expires_in is not a positive number"),
        # JSON's NaN/Infinity and 1e400 decode to non-finite floats (a NaN expiry never compared as
        # reached: cached for ever); an integer past the float range made float() raise (a 500).
        (_answer(expires_in=float("nan")), "expires_in is not a finite number"),
        (_answer(expires_in=float("inf")), "expires_in is not a finite number"),
        (_answer(expires_in=-float("inf")), "expires_in is not a positive number"),
        (_answer(expires_in=10**400), "expires_in is not a finite number"),
        (_answer(expires_in=1.7976931348623157e308), "expires_in is not a finite number"),
        (_answer().replace(b"}", b', "expires_in": 1e400}'), "expires_in is not a finite number"),
    ],
)
def test_malformed_answers_in_full(body: bytes, why: str) -> None:
    error = _refusal(body)
    assert (error.message, error.outcome, error.http_status, error.idp_status) == (
        MALFORMED + why,
        "idp_error",
        502,
        200,
    )


def test_the_largest_finite_expiry_is_kept() -> None:
    huge = parse_success(_answer(expires_in=1e308), requested_token_type=None, audience=None, now=100.0)
    assert huge.expires_at == 1e308 + 100.0
    near = 2**1023  # an integer inside the float range
    assert parse_success(
        _answer(expires_in=near), requested_token_type=None, audience=None, now=0.0
    ).expires_at == float(near)


def test_an_unexpected_issued_type_is_named_unless_it_could_carry_a_credential() -> None:
    jwt_type = "urn:ietf:params:oauth:token-type:jwt"
    error = _refusal(_answer(issued_token_type=jwt_type), requested=ACCESS)
    assert error.message == MALFORMED + f"issued_token_type {jwt_type!r} is not the requested {ACCESS!r}"
    # An IdP echoing our credential (or the issued token itself) as the type: shown as "?".
    for odd in ("s3cret-client", "tok-123", JWT):
        error = _refusal(_answer(issued_token_type=odd), requested=ACCESS, secrets=("s3cret-client",))
        assert error.message == MALFORMED + f"issued_token_type '?' is not the requested {ACCESS!r}", odd
    error = _refusal(_answer(token_type="tok-123"))
    assert "tok-123" not in error.message


def test_a_good_answer_and_the_grants_without_issued_token_type() -> None:
    token = parse_success(_answer(expires_in=60), requested_token_type=ACCESS, audience="api", now=100.0)
    assert (
        token.access_token,
        token.token_type,
        token.issued_token_type,
        token.expires_at,
        token.audience,
    ) == (
        "tok-123",
        "Bearer",
        ACCESS,
        160.0,
        "api",
    )
    assert (
        parse_success(
            _answer(token_type="bearer"), requested_token_type=None, audience=None, now=5.0
        ).expires_at
        == 5.0
    )
    bare = json.dumps({"access_token": "t", "token_type": "Bearer"}).encode()
    assert _refusal(bare).message == MALFORMED + "issued_token_type is missing (RFC 8693 requires it)"
    kwargs: dict[str, Any] = {"audience": None, "now": 0.0, "require_issued_type": False}
    assert parse_success(bare, requested_token_type=None, **kwargs).issued_token_type == ACCESS
    assert parse_success(bare, requested_token_type="urn:x", **kwargs).issued_token_type == "urn:x"


@pytest.mark.parametrize(
    ("status", "body", "message", "outcome", "http_status", "code"),
    [
        (
            400,
            b'{"error": "invalid_grant", "error_description": "user   is\\n disabled"}',
            "the identity provider refused to exchange the caller's token (invalid_grant): user is disabled",
            "denied",
            403,
            "invalid_grant",
        ),
        (
            400,
            b'{"error": "invalid_target"}',
            "the identity provider refused to exchange the caller's token (invalid_target)",
            "denied",
            403,
            "invalid_target",
        ),
        (
            401,
            b'{"error": "invalid_client", "error_description": "bad assertion"}',
            "the identity provider rejected the sidecar's token exchange request (invalid_client): bad "
            "assertion; check the exchange configuration and the sidecar's client registration at the IdP",
            "idp_error",
            502,
            "invalid_client",
        ),
        (
            400,
            b'{"error": "invalid_request", "error_description": 5}',
            "the identity provider rejected the sidecar's token exchange request (invalid_request); check "
            "the exchange configuration and the sidecar's client registration at the IdP",
            "idp_error",
            502,
            "invalid_request",
        ),
        (
            503,
            b"down for maintenance",
            "the identity provider is unavailable (HTTP 503 from its token endpoint)",
            "idp_unavailable",
            503,
            None,
        ),
        (500, b"[1]", "the identity provider's token endpoint failed (HTTP 500)", "idp_error", 502, None),
        (
            400,
            b'{"error": "s3cret-client"}',
            "the identity provider's token endpoint failed (HTTP 400)",
            "idp_error",
            502,
            None,
        ),
        (
            400,
            b'{"error": "a\\"b"}',
            "the identity provider's token endpoint failed (HTTP 400)",
            "idp_error",
            502,
            None,
        ),
    ],
)
def test_error_answers_in_full(
    status: int, body: bytes, message: str, outcome: str, http_status: int, code: str | None
) -> None:
    error = classify_error(status, body, ("s3cret-client",))
    assert (error.message, error.outcome, error.http_status, error.idp_status, error.oauth_error) == (
        message,
        outcome,
        http_status,
        status,
        code,
    )


def test_descriptions_are_redacted_and_short() -> None:
    secrets = ("s3cret-client", "")
    text = f"client s3cret-client sent {JWT}\n\t and more"
    assert redact(text, secrets) == "client [redacted] sent [redacted] and more"
    assert redact("x" * 300, ()) == "x" * 200
    assert carries_credential("it was s3cret-client", secrets)
    assert carries_credential(f"token {JWT}", secrets)
    assert not carries_credential("nothing here", secrets)
    error = classify_error(
        400, json.dumps({"error": "invalid_grant", "error_description": text}).encode(), secrets
    )
    assert "s3cret" not in error.message and JWT not in error.message


def test_basic_authorization_form_encodes_both_parts() -> None:
    header = basic_authorization("svc/a:b", "p/w d%")
    assert header.startswith("Basic ")
    assert base64.b64decode(header.removeprefix("Basic ")).decode() == "svc%2Fa%3Ab:p%2Fw%20d%25"


def test_the_exchange_request_in_full_and_every_credential_in_it_is_redacted_from_echoes() -> None:
    from outrider.sidecar.exchange.config import ExchangeConfig
    from outrider.sidecar.exchange.oauth import ClientCredential, authenticated, exchange_form

    config = ExchangeConfig.from_mapping(
        {"audience": "https://api.example.com", "resource": "https://api.example.com/v1"}
    )
    form = exchange_form(config, "user-token-1", audience="api", scope="read", actor_token="actor-2")
    assert form == {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": "user-token-1",
        "subject_token_type": ACCESS,
        "requested_token_type": ACCESS,
        "audience": "api",
        "resource": "https://api.example.com/v1",
        "scope": "read",
        "actor_token": "actor-2",
        "actor_token_type": "urn:ietf:params:oauth:token-type:jwt",
    }
    posted = authenticated(form, ClientCredential(client_id="svc", secret="pw-3", secret_method="post"))
    assert posted.form["client_secret"] == "pw-3" and "Authorization" not in posted.headers
    basic = authenticated(form, ClientCredential(client_id="svc", secret="pw-4"))
    assert basic.headers["Authorization"] == basic_authorization("svc", "pw-4")
    for request, secret in ((posted, "pw-3"), (basic, basic_authorization("svc", "pw-4")[6:])):
        echo = f"got user-token-1 actor-2 {secret}"
        body = json.dumps({"error": "invalid_grant", "error_description": echo}).encode()
        message = classify_error(400, body, request.secrets()).message
        assert message.endswith("(invalid_grant): got [redacted] [redacted] [redacted]"), message


def test_request_headers_and_short_lived_answers() -> None:
    from outrider.sidecar.exchange.oauth import ClientCredential, authenticated

    assert authenticated({}, ClientCredential(client_id="svc")).headers == {"Accept": "application/json"}
    one_second = parse_success(_answer(expires_in=1), requested_token_type=None, audience=None, now=7.0)
    assert (one_second.expires_at, one_second.audience) == (8.0, "")


def test_the_cache_key_is_the_tokens_sha256_whoever_computed_it() -> None:
    """The proxy passes the digest its authenticator computed (one hash per request): the entry is the
    one the token alone picks, and the token itself is never part of the key."""
    digest = hashlib.sha256(JWT.encode()).hexdigest()
    own = cache_key(JWT, "https://api", "read", "https://mcp")
    assert own.subject_hash == digest and JWT not in repr(own)
    assert cache_key(JWT, "https://api", "read", "https://mcp", subject_hash=digest) == own
    assert (own.audience, own.scope, own.resource) == ("https://api", "read", "https://mcp")
    # Taken as given (not hashed again): a caller that passes it must pass this token's.
    assert cache_key("other", None, None, None, subject_hash=digest).subject_hash == digest
