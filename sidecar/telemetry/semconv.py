"""Span names and attributes for MCP calls, token exchanges and egress decisions, as pure functions.

Follows the OpenTelemetry MCP semantic conventions; Outrider's own facts go under `outrider.*`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Mapping

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.observer import (
    EgressDecision,
    ExchangeOutcome,
    PolicyOutcome,
    Principal,
    RequestInfo,
)

AttributeValue = str | bool | int | float | tuple[str, ...]
Attributes = dict[str, AttributeValue]

# The conventions' explicit bucket boundaries for mcp.*.operation.duration (seconds).
MCP_DURATION_BUCKETS: tuple[float, ...] = (
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

# Revisions from 2026-07-28 on are stateless: a session id is only meaningful before that.
_STATELESS_FROM = "2026-07-28"

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic|dpop)\s+[A-Za-z0-9._~+/=-]+")
_SECRET_KV = re.compile(
    r"(?i)\b(access_token|refresh_token|id_token|subject_token|actor_token|client_secret|"
    r"client_assertion|password|authorization)\b(\"?\s*[=:]\s*\"?)[^\s\"&,;]+"
)
_PEM = re.compile(r"-----BEGIN [A-Z ]+-----.*?(-----END [A-Z ]+-----|$)", re.DOTALL)


def scrub(text: str | None, limit: int = 300) -> str | None:
    """Mask anything shaped like a credential in free text from other components (reasons, details).

    A defence in depth: callers must not pass tokens, but a reason built from an upstream error body
    could carry one. Also bounds the length so a reason cannot bloat spans and audit lines.
    """
    if text is None:
        return None
    text = _PEM.sub("[REDACTED PEM]", text)
    text = _JWT.sub("[REDACTED JWT]", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} [REDACTED]", text)
    text = _SECRET_KV.sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def user_id(principal: Principal, config: TelemetryConfig) -> str:
    """`enduser.id`: the subject, or its keyed SHA-256 when the operator asked for pseudonyms."""
    if not config.hash_user:
        return principal.subject
    subject = f"{principal.issuer or ''}\n{principal.subject}".encode()
    digest = hmac.new(config.hash_salt.encode(), subject, hashlib.sha256).hexdigest()
    return f"sha256:{digest[:32]}"


def method_label(message: McpMessage) -> str:
    """`mcp.method.name`, with stand-ins for messages that carry no method."""
    if message.method:
        return message.method
    return "response" if message.kind == "response" else "invalid"


def span_target(message: McpMessage, config: TelemetryConfig) -> str | None:
    """The low-cardinality `{target}`: tool or prompt name; the resource URI only when opted in."""
    if message.tool_name:
        return message.tool_name
    if message.prompt_name:
        return message.prompt_name
    if config.record_resource_uri and message.resource_uri:
        return message.resource_uri
    return None


def mcp_span_name(message: McpMessage, config: TelemetryConfig) -> str:
    target = span_target(message, config)
    method = method_label(message)
    return f"{method} {target}" if target else method


def network_transport(request: RequestInfo) -> str:
    # Every MCP transport Outrider proxies runs over HTTP on TCP.
    return "tcp"


def session_id(request: RequestInfo) -> str | None:
    """`mcp.session.id` is recorded for the session-based revisions only."""
    if request.session_id is None:
        return None
    version = request.protocol_version
    if version is not None and version >= _STATELESS_FROM:
        return None
    return request.session_id


def mcp_request_attributes(
    message: McpMessage, request: RequestInfo, config: TelemetryConfig, *, workload_id: str | None
) -> Attributes:
    """Attributes known when the message arrives (before authentication)."""
    attrs: Attributes = {"mcp.method.name": method_label(message)}
    if message.id is not None:
        attrs["jsonrpc.request.id"] = str(message.id)
    if message.method == "tools/call":
        attrs["gen_ai.operation.name"] = "execute_tool"
    if message.tool_name:
        attrs["gen_ai.tool.name"] = message.tool_name
    if message.prompt_name:
        attrs["gen_ai.prompt.name"] = message.prompt_name
    if config.record_resource_uri and message.resource_uri:
        attrs["mcp.resource.uri"] = message.resource_uri
    if request.protocol_version:
        attrs["mcp.protocol.version"] = request.protocol_version
    sid = session_id(request)
    if sid:
        attrs["mcp.session.id"] = sid
    attrs["network.transport"] = network_transport(request)
    if request.client_address:
        attrs["client.address"] = split_address(request.client_address)[0]
    if workload_id:
        attrs["outrider.workload.spiffe_id"] = workload_id
    return attrs


@functools.lru_cache(maxsize=4096)  # called for every message; callers keep their address a while
def split_address(address: str) -> tuple[str, int | None]:
    """'10.0.0.1:5000' / '[::1]:5000' / '10.0.0.1' -> host and optional port."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if address.count(":") == 1:
        host, _, port = address.partition(":")
        return host, int(port) if port.isdigit() else None
    return address, None


