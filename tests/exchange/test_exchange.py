"""The RFC 8693 exchanger against the dev IdP over real HTTP on loopback: claims, cache,
single-flight and every failure path (with no token text in any error).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import jwt
import pytest

from outrider.sidecar.dev.idp import DevIdP, StaticJwtBundles
from outrider.sidecar.exchange import ExchangeError
from outrider.sidecar.exchange.client import DisabledExchanger, OAuthTokenExchanger, build_exchanger
from outrider.sidecar.exchange.config import ExchangeConfig

from .conftest import default_clients, password_token
from .spiffe_fakes import (
    DOWNSTREAM,
    SIDECAR_ID,
    TRUST_DOMAIN,
    FakeIdentity,
    SpiffeAuthority,
    idp_tls,
    issue_leaf,
    make_ca,
    material_for,
)


def config_for(idp: DevIdP, **overrides: Any) -> ExchangeConfig:
    data: dict[str, Any] = {
        "token_endpoint": idp.token_endpoint,
        "issuer": idp.issuer,
        "audience": DOWNSTREAM,
        "timeout_seconds": 3,
    }
    data.update(overrides)
    return ExchangeConfig.from_mapping(data)


def exchanger(idp: DevIdP, identity: FakeIdentity, session: aiohttp.ClientSession, **kw: Any) -> Any:
    ex = build_exchanger(config_for(idp, **kw), identity, session)
    assert isinstance(ex, OAuthTokenExchanger)
    return ex


def assert_token_free(exc: ExchangeError, *secrets: str) -> None:
    texts = (str(exc), repr(exc), exc.message, repr(exc.args))
    for secret in secrets:
        assert secret
        for text in texts:
            assert secret not in text
    for text in texts:
        assert "eyJ" not in text  # nothing JWT-shaped at all


# -- the happy path ---------------------------------------------------------------------------


async def test_issued_token_names_user_audience_and_sidecar(idp, identity, session):
    user_token = await password_token(session, idp, "alice")
    issued = await exchanger(idp, identity, session).exchange(user_token)

    assert issued.token_type == "Bearer"
    assert issued.issued_token_type == "urn:ietf:params:oauth:token-type:access_token"
    assert issued.audience == DOWNSTREAM and not issued.cache_hit
    claims = idp.verify(issued.access_token, audience=DOWNSTREAM)
    assert claims["sub"] == "alice"
    assert claims["aud"] == DOWNSTREAM
    assert claims["act"] == {"sub": SIDECAR_ID}
    assert claims["client_id"] == "weather-mcp"
    assert "mcp:tools" in claims["scope"].split()
    assert issued.access_token != user_token
    # The client assertion was a JWT-SVID for the IdP's issuer and nothing else.
    assert identity.jwt_audiences == [idp.issuer]
    svid = jwt.decode(identity.authority.signed[-1], options={"verify_signature": False})
    assert svid["aud"] == [idp.issuer]


async def test_audience_and_scope_per_call(idp, identity, session):
    user_token = await password_token(session, idp, "alice")
    issued = await exchanger(idp, identity, session).exchange(
        user_token, audience="https/other.example.com", scope="mcp:tools"
    )
    claims = idp.verify(issued.access_token, audience="https/other.example.com")
    assert claims["scope"] == "mcp:tools"
    assert issued.audience == "https/other.example.com"


async def test_nested_act_when_subject_was_already_delegated(idp, identity, session):
    subject = idp.mint(
        "bob", audience="https://mcp.example.com/mcp", act={"sub": "spiffe://example.org/agent"}
    )
    issued = await exchanger(idp, identity, session).exchange(subject)
    claims = idp.verify(issued.access_token, audience=DOWNSTREAM)
    assert claims["sub"] == "bob"
    assert claims["act"] == {"sub": SIDECAR_ID, "act": {"sub": "spiffe://example.org/agent"}}


async def test_actor_token_is_sent_and_becomes_act(idp, identity, session, monkeypatch):
    seen: list[dict[str, str]] = []
    original = idp._token_exchange

    async def spy(request, form):
        seen.append({k: str(v) for k, v in form.items()})
        return await original(request, form)

    monkeypatch.setattr(idp, "_token_exchange", spy)
    user_token = await password_token(session, idp)
    issued = await exchanger(idp, identity, session, actor_token=True).exchange(user_token)
    assert seen[0]["actor_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    actor = jwt.decode(seen[0]["actor_token"], options={"verify_signature": False})
    assert actor["sub"] == SIDECAR_ID
    assert idp.verify(issued.access_token, audience=DOWNSTREAM)["act"] == {"sub": SIDECAR_ID}


async def test_client_secret_basic_and_post(idp, identity, session, secret_file):
    user_token = await password_token(session, idp)
    for method in ("basic", "post"):
        ex = exchanger(
            idp,
            identity,
            session,
            auth="client-secret",
            client_id="secret-client",
            client_secret_file=str(secret_file),
            client_secret_method=method,
        )
        claims = idp.verify((await ex.exchange(user_token)).access_token, audience=DOWNSTREAM)
        assert claims["client_id"] == "secret-client" and claims["sub"] == "alice"
    assert identity.jwt_audiences == []  # no SVID needed for client-secret


async def test_client_secret_file_is_reread_after_rotation(idp, identity, session, secret_file):
    user_token = await password_token(session, idp)
    ex = exchanger(
        idp,
        identity,
        session,
        auth="client-secret",
        client_id="secret-client",
        client_secret_file=str(secret_file),
    )
    await ex.exchange(user_token)
    secret_file.write_text("rotated-but-wrong")
    with pytest.raises(ExchangeError) as info:
        await ex.exchange(user_token, audience=DOWNSTREAM, scope="openid")
    assert info.value.oauth_error == "invalid_client" and info.value.http_status == 502
    assert_token_free(info.value, user_token, "rotated-but-wrong")


async def test_mtls_client_auth_rfc8705(authority, session, tmp_path):
    spiffe_ca = make_ca("spiffe-ca", spiffe_td=TRUST_DOMAIN)
    svid = issue_leaf(spiffe_ca, uri=SIDECAR_ID)
    server_ctx, ca_file = idp_tls(tmp_path, spiffe_ca.pem)

    identity = FakeIdentity(authority)
    identity.material = material_for(svid, spiffe_ca, SIDECAR_ID)
    async with DevIdP(
        clients=default_clients(),
        spiffe_bundles=StaticJwtBundles({TRUST_DOMAIN: authority.jwks}),
        ssl_context=server_ctx,
    ) as idp:
        user_token = idp.mint("alice", audience="https://mcp.example.com/mcp")
        ex = exchanger(idp, identity, session, auth="x509-svid", client_id="weather-mcp", ca_file=ca_file)
        claims = idp.verify((await ex.exchange(user_token)).access_token, audience=DOWNSTREAM)
        assert claims["act"] == {"sub": SIDECAR_ID} and claims["sub"] == "alice"
        assert identity.jwt_audiences == []  # authenticated by the X.509-SVID alone

        # Without an SVID the exchange fails as identity_unavailable, before any IdP call.
        identity.available = False
        calls = idp.stats.exchange_requests
        with pytest.raises(ExchangeError) as info:
            await ex.exchange(idp.mint("bob", audience="x"))
        assert info.value.outcome == "identity_unavailable" and info.value.http_status == 503
        assert idp.stats.exchange_requests == calls


# -- cache and single-flight --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_cache_hit_then_expiry(idp, identity, session):
    idp.token_ttl = 120
    clock = FakeClock()
    config = config_for(idp, cache_skew_seconds=30)
    ex = OAuthTokenExchanger(config, identity, session, clock=clock)
    user_token = await password_token(session, idp)

    first = await ex.exchange(user_token)
    second = await ex.exchange(user_token)
    assert second.cache_hit and second.access_token == first.access_token
    assert idp.stats.exchange_requests == 1

    # Other audience, scope or subject: separate entries.
    await ex.exchange(user_token, audience="https/other.example.com")
    await ex.exchange(user_token, scope="openid")
    await ex.exchange(await password_token(session, idp, "bob"))
    assert idp.stats.exchange_requests == 4

    clock.now += 80  # about 39 s before expiry: served from cache
    assert (await ex.exchange(user_token)).cache_hit
    clock.now += 15  # inside the 30 s skew: exchanged again
    third = await ex.exchange(user_token)
    assert not third.cache_hit and idp.stats.exchange_requests == 5
    assert ex.stats.cache_hits == 2


async def test_a_huge_expires_in_is_cached_no_longer_than_the_max_ttl(idp, identity, session):
    """The IdP answers `expires_in` 1e308 (a finite number, so valid): cached by it, the issued
    token (and the grant behind it) was served for ever, past any revocation at the IdP."""
    idp.token_ttl = 1e308
    user_token = await password_token(session, idp)
    for overrides, max_ttl in (({}, 3600), ({"cache_max_ttl_seconds": 600}, 600)):
        clock = FakeClock()
        ex = OAuthTokenExchanger(
            config_for(idp, cache_skew_seconds=30, **overrides), identity, session, clock=clock
        )
        before = idp.stats.exchange_requests
        first = await ex.exchange(user_token)
        clock.now += max_ttl - 31  # just inside the cap less the skew: still served from the cache
        assert (await ex.exchange(user_token)).cache_hit
        clock.now += 2  # past it: exchanged again
        renewed = await ex.exchange(user_token)
        assert not renewed.cache_hit and renewed.access_token != first.access_token
        assert idp.stats.exchange_requests == before + 2


async def test_cache_is_bounded_lru(idp, identity, session):
    ex = exchanger(idp, identity, session, cache_size=2)
    tokens = [idp.mint(f"user{i}", audience="https://mcp.example.com/mcp") for i in range(3)]
    for token in tokens:
        await ex.exchange(token)
    assert len(ex.cache) == 2 and ex.cache.evictions == 1
    assert (await ex.exchange(tokens[2])).cache_hit
    assert not (await ex.exchange(tokens[0])).cache_hit  # the oldest was evicted
    assert idp.stats.exchange_requests == 4


async def test_short_lived_tokens_are_not_cached(idp, identity, session):
    ex = exchanger(idp, identity, session, cache_skew_seconds=30)
    subject = idp.mint("alice", audience="https://mcp.example.com/mcp", expires_in=20)
    await ex.exchange(subject)
    assert not (await ex.exchange(subject)).cache_hit
    assert idp.stats.exchange_requests == 2


async def test_concurrent_identical_exchanges_make_one_idp_call(idp, identity, session):
    idp.faults.delay_seconds = 0.3
    ex = exchanger(idp, identity, session)
    user_token = await password_token(session, idp)
    results = await asyncio.gather(*(ex.exchange(user_token) for _ in range(25)))
    assert idp.stats.exchange_requests == 1
    assert len({r.access_token for r in results}) == 1
    assert ex.stats.coalesced == 24


async def test_cancelled_waiter_does_not_cancel_the_shared_exchange(idp, identity, session):
    idp.faults.delay_seconds = 0.3
    ex = exchanger(idp, identity, session)
    user_token = await password_token(session, idp)
    first = asyncio.create_task(ex.exchange(user_token))
    second = asyncio.create_task(ex.exchange(user_token))
    await asyncio.sleep(0.05)
    first.cancel()
    issued = await second
    assert idp.verify(issued.access_token, audience=DOWNSTREAM)["sub"] == "alice"
    assert idp.stats.exchange_requests == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_concurrent_failures_are_shared_and_not_cached(idp, identity, session):
    idp.faults.delay_seconds = 0.2
    idp.faults.http_status = 500
    ex = exchanger(idp, identity, session)
    user_token = await password_token(session, idp)
    results = await asyncio.gather(*(ex.exchange(user_token) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ExchangeError) and r.http_status == 502 for r in results)
    assert idp.stats.exchange_requests == 1
    idp.faults.clear()
    assert not (await ex.exchange(user_token)).cache_hit
    assert idp.stats.exchange_requests == 2


# -- failure paths ------------------------------------------------------------------------------


async def test_idp_down_is_503(idp, identity, session):
    ex = exchanger(idp, identity, session)
    user_token = await password_token(session, idp)
    await idp.go_down()
    with pytest.raises(ExchangeError) as info:
        await ex.exchange(user_token)
    assert (info.value.http_status, info.value.outcome) == (503, "idp_unavailable")
    assert "unreachable" in info.value.message
    assert_token_free(info.value, user_token, *identity.authority.signed)
    await idp.come_back()
    assert not (await ex.exchange(user_token)).cache_hit


async def test_slow_idp_times_out_with_504_without_hanging(idp, identity, session):
    idp.faults.delay_seconds = 30
    ex = exchanger(idp, identity, session, timeout_seconds=0.5)
    user_token = await password_token(session, idp)
    with pytest.raises(ExchangeError) as info:
        # The outer bound only guards the test run; the exchanger's own timeout must fire first.
        await asyncio.wait_for(ex.exchange(user_token), timeout=20)
    assert (info.value.http_status, info.value.outcome) == (504, "idp_unavailable")
    assert "0.5s" in info.value.message
    assert_token_free(info.value, user_token, *identity.authority.signed)


@pytest.mark.parametrize(
    ("status", "expected_status", "expected_outcome"),
    [(500, 502, "idp_error"), (503, 503, "idp_unavailable"), (404, 502, "idp_error")],
)
async def test_http_failures(idp, identity, session, status, expected_status, expected_outcome):
    idp.faults.http_status = status
    user_token = await password_token(session, idp)
    with pytest.raises(ExchangeError) as info:
        await exchanger(idp, identity, session).exchange(user_token)
    assert (info.value.http_status, info.value.outcome, info.value.idp_status) == (
        expected_status,
        expected_outcome,
        status,
    )
    assert_token_free(info.value, user_token, *identity.authority.signed)


@pytest.mark.parametrize(
    ("code", "expected_status", "expected_outcome"),
    [
        ("invalid_grant", 403, "denied"),
        ("invalid_target", 403, "denied"),
        ("invalid_scope", 403, "denied"),
        ("invalid_client", 502, "idp_error"),
        ("unauthorized_client", 502, "idp_error"),
        ("invalid_request", 502, "idp_error"),
        ("unsupported_grant_type", 502, "idp_error"),
    ],
)
async def test_oauth_errors_map_to_status(idp, identity, session, code, expected_status, expected_outcome):
    user_token = await password_token(session, idp)
    idp.faults.oauth_error = code
    # A careless IdP echoing the subject token in its description must not leak it.
    idp.faults.oauth_error_description = f"bad token {user_token} for you"
    with pytest.raises(ExchangeError) as info:
        await exchanger(idp, identity, session).exchange(user_token)
    err = info.value
    assert (err.http_status, err.outcome, err.oauth_error) == (expected_status, expected_outcome, code)
    assert code in err.message and "[redacted]" in err.message
    assert_token_free(err, user_token, *identity.authority.signed)


async def test_real_invalid_target_from_registration(idp, identity, session):
    user_token = await password_token(session, idp)
    with pytest.raises(ExchangeError) as info:
        await exchanger(idp, identity, session).exchange(user_token, audience="https://bank.example.com")
    assert (info.value.http_status, info.value.oauth_error) == (403, "invalid_target")
    assert "bank.example.com" in info.value.message  # the IdP's reason is kept, minus tokens
    assert_token_free(info.value, user_token)


async def test_real_invalid_grant_for_expired_subject(idp, identity, session):
    expired = idp.mint("alice", audience="https://mcp.example.com/mcp", expires_in=-60)
    with pytest.raises(ExchangeError) as info:
        await exchanger(idp, identity, session).exchange(expired)
    assert (info.value.http_status, info.value.oauth_error) == (403, "invalid_grant")
    assert_token_free(info.value, expired)


async def test_real_invalid_client_for_unregistered_workload(idp, authority, session):
    stranger = FakeIdentity(authority, "spiffe://example.org/ns/other/sa/stranger")
    user_token = await password_token(session, idp)
    with pytest.raises(ExchangeError) as info:
        await exchanger(idp, stranger, session).exchange(user_token)
    assert (info.value.http_status, info.value.oauth_error) == (502, "invalid_client")
    assert_token_free(info.value, user_token, *authority.signed)


async def test_svid_signed_by_foreign_trust_domain_is_invalid_client(idp, session):
    rogue = FakeIdentity(SpiffeAuthority())  # same SPIFFE ID, keys the IdP does not trust
    user_token = await password_token(session, idp)
    with pytest.raises(ExchangeError) as info:
        await exchanger(idp, rogue, session).exchange(user_token)
    assert info.value.oauth_error == "invalid_client" and info.value.http_status == 502


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops</html>",
        b"[]",
        b'{"issued_token_type": "urn:ietf:params:oauth:token-type:access_token", "token_type": "Bearer"}',
        b'{"access_token": "eyJabc.def.ghi", "token_type": "Bearer", "expires_in": 60}',
        b'{"access_token": "eyJabc.def.ghi", "token_type": "DPoP", "expires_in": 60,'
        b' "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}',
        b'{"access_token": "eyJabc.def.ghi", "token_type": "Bearer", "expires_in": -5,'
        b' "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}',
        b'{"access_token": "eyJabc.def.ghi", "token_type": "Bearer", "expires_in": 60,'
        b' "issued_token_type": "urn:ietf:params:oauth:token-type:id_token"}',
        b'{"access_token": "' + b"x" * 300_000 + b'"}',
        # an expiry past the float range (OverflowError before: not an ExchangeError) or not a number
        b'{"access_token": "eyJabc.def.ghi", "token_type": "Bearer", "expires_in": 1' + b"0" * 400 + b","
        b' "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}',
        b'{"access_token": "eyJabc.def.ghi", "token_type": "Bearer", "expires_in": NaN,'
        b' "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}',
    ],
)
async def test_malformed_answers_are_502(idp, identity, session, body):
    idp.faults.raw_body = body
    user_token = await password_token(session, idp)
    with pytest.raises(ExchangeError) as info:
        await exchanger(idp, identity, session).exchange(user_token)
    assert (info.value.http_status, info.value.outcome) == (502, "idp_error")
    assert "malformed" in info.value.message or "more than" in info.value.message
    assert_token_free(info.value, user_token, "eyJabc.def.ghi")


async def test_identity_unavailable_is_503_without_idp_call(idp, identity, session):
    identity.available = False
    user_token = await password_token(session, idp)
    with pytest.raises(ExchangeError) as info:
        await exchanger(idp, identity, session).exchange(user_token)
    assert (info.value.http_status, info.value.outcome) == (503, "identity_unavailable")
    assert idp.stats.exchange_requests == 0


async def test_missing_secret_file_is_a_clear_503(idp, identity, session, tmp_path):
    ex = exchanger(
        idp,
        identity,
        session,
        auth="client-secret",
        client_id="secret-client",
        client_secret_file=str(tmp_path / "absent"),
    )
    with pytest.raises(ExchangeError) as info:
        await ex.exchange(idp.mint("alice"))
    assert info.value.http_status == 503 and "absent" in info.value.message


async def test_disabled_exchange(identity, session):
    ex = build_exchanger(ExchangeConfig.from_mapping({"audience": DOWNSTREAM}), identity, session)
    assert isinstance(ex, DisabledExchanger)
    with pytest.raises(ExchangeError) as info:
        await ex.exchange("whatever")
    assert info.value.http_status == 502 and "not configured" in info.value.message


async def test_metrics_text(idp, identity, session):
    ex = exchanger(idp, identity, session)
    user_token = await password_token(session, idp)
    await ex.exchange(user_token)
    await ex.exchange(user_token)
    idp.faults.http_status = 500
    with pytest.raises(ExchangeError):
        await ex.exchange(user_token, audience="https/other.example.com")
    text = ex.prometheus_text().decode()
    assert "outrider_token_exchange_requests_total 3" in text
    assert "outrider_token_exchange_cache_hits_total 1" in text
    assert "outrider_token_exchange_idp_calls_total 2" in text
    assert 'outrider_token_exchange_errors_total{outcome="idp_error"} 1' in text


async def test_failures_are_logged_once_per_kind_without_tokens(idp, identity, session, caplog):
    caplog.set_level("DEBUG", logger="outrider")
    ex = exchanger(idp, identity, session)
    user_token = await password_token(session, idp)
    idp.faults.oauth_error = "invalid_grant"
    idp.faults.oauth_error_description = f"token {user_token} is revoked"
    for scope in ("a", "b", "c"):
        with pytest.raises(ExchangeError):
            await ex.exchange(user_token, scope=scope)
    idp.faults.clear()
    await ex.exchange(user_token)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "invalid_grant" in warnings[0].getMessage()
    assert any("recovered" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage()
        assert user_token not in text and "eyJ" not in text
        assert not any(svid in text for svid in identity.authority.signed)


async def test_a_binary_client_secret_file_is_a_clear_503(idp, identity, session, secret_file):
    user_token = await password_token(session, idp)
    secret_file.write_bytes(b"\xff\xfe not text")
    ex = exchanger(
        idp,
        identity,
        session,
        auth="client-secret",
        client_id="secret-client",
        client_secret_file=str(secret_file),
    )
    with pytest.raises(ExchangeError) as info:
        await ex.exchange(user_token)
    assert info.value.http_status == 503 and "not UTF-8 text" in info.value.message
