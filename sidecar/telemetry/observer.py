"""The contract between the data paths (inbound, token exchange, egress) and telemetry/audit.

Data paths report plain records through an `Observer`; `NullObserver` records nothing. The real
implementation (OpenTelemetry + audit log) lives beside this module and satisfies the same Protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from outrider.sidecar.inbound.jsonrpc import McpMessage


@dataclass(frozen=True)
class Principal:
    """Who is calling, as verified by the inbound authenticator. Never carries the token."""

    kind: str  # "oidc" | "spiffe"
    subject: str  # `sub`, or the peer's SPIFFE ID for mTLS callers
    issuer: str | None = None
    client_id: str | None = None  # `azp` / `client_id`
    delegation: tuple[str, ...] = ()  # the `act` chain, outermost first
    scopes: tuple[str, ...] = ()
    # The claims the operator names as groups and roles (`inbound.group_claims`/`role_claims`); the
    # policy layer makes them the principal's parent entities.
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestInfo:
    """Transport facts of one inbound HTTP request carrying MCP messages."""

    http_method: str
    transport: str  # "streamable-http" | "stateless" | "sse-legacy"
    protocol_version: str | None = None  # MCP-Protocol-Version
    session_id: str | None = None  # Mcp-Session-Id (older revisions only)
    client_address: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # for trace-context extraction only


@dataclass(frozen=True)
class ExchangeOutcome:
    outcome: str  # "issued" | "cache_hit" | "idp_error" | "idp_unavailable" | "invalid_request" | ...
    audience: str | None = None
    reason: str | None = None
    idp_status: int | None = None
    duration_s: float = 0.0

    @classmethod
    def succeeded(cls, outcome: str, audience: str | None, duration_s: float) -> ExchangeOutcome:
        """`cls(outcome, audience, duration_s=duration_s)` (no reason, no IdP status), made with one
        call: a frozen dataclass's `__init__` sets each field through `object.__setattr__`, twice
        the instructions, and the proxy makes one per call (a cache hit's outcome)."""
        made = object.__new__(cls)
        made.__dict__.update(
            outcome=outcome, audience=audience, reason=None, idp_status=None, duration_s=duration_s
        )
        return made


@dataclass(frozen=True)
class EgressDecision:
    allowed: bool
    mode: str  # "capture" | "explicit"
    protocol: str  # "tls" | "http" | "tcp" | "connect" | "udp"
    destination_ip: str | None
    destination_port: int | None
    name: str | None  # SNI / Host / CONNECT authority, normalised
    rule: str | None  # the rule that matched, or None for default deny
    reason: str  # one line
    source: str | None = None  # where the rule came from (cluster default / namespace / annotation)


@dataclass(frozen=True)
class PolicyOutcome:
    """What the policy gate decided for one request (Cedar and rate limits)."""

    decision: str  # "allow" | "deny" | "rate_limited" | "invalid"
    policies: tuple[str, ...] = ()  # ids of the determining Cedar policies
    rate_limit: str | None = None  # None (not metered) | "ok" | "limited" | "store_unavailable"
    retry_after_s: int | None = None


class CallScope(Protocol):
    """One MCP message's lifetime: opened before authentication, finished once answered."""

    def set_principal(self, principal: Principal) -> None: ...

    def inject_context(self, headers: MutableMapping[str, str], message: dict[str, Any] | None) -> bool:
        """Put W3C trace context into the upstream headers and the message's `params._meta`.

        True when `message` changed (the body must be re-encoded); False when it holds what it held.
        """

    def token_exchange(self, outcome: ExchangeOutcome) -> None:
        """Record the token exchange made for this call (child span, metric, audit event)."""

    def policy(self, outcome: PolicyOutcome) -> None:
        """Record the policy gate's decision (span attributes and the audit event's `policy`)."""

    def finish(
        self,
        *,
        http_status: int,
        outcome: str,  # "ok" | "tool_error" | "denied" | "error"
        error_type: str | None = None,
        reason: str | None = None,
        response: McpMessage | None = None,
    ) -> None: ...


class Observer(Protocol):
    def mcp_call(self, message: McpMessage, request: RequestInfo) -> AbstractContextManager[CallScope]: ...

    def egress(self, decision: EgressDecision) -> None: ...

    def identity_event(self, event: str, spiffe_id: str | None, detail: str) -> None:
        """SVID rotations and identity health changes ("rotated", "healthy", "unhealthy")."""


class _NullScope:
    def set_principal(self, principal: Principal) -> None:
        return None

    def inject_context(self, headers: MutableMapping[str, str], message: dict[str, Any] | None) -> bool:
        return False

    def token_exchange(self, outcome: ExchangeOutcome) -> None:
        return None

    def policy(self, outcome: PolicyOutcome) -> None:
        return None

    def finish(
        self,
        *,
        http_status: int,
        outcome: str,
        error_type: str | None = None,
        reason: str | None = None,
        response: McpMessage | None = None,
    ) -> None:
        return None


# The one scope of every call nothing records (its methods keep no state).
NULL_SCOPE: CallScope = _NullScope()


class NullObserver:
    """Records nothing: for tools and tests that do not look at telemetry."""

    @contextmanager
    def mcp_call(self, message: McpMessage, request: RequestInfo) -> Iterator[CallScope]:
        yield NULL_SCOPE

    def egress(self, decision: EgressDecision) -> None:
        return None

    def identity_event(self, event: str, spiffe_id: str | None, detail: str) -> None:
        return None