def principal_attributes(principal: Principal, config: TelemetryConfig) -> Attributes:
    attrs: Attributes = {"enduser.id": user_id(principal, config)}
    if principal.kind != "oidc":
        attrs["outrider.principal.kind"] = principal.kind
    if principal.client_id:
        attrs["outrider.client.id"] = principal.client_id
    if principal.delegation:
        attrs["outrider.delegation.chain"] = tuple(principal.delegation)
    return attrs


def policy_attributes(outcome: PolicyOutcome) -> Attributes:
    """Span attributes of the policy gate's decision (ids only, never the policy text)."""
    attrs: Attributes = {"outrider.policy.decision": outcome.decision}
    if outcome.policies:
        attrs["outrider.policy.ids"] = tuple(outcome.policies)
    if outcome.rate_limit is not None:
        attrs["outrider.ratelimit.outcome"] = outcome.rate_limit
    if outcome.retry_after_s:
        attrs["outrider.ratelimit.retry_after_s"] = outcome.retry_after_s
    return attrs


def error_type(
    outcome: str, error_type_hint: str | None, response: McpMessage | None, http_status: int
) -> str | None:
    """`error.type`: `tool_error` for isError results, the JSON-RPC code, the caller's hint, or the status."""
    if outcome == "ok":
        return None
    if outcome == "tool_error":
        return "tool_error"
    if error_type_hint:
        return error_type_hint
    if response is not None and response.error_code is not None:
        return str(response.error_code)
    if http_status >= 400:
        return str(http_status)
    return "_OTHER"


def mcp_response_attributes(
    *, http_status: int, outcome: str, error_type_value: str | None, response: McpMessage | None
) -> Attributes:
    attrs: Attributes = {"http.response.status_code": http_status}
    if response is not None and response.error_code is not None:
        attrs["rpc.response.status_code"] = str(response.error_code)
    if error_type_value:
        attrs["error.type"] = error_type_value
    return attrs


def duration_metric_attributes(span_attrs: Mapping[str, AttributeValue]) -> Attributes:
    """The conventions' low-cardinality subset of a call span's attributes for the duration histogram."""
    keys = (
        "mcp.method.name",
        "gen_ai.tool.name",
        "gen_ai.prompt.name",
        "gen_ai.operation.name",
        "error.type",
        "rpc.response.status_code",
        "network.transport",
        "mcp.protocol.version",
    )
    return {k: span_attrs[k] for k in keys if k in span_attrs}


def request_counter_attributes(span_attrs: Mapping[str, AttributeValue], outcome: str) -> Attributes:
    attrs: Attributes = {k: span_attrs[k] for k in ("mcp.method.name", "gen_ai.tool.name") if k in span_attrs}
    attrs["outcome"] = outcome
    return attrs


EXCHANGE_OK = frozenset({"issued", "cache_hit"})


def exchange_span_attributes(outcome: ExchangeOutcome) -> Attributes:
    attrs: Attributes = {
        "outrider.token_exchange.outcome": outcome.outcome,
        "outrider.token_exchange.cache_hit": outcome.outcome == "cache_hit",
        "outrider.token_exchange.duration_s": outcome.duration_s,
    }
    if outcome.audience:
        attrs["outrider.token_exchange.audience"] = outcome.audience
    if outcome.idp_status is not None:
        attrs["http.response.status_code"] = outcome.idp_status
    reason = scrub(outcome.reason)
    if reason:
        attrs["outrider.reason"] = reason
    if outcome.outcome not in EXCHANGE_OK:
        attrs["error.type"] = outcome.outcome
    return attrs


def egress_span_name(decision: EgressDecision) -> str:
    return f"egress {'allow' if decision.allowed else 'deny'}"


def egress_attributes(decision: EgressDecision) -> Attributes:
    attrs: Attributes = {
        "outrider.egress.allowed": decision.allowed,
        "outrider.egress.mode": decision.mode,
        "outrider.egress.protocol": decision.protocol,
        "outrider.egress.reason": scrub(decision.reason) or "",
    }
    if decision.name:
        attrs["server.address"] = decision.name
    if decision.destination_port is not None:
        attrs["server.port"] = decision.destination_port
    if decision.destination_ip:
        attrs["network.peer.address"] = decision.destination_ip
    if decision.rule:
        attrs["outrider.egress.rule"] = decision.rule
    if decision.source:
        attrs["outrider.egress.rule_source"] = decision.source
    return attrs
