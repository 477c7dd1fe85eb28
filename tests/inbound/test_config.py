"""The `inbound` config section: defaults, parsing, and errors that name the key."""

from __future__ import annotations

from typing import Any

import pytest

from outrider.sidecar.config import ConfigError
from outrider.sidecar.inbound.config import DEFAULT_ALGORITHMS, InboundConfig, MtlsConfig


def test_defaults() -> None:
    config = InboundConfig.from_mapping({})
    assert (config.host, config.port, config.mcp_port) == ("0.0.0.0", 15006, 8080)
    assert config.algorithms == DEFAULT_ALGORITHMS == ("RS256", "ES256", "PS256", "EdDSA")
    assert not config.auth_enabled and not config.mtls.enabled and config.token_header is None


def test_full_mapping() -> None:
    config = InboundConfig.from_mapping(
        {
            "mcp_port": "9000",
            "issuer": "https://idp.example",
            "resource": "https://mcp.example/mcp",
            "algorithms": ["ES256"],
            "required_scopes": "mcp:tools",
            "mtls": {"enabled": True, "allowed_trust_domains": ["spiffe://agents.example"]},
            "token_header": "X-Downstream-Token",
            "max_body_bytes": 2048,
        }
    )
    assert config.mcp_port == 9000 and config.algorithms == ("ES256",)
    assert config.required_scopes == ("mcp:tools",)
    assert config.metadata_servers == ("https://idp.example",)
    assert config.mtls.allows("spiffe://agents.example/planner")
    assert not config.mtls.allows("spiffe://other.example/planner")
    assert MtlsConfig().allows("spiffe://any/thing")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"port": 0}, "inbound.port"),
        ({"mcp_port": "http"}, "inbound.mcp_port"),
        ({"issuer": "https://idp.example"}, "inbound.resource is required"),
        ({"issuer": "idp.example", "resource": "https://x/mcp"}, "inbound.issuer"),
        ({"algorithms": ["HS256"]}, "inbound.algorithms"),
        ({"algorithms": ["none"]}, "inbound.algorithms"),
        ({"mtls": {"enabled": "yes"}}, "inbound.mtls.enabled"),
        ({"mtls": {"allowed_spiffe_ids": ["planner"]}}, "inbound.mtls.allowed_spiffe_ids"),
        ({"token_header": "Bad: header"}, "inbound.token_header"),
        ({"legacy_sse_path": "sse"}, "inbound.legacy_sse_path"),
        ({"upstream_timeout_s": -1}, "inbound.upstream_timeout_s"),
        ({"max_body_bytes": True}, "inbound.max_body_bytes"),
        ({"mcp-port": 8080}, "unknown key(s) ['mcp-port']"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        InboundConfig.from_mapping(data)
    assert key in str(error.value)
