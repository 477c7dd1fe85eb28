"""Several trusted issuers, introspection and DPoP in the inbound config; the introspection decision."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from outrider.sidecar.config import ConfigError
from outrider.sidecar.inbound.auth import AuthFailure
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.inbound.introspection import Introspected, judge

RESOURCE = "https://mcp.example.com/mcp"
A = "https://login.example.com/tenant/v2.0"
B = "https://corp.okta.example/oauth2/default"


def _config(**extra: Any) -> InboundConfig:
    return InboundConfig.from_mapping({"resource": RESOURCE, **extra})


def test_issuers_each_with_their_own_exchange() -> None:
    config = _config(
        issuer=A,
        issuers=[
            {
                "issuer": B,
                "audience": "api://mcp",
                "introspection": {"endpoint": B + "/v1/introspect", "auth": "none"},
                "exchange": {
                    "profile": "okta",
                    "token_endpoint": B + "/v1/token",
                    "client_id": "0oa",
                    "audience": "api://down",
                },
            }
        ],
        dpop={"nonce": True, "algorithms": ["ES256"]},
    )
    primary, okta = config.trusted_issuers
    assert (primary.issuer, primary.audience, primary.exchange) == (A, RESOURCE, None)
    assert okta.exchange is not None and okta.exchange.profile == "okta" and okta.exchange.enabled
    assert okta.introspection is not None and okta.introspection.cache_ttl_s == 30.0
    assert config.metadata_servers == (A, B)
    assert config.dpop.nonce and config.dpop.algorithms == ("ES256",)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"issuers": {"issuer": A}}, "inbound.issuers must be a list"),
        ({"issuers": [{"issuer": "not a url"}]}, r"inbound.issuers\[0\].issuer"),
        ({"issuers": [{"issuer": A}, {"issuer": A}]}, "listed twice"),
        ({"issuer": A, "issuers": [{"issuer": A}]}, "already inbound.issuer"),
        ({"issuers": [{"issuer": A, "colour": 1}]}, "unknown key"),
        (
            {"issuers": [{"issuer": A, "exchange": {"profile": "okta", "token_endpoint": "https://t"}}]},
            r"issuers\[0\]\.exchange.client_id",
        ),
        (
            {"issuers": [{"issuer": A, "introspection": {"auth": "none"}}]},
            "introspection.endpoint is required",
        ),
        (
            {
                "issuers": [
                    {"issuer": A, "introspection": {"endpoint": A + "/i", "auth": "none"}},
                    {"issuer": B, "introspection": {"endpoint": B + "/i", "auth": "none"}},
                ]
            },
            "only one may",
        ),
        ({"dpop": {"algorithms": ["HS256"]}}, "inbound.dpop.algorithms"),
        ({"dpop": {"iat_window_s": "60"}}, "inbound.dpop.iat_window_s"),
        ({"introspection": {"endpoint": A + "/i"}}, "needs inbound.issuer"),
        ({"issuer": A, "require_access_token_typ": "yes"}, "inbound.require_access_token_typ"),
        (
            {"issuers": [{"issuer": A, "require_access_token_typ": 1}]},
            r"inbound.issuers\[0\].require_access_token_typ",
        ),
    ],
)
def test_config_errors_name_the_key(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**extra)


def _judge(document: dict[str, Any], **kw: Any) -> Any:
    return judge(
        document,
        issuer=kw.get("issuer", B),
        audience=kw.get("audience", "api://mcp"),
        required_scopes=kw.get("required_scopes", ()),
        now=1000.0,
        leeway_s=0.0,
        cache_ttl_s=30.0,
        require_audience=kw.get("require_audience", False),
    )


def test_introspection_active_answer() -> None:
    result = _judge(
        {
            "active": True,
            "sub": "alice@example.com",
            "scope": "mcp:use",
            "aud": "api://mcp",
            "iss": B,
            "exp": 1010,
            "cnf": {"jkt": "abc"},
        }
    )
    assert isinstance(result, Introspected)
    assert (result.principal.subject, result.principal.issuer, result.jkt) == ("alice@example.com", B, "abc")
    assert result.reuse_until == 1010.0  # never past exp, even with a longer cache_ttl


@pytest.mark.parametrize(
    ("document", "why"),
    [
        ({"active": False}, "not active"),
        ({"active": "true", "sub": "a"}, "not active"),
        ({"active": True, "sub": "a", "exp": 999}, "expired"),
        ({"active": True, "sub": "a", "iss": A}, "another issuer"),
        ({"active": True, "sub": "a", "aud": ["api://other"]}, "not meant for this resource"),
        ({"active": True}, "names no subject"),
        ({"active": True, "sub": "a", "exp": "soon"}, "NumericDate"),
    ],
)
def test_introspection_refusals(document: dict[str, Any], why: str) -> None:
    result = _judge(document)
    assert not isinstance(result, Introspected) and result.status == 401 and why in result.description


def test_introspection_scopes() -> None:
    result = _judge({"active": True, "sub": "a", "scope": "x"}, required_scopes=("mcp:use",))
    assert not isinstance(result, Introspected) and result.status == 403


async def test_a_jwt_of_another_issuer_is_never_introspected() -> None:
    import aiohttp
    import jwt as pyjwt

    from outrider.sidecar.inbound.callers import Presented, build_caller_verifier

    config = _config(
        issuers=[
            {"issuer": B, "introspection": {"endpoint": "http://127.0.0.1:9/introspect", "auth": "none"}}
        ]
    )
    foreign = pyjwt.encode({"iss": "https://elsewhere.example", "sub": "x"}, "k" * 32, algorithm="HS256")
    async with aiohttp.ClientSession() as session:
        verifier = build_caller_verifier(config, session, None)
        result = await verifier.authenticate(Presented("bearer", foreign, (), "POST", "/mcp"))
        introspector = verifier.issuers[B].introspector
        assert not isinstance(result, Introspected) and result.status == 401  # type: ignore[union-attr]
        assert "untrusted issuer" in result.description  # type: ignore[union-attr]
        assert introspector is not None and introspector.calls == 0


@contextlib.asynccontextmanager
async def introspection_endpoint(
    answer: Callable[[Any], Awaitable[Any]],
) -> AsyncIterator[str]:
    """A real introspection endpoint on a local socket, answering with `answer`; yields its URL."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/introspect", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/introspect"
    finally:
        await runner.cleanup()


