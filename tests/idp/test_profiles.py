"""The provider profiles as pure functions: the exact request each provider documents, and how each
provider's errors reach the MCP caller (step-up challenges, app-only tokens, our own misconfiguration)."""

from __future__ import annotations

import json

import pytest

from outrider.sidecar.config import ConfigError
from outrider.sidecar.exchange import ExchangeError
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.exchange.oauth import ClientCredential
from outrider.sidecar.exchange.profiles import (
    ASSERTION_TYPE_JWT_BEARER,
    ASSERTION_TYPE_JWT_SPIFFE,
    profile_for,
)

USER = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW9mLXRoZS11c2VyLXRva2Vu"
SVID = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2lnbmF0dXJlLW9mLXRoZS1qd3Qtc3ZpZA"
ENTRA = {
    "profile": "entra-obo",
    "token_endpoint": "https://login.microsoftonline.com/tid/oauth2/v2.0/token",
    "client_id": "11111111-2222-3333-4444-555555555555",
    "scope": "api://downstream/.default",
}
OKTA = {
    "profile": "okta",
    "token_endpoint": "https://corp.okta.com/oauth2/default/v1/token",
    "client_id": "0oa-weather",
    "audience": "api://downstream",
    "scope": "downstream.read",
}


def test_entra_obo_request_is_the_documented_one() -> None:
    config = ExchangeConfig.from_mapping(ENTRA)
    profile = profile_for("entra-obo")
    assert profile.assertion_audience(config) == "api://AzureADTokenExchange"
    credential = ClientCredential(config.client_id, profile.assertion_type, SVID)
    request = profile.build(config, USER, audience=None, scope=config.scope, credential=credential)
    assert request.form == {
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "requested_token_use": "on_behalf_of",
        "assertion": USER,
        "scope": "api://downstream/.default",
        "client_id": ENTRA["client_id"],
        "client_assertion_type": ASSERTION_TYPE_JWT_BEARER,
        "client_assertion": SVID,
    }
    assert set(request.secrets()) == {USER, SVID}
    # Only an audience (the `outrider.dev/token-audience` case): Entra's `<App ID URI>/.default`.
    no_scope = ExchangeConfig.from_mapping({**ENTRA, "scope": None, "audience": "api://weather-api/"})
    built = profile.build(no_scope, USER, audience=None, scope=None, credential=credential)
    assert built.form["scope"] == "api://weather-api/.default"


def test_entra_secret_fallback_and_answer_without_issued_token_type() -> None:
    config = ExchangeConfig.from_mapping(
        {**ENTRA, "auth": "client-secret", "client_secret_file": "/x", "client_secret_method": "post"}
    )
    profile = profile_for("entra-obo")
    request = profile.build(
        config,
        USER,
        audience=None,
        scope=None,
        credential=ClientCredential(config.client_id, secret="p@ss w0rd!!", secret_method="post"),
    )
    assert request.form["client_secret"] == "p@ss w0rd!!" and "client_assertion" not in request.form
    body = json.dumps(
        {
            "token_type": "Bearer",
            "scope": "api://downstream/x",
            "expires_in": 3599,
            "ext_expires_in": 3599,
            "access_token": "issued-token-value",
        }
    )
    issued = profile.parse(body.encode(), config=config, audience=None, now=1000.0, secrets=())
    assert (issued.access_token, issued.expires_at) == ("issued-token-value", 4599.0)


def _entra_error(error: str, code: int, claims: str | None = None) -> bytes:
    body = {
        "error": error,
        "error_description": f"AADSTS{code}: something.\r\nTrace ID: 0\r\nCorrelation ID: 1\r\nTimestamp: x",
        "error_codes": [code],
    }
    if claims is not None:
        body["claims"] = claims
    return json.dumps(body).encode()


def test_entra_conditional_access_becomes_a_step_up_challenge() -> None:
    claims = '{"access_token":{"capolids":{"essential":true,"values":["policy-1"]}}}'
    profile = profile_for("entra-obo")
    mfa = profile.map_error(400, _entra_error("invalid_grant", 50076, claims), (USER,))
    assert (mfa.http_status, mfa.outcome, mfa.oauth_error) == (403, "step_up", "invalid_grant")
    assert (
        mfa.step_up is not None and mfa.step_up.error == "insufficient_scope" and mfa.step_up.claims == claims
    )
    enrol = profile.map_error(400, _entra_error("interaction_required", 50079, claims), (USER,))
    assert enrol.http_status == 403 and enrol.step_up is not None
    assert enrol.step_up.error == "interaction_required"
    # A claims value carrying a credential is not passed on (the step-up still is).
    leaky = profile.map_error(400, _entra_error("invalid_grant", 50076, json.dumps({"x": USER})), (USER,))
    assert leaky.step_up is not None and leaky.step_up.claims is None


