"""Browser MCP clients through the sidecar (`inbound.cors`): preflights, readable answers, the origin check.

The requests are the ones a browser sends (aiohttp client over a real socket); the app behind the
sidecar is a real aiohttp server that records what reached it and sends its own CORS headers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from outrider.sidecar.config import ConfigError
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.inbound.cors import CorsConfig, CorsPolicy

from .conftest import RESOURCE, SidecarFactory, free_port, serve_everything

ORIGIN = "https://inspector.example.com"
OTHER = "https://evil.example.net"
CORS = {"allowed_origins": [ORIGIN, "http://localhost:6274"]}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}


@dataclass
class CorsApp:
    """An MCP-shaped app that answers with its own (too generous) CORS headers; it records each request."""

    port: int = field(default_factory=free_port)
    seen: list[tuple[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path))
        generous = {
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": "X-Internal",
            "Mcp-Session-Id": "sess-1",
        }
        if request.path == "/stream":
            response = web.StreamResponse(headers={**generous, "Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n')
            await response.write_eof()
            return response
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}}, headers=generous)


@pytest.fixture
async def cors_app() -> AsyncIterator[CorsApp]:
    state = CorsApp()
    async with serve_everything(state.handle, state.port, client_max_size=1024**2):
        yield state


def preflight_headers(origin: str, *, method: str = "POST", headers: str | None = None) -> dict[str, str]:
    """What a browser sends before a cross-origin POST with an Authorization header."""
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    sent["Access-Control-Request-Headers"] = headers or "authorization,content-type,mcp-protocol-version"
    return sent


def cors_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control-")}


def exposed(headers: Any) -> set[str]:
    return {h.strip().lower() for h in headers.get("Access-Control-Expose-Headers", "").split(",")}


def varies_on_origin(headers: Any) -> bool:
    return any("origin" in v.lower() for v in headers.getall("Vary", ()))


async def test_an_allowed_origins_preflight_is_answered_by_the_sidecar_without_a_token(
    cors_app: CorsApp, make_sidecar: SidecarFactory
) -> None:
    async with make_sidecar(cors_app.port, cors=CORS) as sidecar, aiohttp.ClientSession() as http:
        asked = "authorization, content-type, mcp-session-id, x-not-allowed, DPoP, last-event-id"
        async with http.options(
            sidecar.mcp_url(), headers=preflight_headers(ORIGIN, headers=asked)
        ) as answer:
            assert answer.status == 204
            assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert varies_on_origin(answer.headers)
            methods = {m.strip() for m in answer.headers["Access-Control-Allow-Methods"].split(",")}
            assert methods == {"GET", "POST", "DELETE"}
            allowed = {h.strip() for h in answer.headers["Access-Control-Allow-Headers"].split(",")}
            assert allowed == {"authorization", "content-type", "mcp-session-id", "dpop", "last-event-id"}
            assert answer.headers["Access-Control-Max-Age"] == "600"
            assert "Access-Control-Allow-Credentials" not in answer.headers
        # The second listed origin, as a browser sends it, and a path the app would serve: same.
        async with http.options(
            sidecar.url + "/other", headers=preflight_headers("http://localhost:6274")
        ) as answer:
            assert answer.status == 204
            assert answer.headers["Access-Control-Allow-Origin"] == "http://localhost:6274"
    assert cors_app.seen == [], "a preflight reached the app unauthenticated"
    # Counted apart from the MCP requests (they used to go uncounted: the pipeline never saw them).
    metrics = sidecar.proxy.metrics_text().decode()
    assert 'outrider_inbound_requests_total{kind="cors_preflight"} 2\n' in metrics
    assert 'outrider_inbound_requests_total{kind="mcp"} 0\n' in metrics
    (family,) = [f for f in text_string_to_metric_families(metrics) if f.name == "outrider_inbound_requests"]
    assert {s.labels["kind"]: s.value for s in family.samples} == {
        "mcp": 0,
        "cors_preflight": 2,
        "resource_metadata": 0,
    }


async def test_a_preflight_from_an_origin_not_listed_is_refused_as_without_cors(
    cors_app: CorsApp, make_sidecar: SidecarFactory
) -> None:
    async with make_sidecar(cors_app.port, cors=CORS) as sidecar, aiohttp.ClientSession() as http:
        for origin in (
            OTHER,
            "null",
            ORIGIN + ".evil.example.net",
            ORIGIN + ":8443",
            "http://inspector.example.com",
        ):
            async with http.options(sidecar.mcp_url(), headers=preflight_headers(origin)) as answer:
                assert answer.status == 401, origin
                assert "Access-Control-Allow-Origin" not in answer.headers, origin
                assert cors_headers(answer.headers) == {}, origin
    assert cors_app.seen == []
    # Refused by the MCP pipeline, as without CORS: counted there, not as answered preflights.
    metrics = sidecar.proxy.metrics_text().decode()
    assert 'outrider_inbound_requests_total{kind="cors_preflight"} 0\n' in metrics
    assert 'outrider_inbound_requests_total{kind="mcp"} 5\n' in metrics


async def test_without_cors_configured_nothing_changes(
    cors_app: CorsApp, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    """The default: the preflight is refused (401) and the app's own CORS headers pass as they always did."""
    token = idp.mint("alice", audience=RESOURCE)
    async with make_sidecar(cors_app.port) as sidecar, aiohttp.ClientSession() as http:
        assert sidecar.proxy.cors is None
        async with http.options(sidecar.mcp_url(), headers=preflight_headers(ORIGIN)) as answer:
            assert answer.status == 401
            assert cors_headers(answer.headers) == {}
            assert not varies_on_origin(answer.headers)
        headers = {"Origin": ORIGIN, "Authorization": f"Bearer {token}"}
        async with http.post(sidecar.mcp_url(), json=INITIALIZE, headers=headers) as answer:
            assert answer.status == 200
            assert answer.headers["Access-Control-Allow-Origin"] == "*"  # the app's, untouched
    assert cors_app.seen == [("POST", "/mcp")]