async def test_an_opaque_token_is_hashed_once_and_its_answer_cached_by_that_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The token's SHA-256 is computed once per request (`Presented.fingerprint`) and keys the
    introspection cache too: a second digest of the same token per request is wasted work."""
    import aiohttp
    from aiohttp import web

    from outrider.sidecar.inbound import callers, introspection
    from outrider.sidecar.inbound.callers import Presented, build_caller_verifier

    asked: list[str] = []

    async def introspect(request: web.Request) -> web.Response:
        form = await request.post()
        asked.append(str(form["token"]))
        return web.json_response(
            {"active": True, "iss": A, "sub": "alice", "aud": RESOURCE, "exp": 4_000_000_000}
        )

    hashed: list[str] = []
    real = callers.token_fingerprint

    def counting(token: str) -> str:
        hashed.append(token)
        return real(token)

    monkeypatch.setattr(callers, "token_fingerprint", counting)
    monkeypatch.setattr(introspection, "token_fingerprint", counting)
    token = "an-opaque-token-0123456789"
    async with introspection_endpoint(introspect) as url, aiohttp.ClientSession() as session:
        config = _config(issuer=A, introspection={"endpoint": url, "auth": "none"})
        verifier = build_caller_verifier(config, session, None)
        for _ in range(2):
            principal = await verifier.authenticate(Presented("bearer", token, (), "POST", "/mcp"))
            assert not isinstance(principal, introspection.AuthFailure), principal
            assert principal.subject == "alice"
        introspector = verifier.opaque.introspector if verifier.opaque else None
        assert introspector is not None and (introspector.calls, introspector.cache_hits) == (1, 1)
    assert asked == [token]
    assert hashed == [token, token]  # once per request, by `Presented`


async def test_require_access_token_typ_is_per_issuer_with_the_inbound_default() -> None:
    import aiohttp

    from outrider.sidecar.inbound.callers import build_caller_verifier

    config = _config(
        issuer=A,
        require_access_token_typ=True,
        issuers=[
            {"issuer": B, "require_access_token_typ": False},
            {"issuer": "https://keycloak.example/realms/r"},
        ],
    )
    async with aiohttp.ClientSession() as session:
        judges = build_caller_verifier(config, session, None)
        verifiers = [t.verifier for t in judges.issuers.values()]
    scoped = [v._config.require_access_token_typ for v in verifiers if v is not None]
    assert scoped == [True, False, True]


def test_introspection_require_audience_refuses_an_answer_without_aud() -> None:
    """RFC 7662 makes `aud` optional: checked only when present, an IdP whose answers leave it out
    had every token it issued, for any resource, accepted here."""
    answer = {"active": True, "sub": "alice", "iss": B}
    assert isinstance(_judge(answer), Introspected)
    result = _judge(answer, require_audience=True)
    assert not isinstance(result, Introspected) and result.status == 401
    assert result.description == "the introspection answer names no audience ('aud')"
    assert isinstance(_judge({**answer, "aud": ["x", "api://mcp"]}, require_audience=True), Introspected)
    wrong = _judge({**answer, "aud": "api://other"}, require_audience=True)
    assert not isinstance(wrong, Introspected) and "not meant for this resource" in wrong.description


async def test_introspection_require_audience_over_a_real_endpoint() -> None:
    """The option reaches the introspector: a real endpoint answering without `aud`."""
    import aiohttp
    from aiohttp import web

    from outrider.sidecar.inbound.callers import Presented, build_caller_verifier

    async def introspect(request: web.Request) -> web.Response:
        return web.json_response({"active": True, "sub": "alice", "iss": B, "exp": 4102444800})

    results = []
    async with introspection_endpoint(introspect) as url:
        for required in (False, True):
            introspection = {"endpoint": url, "auth": "none"}
            config = _config(
                issuers=[
                    {
                        "issuer": B,
                        "audience": "api://mcp",
                        "introspection": {**introspection, "require_audience": required},
                    }
                ]
            )
            async with aiohttp.ClientSession() as session:
                verifier = build_caller_verifier(config, session, None)
                results.append(
                    await verifier.authenticate(Presented("bearer", "opaque-1", (), "POST", "/mcp"))
                )
    accepted, refused = results
    assert not isinstance(accepted, AuthFailure), accepted
    assert isinstance(refused, AuthFailure) and "names no audience" in refused.description
