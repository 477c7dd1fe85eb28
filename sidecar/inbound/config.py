"""The `inbound` section of the sidecar configuration: the MCP proxy on 15006 and caller authentication.

Parsed once from a plain mapping; every error names the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from outrider.sidecar.config_error import ConfigError
from outrider.sidecar.inbound.cors import CorsConfig
from outrider.sidecar.inbound.issuers import (
    DpopConfig,
    IntrospectionConfig,
    IssuerConfig,
    check_trust,
    parse_issuers,
    string_list,
    url_value,
)

DEFAULT_ALGORITHMS = ("RS256", "ES256", "PS256", "EdDSA")
# Asymmetric algorithms only: HS* with a public JWKS would let anyone forge tokens with the public key.
SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _error(message: str) -> ConfigError:
    return ConfigError(message)


def _int(data: Mapping[str, Any], key: str, default: int, lo: int, hi: int, prefix: str = "inbound") -> int:
    value = data.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: YAML `.inf`, JSON `Infinity`
        raise _error(f"{prefix}.{key}: {value!r} is not an integer ({lo}-{hi})") from None
    if isinstance(value, bool) or not lo <= number <= hi:
        raise _error(f"{prefix}.{key}: {value!r} is out of range ({lo}-{hi})")
    return number


def _float(
    data: Mapping[str, Any], key: str, default: float, lo: float, hi: float, prefix: str = "inbound"
) -> float:
    value = data.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _error(f"{prefix}.{key}: {value!r} is not a number of seconds ({lo}-{hi})") from None
    if isinstance(value, bool) or not lo <= number <= hi:
        raise _error(f"{prefix}.{key}: {value!r} is out of range ({lo}-{hi})")
    return number


_KEYS = frozenset(
    {
        "host",
        "port",
        "mcp_port",
        "resource",
        "issuer",
        "jwks_uri",
        "algorithms",
        "leeway_s",
        "required_scopes",
        "require_access_token_typ",
        "authorization_servers",
        "jwks_refresh_interval_s",
        "jwks_min_refresh_interval_s",
        "jwks_max_keys",
        "mtls",
        "max_body_bytes",
        "upstream_timeout_s",
        "upstream_max_connections",
        "upstream_max_connections_per_caller",
        "upstream_wait_s",
        "sse_idle_timeout_s",
        "token_header",
        "legacy_sse_path",
        "token_cache_size",
        "allow_unauthenticated",
        "group_claims",
        "role_claims",
        "sessions",
        "issuers",
        "introspection",
        "dpop",
        "public_url",
        "cors",
    }
)
_SESSION_KEYS = frozenset({"enabled", "max_sessions", "idle_timeout_s"})


@dataclass(frozen=True)
class SessionsConfig:
    """`inbound.sessions`: binding each MCP session to the principal that created it (docs/inbound.md)."""

    enabled: bool = True
    # Bindings kept at most (about 200 bytes each); beyond it the caller holding the most loses one.
    max_sessions: int = 10000
    # A session with no request for this long loses its binding (then 404: the client re-initializes).
    idle_timeout_s: float = 43200.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SessionsConfig:
        if not isinstance(data, Mapping):
            raise _error("inbound.sessions must be a mapping")
        unknown = sorted(set(data) - _SESSION_KEYS)
        if unknown:
            raise _error(f"inbound.sessions: unknown key(s) {unknown}; allowed: {sorted(_SESSION_KEYS)}")
        enabled = data.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _error(f"inbound.sessions.enabled: {enabled!r} must be true or false")
        return cls(
            enabled=enabled,
            max_sessions=_int(data, "max_sessions", cls.max_sessions, 1, 10_000_000, "inbound.sessions"),
            idle_timeout_s=_float(
                data, "idle_timeout_s", cls.idle_timeout_s, 1, 30 * 86400, "inbound.sessions"
            ),
        )


_MTLS_KEYS = frozenset({"enabled", "allowed_spiffe_ids", "allowed_trust_domains"})


@dataclass(frozen=True)
class MtlsConfig:
    """Agent-to-server callers presenting a SPIFFE X.509-SVID on 15006."""

    enabled: bool = False
    # Exact SPIFFE IDs allowed; empty with empty trust_domains means any peer of a trusted bundle.
    allowed_spiffe_ids: tuple[str, ...] = ()
    allowed_trust_domains: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> MtlsConfig:
        if not isinstance(data, Mapping):
            raise _error("inbound.mtls must be a mapping")
        unknown = sorted(str(k) for k in set(data) - _MTLS_KEYS)
        if unknown:
            # A typo here (`enabeld`) would otherwise mean mTLS off without a word.
            raise _error(f"inbound.mtls: unknown key(s) {unknown}; allowed: {sorted(_MTLS_KEYS)}")
        enabled = data.get("enabled", False)
        if not isinstance(enabled, bool):
            raise _error(f"inbound.mtls.enabled: {enabled!r} must be true or false")
        ids = string_list(data, "allowed_spiffe_ids", "inbound.mtls", ())
        for spiffe_id in ids:
            if not spiffe_id.startswith("spiffe://"):
                raise _error(f"inbound.mtls.allowed_spiffe_ids: {spiffe_id!r} is not a spiffe:// ID")
        domains = string_list(data, "allowed_trust_domains", "inbound.mtls", ())
        return cls(
            enabled=enabled,
            allowed_spiffe_ids=ids,
            allowed_trust_domains=tuple(d.removeprefix("spiffe://").rstrip("/") for d in domains),
        )

    def allows(self, spiffe_id: str) -> bool:
        if not self.allowed_spiffe_ids and not self.allowed_trust_domains:
            return True
        if spiffe_id in self.allowed_spiffe_ids:
            return True
        domain = urlsplit(spiffe_id).netloc
        return domain in self.allowed_trust_domains


@dataclass(frozen=True)
class InboundConfig:
    host: str = "0.0.0.0"
    port: int = 15006
    mcp_port: int = 8080  # the app's port on 127.0.0.1 (per pod: `outrider.dev/mcp-port`)
    # This MCP server's resource URI: the audience callers' tokens must carry (RFC 8707 / RFC 9728).
    resource: str | None = None
    issuer: str | None = None
    jwks_uri: str | None = None  # skips OIDC discovery when set
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_s: float = 30.0
    required_scopes: tuple[str, ...] = ()
    # Refuse a JWT whose header lacks `typ: at+jwt` (RFC 9068): for issuers that always set it.
    # Without it an ID token is still refused when it says so (see claims.not_an_access_token).
    require_access_token_typ: bool = False
    # For RFC 9728 metadata; defaults to [issuer].
    authorization_servers: tuple[str, ...] = ()
    jwks_refresh_interval_s: float = 600.0
    jwks_min_refresh_interval_s: float = 30.0  # rate limit for unknown-`kid` refreshes
    # Signing keys kept per issuer (the first ones of the JWKS); its document is read up to 1 MiB.
    jwks_max_keys: int = 100
    mtls: MtlsConfig = field(default_factory=MtlsConfig)
    max_body_bytes: int = 4 * 1024 * 1024
    upstream_timeout_s: float = 30.0  # connect + response headers (+ body for JSON answers)
    # Connections to the app held at once (an open SSE stream holds one for its lifetime), in all
    # and per caller (0: no per-caller cap); a request finding none free waits `upstream_wait_s`,
    # then gets 503.
    upstream_max_connections: int = 1000
    upstream_max_connections_per_caller: int = 250
    upstream_wait_s: float = 1.0
    sse_idle_timeout_s: float = 300.0  # longest silence on a streamed SSE answer
    # Where the exchanged token goes on the way to the app (`Bearer` in Authorization, else raw);
    # None: `exchange.header`.
    token_header: str | None = None
    legacy_sse_path: str = "/sse"  # 2024-11-05 HTTP+SSE stream path (its POSTs use the `endpoint` URL)
    # Verified-token cache: a token seen again skips the signature check until it expires.
    token_cache_size: int = 4096
    # With no issuer and no mTLS every call is refused unless this is set (dev only).
    allow_unauthenticated: bool = False
    # Token claims (dotted paths) whose strings become the caller's groups and roles: the parents of
    # the `User` entity that Cedar policies test with `principal in Group::"admins"`.
    group_claims: tuple[str, ...] = ("groups",)
    role_claims: tuple[str, ...] = ("roles", "realm_access.roles")
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    # More trusted issuers, each with its own audience, keys/introspection and exchange.
    issuers: tuple[IssuerConfig, ...] = ()
    introspection: IntrospectionConfig | None = None  # RFC 7662 for `issuer` (opaque tokens)
    dpop: DpopConfig = field(default_factory=DpopConfig)
    # The URL callers use to reach this server (DPoP `htu`); default: `resource`.
    public_url: str | None = None
    # Browser origins allowed to call (CORS); none listed: no CORS headers, preflights refused (401).
    cors: CorsConfig = field(default_factory=CorsConfig)

    @property
    def auth_enabled(self) -> bool:
        return self.issuer is not None or bool(self.issuers)

    @property
    def trusted_issuers(self) -> tuple[IssuerConfig, ...]:
        """Every trusted issuer; `issuer` (with the top-level `exchange` section) comes first."""
        primary: tuple[IssuerConfig, ...] = ()
        if self.issuer:
            primary = (
                IssuerConfig(
                    issuer=self.issuer,
                    audience=self.resource,
                    jwks_uri=self.jwks_uri,
                    introspection=self.introspection,
                    exchange=None,
                ),
            )
        return primary + self.issuers

    @property
    def metadata_servers(self) -> tuple[str, ...]:
        if self.authorization_servers:
            return self.authorization_servers
        return tuple(i.issuer for i in self.trusted_issuers)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> InboundConfig:
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise _error(f"inbound: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        host = data.get("host", cls.host)
        if not isinstance(host, str) or not host:
            raise _error(f"inbound.host: {host!r} must be an address to listen on")
        algorithms = string_list(data, "algorithms", "inbound", DEFAULT_ALGORITHMS)
        for alg in algorithms:
            if alg not in SUPPORTED_ALGORITHMS:
                raise _error(
                    f"inbound.algorithms: {alg!r} is not allowed; use asymmetric ones: "
                    f"{sorted(SUPPORTED_ALGORITHMS)}"
                )
        issuer = url_value(data.get("issuer"), "inbound.issuer", required=False)
        issuers = parse_issuers(data.get("issuers"), SUPPORTED_ALGORITHMS)
        resource = url_value(
            data.get("resource"),
            "inbound.resource",
            required=issuer is not None or any(i.audience is None for i in issuers),
        )
        introspection_raw = data.get("introspection")
        if introspection_raw is not None and issuer is None:
            raise _error(
                "inbound.introspection: needs inbound.issuer (or use inbound.issuers[].introspection)"
            )
        introspection = (
            IntrospectionConfig.from_mapping(introspection_raw, "inbound.introspection")
            if introspection_raw is not None
            else None
        )
        dpop = DpopConfig.from_mapping(data.get("dpop") or {})
        if issuer is not None and issuer in {i.issuer for i in issuers}:
            raise _error(f"inbound.issuers: {issuer!r} is already inbound.issuer")
        servers = string_list(data, "authorization_servers", "inbound", ())
        for server in servers:
            url_value(server, "inbound.authorization_servers", required=True)
        mtls_raw = data.get("mtls")
        mtls = MtlsConfig.from_mapping({} if mtls_raw is None else mtls_raw)
        token_header = data.get("token_header")
        if token_header is not None and (
            not isinstance(token_header, str) or not token_header.strip() or ":" in token_header
        ):
            raise _error(f"inbound.token_header: {token_header!r} must be an HTTP header name")
        legacy = data.get("legacy_sse_path", cls.legacy_sse_path)
        if not isinstance(legacy, str) or not legacy.startswith("/"):
            raise _error(f"inbound.legacy_sse_path: {legacy!r} must be a path starting with /")
        require_typ = data.get("require_access_token_typ", False)
        if not isinstance(require_typ, bool):
            raise _error(f"inbound.require_access_token_typ: {require_typ!r} must be true or false")
        anonymous = data.get("allow_unauthenticated", False)
        if not isinstance(anonymous, bool):
            raise _error(f"inbound.allow_unauthenticated: {anonymous!r} must be true or false")
        total = _int(data, "upstream_max_connections", cls.upstream_max_connections, 1, 100_000)
        per_caller = _int(
            data,
            "upstream_max_connections_per_caller",
            min(cls.upstream_max_connections_per_caller, total),
            0,
            total,
        )
        config = cls(
            issuers=issuers,
            introspection=introspection,
            dpop=dpop,
            public_url=url_value(data.get("public_url"), "inbound.public_url", required=False),
            allow_unauthenticated=anonymous,
            host=host,
            port=_int(data, "port", cls.port, 1, 65535),
            mcp_port=_int(data, "mcp_port", cls.mcp_port, 1, 65535),
            resource=resource,
            issuer=issuer,
            jwks_uri=url_value(data.get("jwks_uri"), "inbound.jwks_uri", required=False),
            algorithms=algorithms,
            leeway_s=_float(data, "leeway_s", cls.leeway_s, 0, 300),
            required_scopes=string_list(data, "required_scopes", "inbound", ()),
            require_access_token_typ=require_typ,
            authorization_servers=servers,
            jwks_refresh_interval_s=_float(
                data, "jwks_refresh_interval_s", cls.jwks_refresh_interval_s, 10, 86400
            ),
            jwks_min_refresh_interval_s=_float(
                data, "jwks_min_refresh_interval_s", cls.jwks_min_refresh_interval_s, 0, 3600
            ),
            jwks_max_keys=_int(data, "jwks_max_keys", cls.jwks_max_keys, 1, 10_000),
            mtls=mtls,
            max_body_bytes=_int(data, "max_body_bytes", cls.max_body_bytes, 1024, 1 << 30),
            upstream_timeout_s=_float(data, "upstream_timeout_s", cls.upstream_timeout_s, 0.01, 3600),
            upstream_max_connections=total,
            upstream_max_connections_per_caller=per_caller,
            upstream_wait_s=_float(data, "upstream_wait_s", cls.upstream_wait_s, 0, 60),
            sse_idle_timeout_s=_float(data, "sse_idle_timeout_s", cls.sse_idle_timeout_s, 0.01, 86400),
            token_header=token_header.strip() if token_header else None,
            legacy_sse_path=legacy,
            token_cache_size=_int(data, "token_cache_size", cls.token_cache_size, 0, 1 << 20),
            group_claims=string_list(data, "group_claims", "inbound", cls.group_claims),
            role_claims=string_list(data, "role_claims", "inbound", cls.role_claims),
            sessions=SessionsConfig.from_mapping(data.get("sessions") or {}),
            cors=CorsConfig.from_mapping(data.get("cors") or {}),
        )
        check_trust(config.trusted_issuers)
        return config