async def test_a_401_is_readable_by_an_allowed_origin_and_cors_never_replaces_authentication(
    cors_app: CorsApp, make_sidecar: SidecarFactory
) -> None:
    async with make_sidecar(cors_app.port, cors=CORS) as sidecar, aiohttp.ClientSession() as http:
        async with http.post(sidecar.mcp_url(), json=INITIALIZE, headers={"Origin": ORIGIN}) as answer:
            assert answer.status == 401
            assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert varies_on_origin(answer.headers)
            assert {"www-authenticate", "mcp-session-id", "mcp-protocol-version"} <= exposed(answer.headers)
            assert "resource_metadata=" in answer.headers["WWW-Authenticate"]
            assert "Access-Control-Allow-Credentials" not in answer.headers
        async with http.post(sidecar.mcp_url(), json=INITIALIZE, headers={"Origin": OTHER}) as answer:
            assert answer.status == 401
            assert cors_headers(answer.headers) == {}
            assert varies_on_origin(answer.headers)  # a cache must not hand this answer to ORIGIN
    assert cors_app.seen == []


async def test_the_metadata_document_is_readable_by_an_allowed_origin(
    cors_app: CorsApp, make_sidecar: SidecarFactory
) -> None:
    async with make_sidecar(cors_app.port, cors=CORS) as sidecar, aiohttp.ClientSession() as http:
        url = sidecar.url + "/.well-known/oauth-protected-resource/mcp"
        async with http.options(
            url, headers=preflight_headers(ORIGIN, method="GET", headers="accept")
        ) as answer:
            assert answer.status == 204 and answer.headers["Access-Control-Allow-Origin"] == ORIGIN
        async with http.get(url, headers={"Origin": ORIGIN}) as answer:
            assert answer.status == 200
            assert (await answer.json())["resource"] == RESOURCE
            assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert varies_on_origin(answer.headers)