def test_entra_app_only_token_is_a_clear_403() -> None:
    error = profile_for("entra-obo").map_error(400, _entra_error("invalid_grant", 7000114), ())
    assert error.http_status == 403 and error.step_up is None
    assert "app-only" in error.message and "user" in error.message


def test_entra_own_misconfiguration_is_502() -> None:
    error = profile_for("entra-obo").map_error(401, _entra_error("invalid_client", 700213), ())
    assert error.http_status == 502 and error.outcome == "idp_error" and "AADSTS700213" in error.message
    plain = profile_for("entra-obo").map_error(400, _entra_error("invalid_grant", 50013), ())
    assert plain.http_status == 403 and plain.step_up is None


def test_okta_request_is_rfc8693_with_access_token_subject() -> None:
    config = ExchangeConfig.from_mapping(OKTA)
    profile = profile_for("okta")
    assert profile.assertion_audience(config) == OKTA["token_endpoint"]
    credential = ClientCredential(config.client_id, profile.assertion_type, SVID)
    request = profile.build(config, USER, audience=config.audience, scope=config.scope, credential=credential)
    assert request.form == {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": USER,
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "audience": "api://downstream",
        "scope": "downstream.read",
        "client_id": "0oa-weather",
        "client_assertion_type": ASSERTION_TYPE_JWT_BEARER,
        "client_assertion": SVID,
    }
    basic = profile.build(
        config,
        USER,
        audience=None,
        scope=None,
        credential=ClientCredential("0oa-weather", secret="s3cr3t:/+", secret_method="basic"),
    )
    assert basic.headers["Authorization"].startswith("Basic ") and "client_secret" not in basic.form
    assert "czNjcjN0JTNBJTJGJTJC" in basic.headers["Authorization"]  # url-encoded before base64


def test_rfc8693_keeps_the_jwt_spiffe_assertion() -> None:
    config = ExchangeConfig.from_mapping(
        {"token_endpoint": "https://kc/token", "issuer": "https://kc", "audience": "a"}
    )
    profile = profile_for("rfc8693")
    assert (profile.assertion_type, profile.assertion_audience(config)) == (
        ASSERTION_TYPE_JWT_SPIFFE,
        "https://kc",
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"profile": "azure"}, "exchange.profile"),
        ({**ENTRA, "client_id": None}, "exchange.client_id"),
        ({**ENTRA, "scope": None}, "exchange.scope"),
        ({**ENTRA, "auth": "x509-svid"}, "exchange.auth"),
        ({**OKTA, "audience": None}, "exchange.audience"),
        ({**OKTA, "actor_token": True}, "exchange.actor_token"),
    ],
)
def test_profile_config_errors_name_the_key(extra: dict[str, object], message: str) -> None:
    data = {**ENTRA, **extra} if "token_endpoint" not in extra else extra
    with pytest.raises(ConfigError, match=message):
        ExchangeConfig.from_mapping({k: v for k, v in data.items() if v is not None})


# -- answers and errors, pinned down by mutation testing (issue 17) --------------------------------


def test_entra_answer_names_the_audience_and_never_shows_a_credential() -> None:
    config = ExchangeConfig.from_mapping({**ENTRA, "audience": "api://downstream"})
    profile = profile_for("entra-obo")
    body = json.dumps({"token_type": "Bearer", "expires_in": 60, "access_token": "t"}).encode()
    assert (
        profile.parse(body, config=config, audience=None, now=0.0, secrets=()).audience == "api://downstream"
    )
    assert profile.parse(body, config=config, audience="api://other", now=0.0, secrets=()).audience == (
        "api://other"
    )
    echo = json.dumps({"token_type": USER[:40], "access_token": "t"}).encode()
    with pytest.raises(ExchangeError) as caught:
        profile.parse(echo, config=config, audience=None, now=0.0, secrets=(USER[:40],))
    assert USER[:40] not in caught.value.message and "token_type '?'" in caught.value.message


def test_entra_app_only_refusal_in_full() -> None:
    error = profile_for("entra-obo").map_error(400, _entra_error("invalid_grant", 7000114), ())
    assert error.message == (
        "the caller's token is an application (app-only) token with no signed-in user; on-behalf-of "
        "needs a user's delegated token (sign in as a user): AADSTS7000114: something. Trace ID: 0 "
        "Correlation ID: 1 Timestamp: x"
    )
    assert (error.outcome, error.http_status, error.idp_status, error.oauth_error) == (
        "denied",
        403,
        400,
        "invalid_grant",
    )
    bare = json.dumps({"error": "invalid_grant", "error_codes": [7000114]}).encode()
    assert profile_for("entra-obo").map_error(400, bare, ()).message.endswith("(sign in as a user)")


