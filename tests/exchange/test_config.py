"""`exchange` config parsing and the pure parts of the client (form, answer checks, redaction)."""

from __future__ import annotations

import base64
import json

import pytest

from outrider.sidecar.config import ConfigError, parse
from outrider.sidecar.exchange import ExchangeError
from outrider.sidecar.exchange.client import (
    GRANT_TYPE,
    TokenCache,
    basic_authorization,
    cache_key,
    classify_error,
    exchange_form,
    parse_success,
    redact,
)
from outrider.sidecar.exchange.config import ExchangeConfig

BASE = {"token_endpoint": "https://idp.example/token", "issuer": "https://idp.example"}


def test_defaults_disabled_without_endpoint():
    config = ExchangeConfig.from_mapping({"audience": "https://api.example.com"})
    assert not config.enabled and config.audience == "https://api.example.com"
    assert config.auth == "jwt-svid" and config.header == "Authorization"


def test_full_config_via_sidecar_parse():
    config = parse({"exchange": {**BASE, "audience": "a", "actor_token": True, "cache_size": 10}}).exchange
    assert config.enabled and config.actor_token and config.cache_size == 10


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"token_endpoint": "https://idp.example/token"}, "exchange.issuer"),
        ({**BASE, "auth": "kerberos"}, "exchange.auth"),
        ({**BASE, "auth": "client-secret", "client_id": "c"}, "exchange.client_secret_file"),
        ({**BASE, "auth": "x509-svid"}, "exchange.client_id"),
        (
            {**BASE, "token_endpoint": "http://idp/token", "auth": "x509-svid", "client_id": "c"},
            "token_endpoint",
        ),
        ({**BASE, "token_endpoint": "idp.example/token"}, "exchange.token_endpoint"),
        ({**BASE, "timeout_seconds": 0}, "exchange.timeout_seconds"),
        ({**BASE, "cache_size": 1.5}, "exchange.cache_size"),
        ({**BASE, "actor_token": "yes"}, "exchange.actor_token"),
        ({**BASE, "tokne_endpoint": "x"}, "tokne_endpoint"),
        ({**BASE, "enabled": True, "token_endpoint": None}, "exchange.token_endpoint"),
        ({**BASE, "cache_max_ttl_seconds": 0}, "exchange.cache_max_ttl_seconds"),
        ({**BASE, "cache_max_ttl_seconds": "1h"}, "exchange.cache_max_ttl_seconds"),
        ({**BASE, "cache_max_ttl_seconds": 30}, "greater than cache_skew_seconds (30)"),
    ],
)
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        ExchangeConfig.from_mapping(data)
    assert key in str(info.value)


def test_form_carries_rfc8693_fields():
    config = ExchangeConfig.from_mapping({**BASE, "resource": "https://api.example.com/v1"})
    form = exchange_form(config, "subj", audience="aud", scope="s1 s2", actor_token="act")
    assert form == {
        "grant_type": GRANT_TYPE,
        "subject_token": "subj",
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "audience": "aud",
        "resource": "https://api.example.com/v1",
        "scope": "s1 s2",
        "actor_token": "act",
        "actor_token_type": "urn:ietf:params:oauth:token-type:jwt",
    }


def test_basic_authorization_form_encodes_first():
    header = basic_authorization("my client", "p:w/d+")
    assert base64.b64decode(header.removeprefix("Basic ")).decode() == "my%20client:p%3Aw%2Fd%2B"


def test_cache_key_hashes_the_subject():
    key = cache_key("secret-token", "a", None, None)
    assert "secret-token" not in repr(key) and len(key.subject_hash) == 64


def test_parse_success_without_expires_in_is_used_once():
    body = json.dumps(
        {
            "access_token": "t",
            "token_type": "bearer",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        }
    ).encode()
    issued = parse_success(
        body, requested_token_type="urn:ietf:params:oauth:token-type:access_token", audience="a", now=100.0
    )
    assert issued.expires_at == 100.0 and issued.token_type == "Bearer"
    cache = TokenCache(4, 0.0, clock=lambda: 100.0)
    cache.put(cache_key("x", "a", None, None), issued)
    assert len(cache) == 0


def test_redact_removes_secrets_and_jwts():
    text = redact("token eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln and mysecret\nnext", ("mysecret",))
    assert text == "token [redacted] and [redacted] next"


def test_classify_error_ignores_hostile_error_codes():
    err = classify_error(400, b'{"error": "eyJ\\u0000bad\\"code"}', ())
    assert err.http_status == 502 and err.oauth_error is None and "HTTP 400" in err.message


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_token = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=16, max_size=60
)


@settings(max_examples=200, deadline=None)
@given(
    token=_token,
    secret=_token,
    code=st.one_of(st.sampled_from(["invalid_grant", "invalid_client", "x"]), st.text(max_size=20)),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    status=st.sampled_from([400, 401, 403, 500, 503]),
)
def test_error_messages_never_carry_the_secrets(token, secret, code, before, after, status):
    body = json.dumps(
        {"error": code, "error_description": f"{before}{token}{after}{secret}", "echo": token}
    ).encode()
    err = classify_error(status, body, (token, secret))
    for text in (err.message, str(err)):
        assert token not in text and secret not in text
    assert err.http_status in (403, 502, 503)


@settings(max_examples=100, deadline=None)
@given(token=_token, field=st.sampled_from(["token_type", "issued_token_type"]))
def test_malformed_answer_messages_never_carry_tokens(token, field):
    answer = {
        "access_token": token,
        "token_type": "Bearer",
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "expires_in": 60,
    }
    answer[field] = token  # an IdP that puts the token where a type name belongs
    with pytest.raises(ExchangeError) as info:
        parse_success(
            json.dumps(answer).encode(),
            requested_token_type="urn:ietf:params:oauth:token-type:access_token",
            audience="a",
            now=0.0,
        )
    assert token not in info.value.message