async def test_proxied_answers_carry_the_sidecars_cors_headers_not_the_apps(
    cors_app: CorsApp, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    headers = {
        "Origin": ORIGIN,
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
    }
    async with make_sidecar(cors_app.port, cors=CORS) as sidecar, aiohttp.ClientSession() as http:
        for path in ("/mcp", "/stream"):
            async with http.post(sidecar.url + path, json=INITIALIZE, headers=headers) as answer:
                assert answer.status == 200, path
                assert cors_headers(answer.headers) == {
                    "access-control-allow-origin": ORIGIN,
                    "access-control-expose-headers": answer.headers["Access-Control-Expose-Headers"],
                }, path
                assert {"mcp-session-id", "www-authenticate", "mcp-protocol-version"} <= exposed(
                    answer.headers
                )
                assert "x-internal" not in exposed(answer.headers)
                assert varies_on_origin(answer.headers), path
                assert answer.headers["Mcp-Session-Id"] == "sess-1"
                body = await answer.read()
                if path == "/stream":
                    assert answer.headers["Content-Type"].startswith("text/event-stream")
                    assert b'"result":{}' in body
                else:
                    assert json.loads(body)["result"] == {}
        # An origin not listed: the app's generous headers are gone all the same.
        async with http.post(
            sidecar.mcp_url(), json=INITIALIZE, headers={**headers, "Origin": OTHER}
        ) as answer:
            assert answer.status == 200 and cors_headers(answer.headers) == {}
    assert cors_app.seen == [("POST", "/mcp"), ("POST", "/stream"), ("POST", "/mcp")]


# -- the origin check, without sockets --------------------------------------------------------------


def _origin(policy: CorsPolicy, *values: str) -> str | None:
    headers: CIMultiDict[str] = CIMultiDict()
    for value in values:
        headers.add("Origin", value)
    return policy.allowed_origin(headers)


@pytest.mark.parametrize(
    ("sent", "allowed"),
    [
        (ORIGIN, True),
        ("HTTPS://Inspector.EXAMPLE.com", True),  # scheme and host compare case-insensitively
        ("http://localhost:6274", True),
        ("https://inspector.example.com.evil.net", False),  # no suffix match
        ("https://evil-inspector.example.com", False),
        ("https://example.com", False),  # no parent domain
        ("https://sub.inspector.example.com", False),  # no subdomain
        ("https://inspector.example.co", False),  # no prefix match
        ("https://inspector.example.com/", False),  # not an origin as a browser sends it
        ("https://inspector.example.com:8443", False),  # another port is another origin
        ("http://inspector.example.com", False),  # another scheme is another origin
        ("http://localhost:627", False),
        ("http://localhost", False),
        ("null", False),
        ("*", False),
        ("", False),
        ("https://\u212aexample.com", False),  # lower() would make it `kexample.com`
    ],
)
def test_the_origin_check_is_exact(sent: str, allowed: bool) -> None:
    policy = CorsPolicy(
        CorsConfig.from_mapping(
            {**CORS, "allowed_origins": [*CORS["allowed_origins"], "https://kexample.com"]}
        )
    )
    assert _origin(policy, sent) == (sent if allowed else None)


def test_two_origin_headers_are_never_allowed() -> None:
    policy = CorsPolicy(CorsConfig.from_mapping(CORS))
    assert _origin(policy, ORIGIN, ORIGIN) is None
    assert _origin(policy) is None


# -- configuration -----------------------------------------------------------------------------------


def test_origins_are_normalised_as_browsers_send_them() -> None:
    config = CorsConfig.from_mapping(
        {
            "allowed_origins": [
                "HTTPS://App.Example.com:443",
                "http://app.example.com:80",
                "http://[::1]:6274",
                "https://app.example.com",
            ],
            "allowed_headers": ["X-Custom-Header"],
            "max_age_s": 0,
        }
    )
    assert config.allowed_origins == (
        "https://app.example.com",
        "http://app.example.com",
        "http://[::1]:6274",
    )
    assert config.allowed_headers == ("x-custom-header",)
    assert (
        CorsPolicy(config).preflight(ORIGIN, "X-Custom-Header")["Access-Control-Allow-Headers"]
        == "x-custom-header"
    )
    assert not InboundConfig.from_mapping({}).cors.enabled
    assert InboundConfig.from_mapping({"cors": CORS}).cors.allowed_origins == (
        ORIGIN,
        "http://localhost:6274",
    )


@pytest.mark.parametrize(
    ("cors", "message"),
    [
        ({"allowed_origins": ["*"]}, "'*' is not allowed"),
        ({"allowed_origins": ["null"]}, "'null' is not allowed"),
        ({"allowed_origins": ["https://app.example.com/"]}, "is not an origin"),
        ({"allowed_origins": ["https://app.example.com/mcp"]}, "is not an origin"),
        ({"allowed_origins": ["app.example.com"]}, "is not an origin"),
        ({"allowed_origins": ["ftp://app.example.com"]}, "is not an origin"),
        ({"allowed_origins": ["https://user@app.example.com"]}, "is not an origin"),
        ({"allowed_origins": ["https://*.example.com"]}, "is not an origin"),
        ({"allowed_origins": ["https://app.example.com?x=1"]}, "is not an origin"),
        ({"allowed_origins": [" https://app.example.com"]}, "is not an origin"),
        ({"allowed_origins": ["https://app.example.com:99999"]}, "out of range"),
        ({"allowed_origins": ["https://bücher.example"]}, "punycode"),
        ({"allowed_origins": "https://app.example.com"}, "must be a list"),
        ({"allowed_origins": [443]}, "must be a string"),
        ({"allowed_headers": ["Bad Header"]}, "inbound.cors.allowed_headers"),
        ({"max_age_s": -1}, "inbound.cors.max_age_s"),
        ({"max_age_s": True}, "inbound.cors.max_age_s"),
        ({"allowed_origin": [ORIGIN]}, "unknown key(s) ['allowed_origin']"),
        ("https://app.example.com", "inbound.cors must be a mapping"),
    ],
)
def test_configuration_errors_name_the_key(cors: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        InboundConfig.from_mapping({"cors": cors})
    assert message in str(error.value)
    assert "inbound.cors" in str(error.value)


async def test_a_browser_reaches_the_real_sdk_server_whose_origin_check_knows_only_loopback(
    mcp_app: Any, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    """The `mcp` SDK refuses (403) any `Origin` but a loopback one; the sidecar checked an allowed
    origin itself, so it does not forward it. An origin not listed goes on as sent (and is refused)."""
    token = idp.mint("alice", audience=RESOURCE)
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-06-18",
    }
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "browser", "version": "1"},
        },
    }
    async with aiohttp.ClientSession() as http:
        async with (
            make_sidecar(mcp_app.port) as sidecar,
            http.post(sidecar.mcp_url(), json=initialize, headers={**headers, "Origin": ORIGIN}) as answer,
        ):
            assert answer.status == 403  # today, without CORS: the SDK's own refusal
        async with make_sidecar(mcp_app.port, cors=CORS) as sidecar:
            async with http.post(
                sidecar.mcp_url(), json=initialize, headers={**headers, "Origin": ORIGIN}
            ) as answer:
                assert answer.status == 200
                assert answer.headers["Content-Type"].startswith("text/event-stream")  # the SDK's SSE answer
                assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
                assert "mcp-session-id" in exposed(answer.headers) and answer.headers["Mcp-Session-Id"]
                assert b'"serverInfo"' in await answer.read()
            async with http.post(
                sidecar.mcp_url(), json=initialize, headers={**headers, "Origin": OTHER}
            ) as answer:
                assert answer.status == 403 and cors_headers(answer.headers) == {}


def test_vary_is_read_as_a_list_of_header_names() -> None:
    policy = CorsPolicy(CorsConfig.from_mapping(CORS))
    headers: CIMultiDict[str] = CIMultiDict({"Vary": "Accept-Encoding, X-Origin-Hint"})
    policy.decorate(None, headers)
    assert headers.getall("Vary") == ["Accept-Encoding, X-Origin-Hint", "Origin"]
    already: CIMultiDict[str] = CIMultiDict({"Vary": "accept, ORIGIN"})
    policy.decorate(ORIGIN, already)
    assert already.getall("Vary") == ["accept, ORIGIN"] and already["Access-Control-Allow-Origin"] == ORIGIN