def test_entra_odd_error_codes_and_claims_are_ignored() -> None:
    profile = profile_for("entra-obo")
    # Codes that only look like numbers are not codes: a plain refusal, no step-up.
    odd = json.dumps({"error": "invalid_grant", "error_codes": [50076.0, "50076", True]}).encode()
    plain = profile.map_error(400, odd, ())
    assert (plain.outcome, plain.http_status, plain.step_up) == ("denied", 403, None)
    # A claims value that is not a string (or too long) is dropped, the step-up stays.
    for claims in (5, ["x"], "", "{" + " " * 4096 + "}"):
        body = json.dumps({"error": "invalid_grant", "error_codes": [50076], "claims": claims}).encode()
        error = profile.map_error(400, body, ())
        assert error.step_up is not None and error.step_up.claims is None, claims
    longest = json.dumps({"x": "y" * (4096 - 9)})
    assert len(longest) == 4096
    body = json.dumps({"error": "invalid_grant", "error_codes": [50076], "claims": longest}).encode()
    step_up = profile.map_error(400, body, ()).step_up
    assert step_up is not None and step_up.claims == longest


def test_okta_answers_must_be_access_tokens() -> None:
    config = ExchangeConfig.from_mapping(OKTA)
    profile = profile_for("okta")
    access = "urn:ietf:params:oauth:token-type:access_token"
    good = {"access_token": "t", "issued_token_type": access, "token_type": "Bearer", "expires_in": 10}
    issued = profile.parse(json.dumps(good).encode(), config=config, audience="api://d", now=5.0, secrets=())
    assert (issued.access_token, issued.audience, issued.expires_at, issued.issued_token_type) == (
        "t",
        "api://d",
        15.0,
        access,
    )
    jwt_type = {**good, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt"}
    with pytest.raises(ExchangeError, match="is not the requested"):
        profile.parse(json.dumps(jwt_type).encode(), config=config, audience="api://d", now=5.0, secrets=())
    echo = {**good, "token_type": USER[:40]}
    with pytest.raises(ExchangeError) as caught:
        profile.parse(json.dumps(echo).encode(), config=config, audience=None, now=0.0, secrets=(USER[:40],))
    assert USER[:40] not in caught.value.message
    refused = profile.map_error(400, b'{"error": "invalid_target"}', ())
    assert (refused.outcome, refused.http_status, refused.oauth_error) == ("denied", 403, "invalid_target")


def test_entra_names_the_downstream_api_by_scope() -> None:
    profile = profile_for("entra-obo")
    credential = ClientCredential(ENTRA["client_id"], profile.assertion_type, SVID)

    def scope_of(config: ExchangeConfig, audience: str | None, scope: str | None) -> str:
        return profile.build(config, USER, audience=audience, scope=scope, credential=credential).form[
            "scope"
        ]

    configured = ExchangeConfig.from_mapping(ENTRA)
    assert scope_of(configured, None, None) == "api://downstream/.default"
    assert scope_of(configured, "api://ignored", "api://other/read") == "api://other/read"
    by_audience = ExchangeConfig.from_mapping({**ENTRA, "scope": None, "audience": "api://downstream/"})
    assert scope_of(by_audience, None, None) == "api://downstream/.default"
    assert scope_of(by_audience, "api://routed", None) == "api://routed/.default"


def test_rfc8693_answers_never_show_a_credential() -> None:
    config = ExchangeConfig.from_mapping(
        {"token_endpoint": "https://kc/token", "issuer": "https://kc", "audience": "a"}
    )
    echo = {
        "access_token": "t",
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": USER[:40],
    }
    with pytest.raises(ExchangeError) as caught:
        profile_for("rfc8693").parse(
            json.dumps(echo).encode(), config=config, audience="a", now=0.0, secrets=(USER[:40],)
        )
    assert USER[:40] not in caught.value.message and "token_type '?'" in caught.value.message


def test_entra_step_up_and_passthrough_errors_in_full() -> None:
    claims = '{"access_token":{"acrs":{"essential":true,"value":"c1"}}}'
    profile = profile_for("entra-obo")
    body = json.dumps({"error": "invalid_grant", "error_codes": [50076], "claims": claims}).encode()
    error = profile.map_error(400, body, ())
    assert error.message == (
        "the identity provider requires the user to sign in again and satisfy a Conditional Access "
        "policy (multi-factor authentication or similar) before acting for them"
    )
    assert (error.outcome, error.http_status, error.idp_status) == ("step_up", 403, 400)
    other = profile.map_error(401, b'{"error": "invalid_client"}', ())
    assert other.idp_status == 401 and "(invalid_client)" in other.message
    config = ExchangeConfig.from_mapping({**ENTRA, "scope": None, "audience": "api://appX"})
    credential = ClientCredential(ENTRA["client_id"], profile.assertion_type, SVID)
    request = profile.build(config, USER, audience=None, scope=None, credential=credential)
    assert request.form["scope"] == "api://appX/.default"
