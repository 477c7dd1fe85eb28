"""The `egress` section of the sidecar configuration: mode, the pod-spec policy, the reloaded file, limits.

Parsed once from a plain mapping; every error names the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outrider.sidecar.config_error import ConfigError

MODES = ("capture", "explicit")
RESOLVERS = ("dns", "system")
DEFAULT_POLICY_FILE = "/etc/outrider/egress/policy.yaml"

_KEYS = frozenset(
    {
        "mode",
        "policy",
        "policy_file",
        "reload_interval_s",
        "listen",
        "port",
        "max_tunnels",
        "peek_bytes",
        "hello_timeout_s",
        "connect_timeout_s",
        "buffer_bytes",
        "dns_cache_s",
        "idle_timeout_s",
        "resolver",
        "resolv_conf",
    }
)


def _error(message: str) -> ConfigError:
    return ConfigError(message)


def _number(data: Mapping[str, Any], key: str, default: float, lo: float, hi: float, *, integer: bool) -> Any:
    value = data.get(key, default)
    kind = "an integer" if integer else "a number"
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: YAML `.inf`, JSON `Infinity`
        raise _error(f"egress.{key}: {value!r} is not {kind} ({lo}-{hi})") from None
    if isinstance(value, bool) or not lo <= number <= hi:
        raise _error(f"egress.{key}: {value!r} is out of range ({lo}-{hi})")
    return number


@dataclass(frozen=True)
class EgressConfig:
    # "capture": iptables sends every outbound TCP connection to `port`; "explicit": the apps use
    # HTTP(S)_PROXY. The listener serves both (a connection without an original destination is a
    # proxy client), so the mode only labels audit events and decides nothing about reachability.
    mode: str = "capture"
    # The resolved policy from the pod spec (written by the webhook; immutable for the pod's life).
    policy: Mapping[str, Any] | None = None
    # A mounted policy (ConfigMap volume) reloaded on change; it can only narrow `policy`.
    policy_file: str | None = DEFAULT_POLICY_FILE
    reload_interval_s: float = 2.0
    listen: tuple[str, ...] = ("127.0.0.1", "::1")
    port: int = 15001
    max_tunnels: int = 1024
    peek_bytes: int = 16384
    hello_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0
    buffer_bytes: int = 1048576  # relay pipe (splice) size per direction (the unprivileged maximum)
    # How long the enforcer reuses a name's resolution. Short: the resolver's own TTLs are not visible
    # through getaddrinfo, and a stale answer only ever sends traffic to an address the name had.
    dns_cache_s: float = 5.0
    # A relayed tunnel with no byte in either direction for this long is closed (0: never), so idle
    # connections cannot hold the `max_tunnels` slots forever. An hour, like Envoy's TCP proxy default:
    # long-lived MCP streams send keep-alives well within it.
    idle_timeout_s: float = 3600.0
    # "dns": ask the resolv.conf servers directly (read once at start). "system": getaddrinfo, which
    # also reads the pod's shared /etc/hosts, i.e. `hostAliases` and whatever a root app writes there.
    resolver: str = "dns"
    resolv_conf: str = "/etc/resolv.conf"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EgressConfig:
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise _error(f"egress: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        mode = str(data.get("mode", cls.mode))
        if mode not in MODES:
            raise _error(f"egress.mode: {mode!r} is not one of {list(MODES)}")
        resolver = str(data.get("resolver", cls.resolver))
        if resolver not in RESOLVERS:
            raise _error(f"egress.resolver: {resolver!r} is not one of {list(RESOLVERS)}")
        resolv_conf = data.get("resolv_conf", cls.resolv_conf)
        if not isinstance(resolv_conf, str) or not resolv_conf:
            raise _error(f"egress.resolv_conf: {resolv_conf!r} must be a path")
        policy = data.get("policy")
        if policy is not None and not isinstance(policy, Mapping):
            raise _error(
                f"egress.policy: must be a mapping (the resolved policy), not {type(policy).__name__}"
            )
        policy_file = data.get("policy_file", cls.policy_file)
        if policy_file is not None and not isinstance(policy_file, str):
            raise _error(f"egress.policy_file: {policy_file!r} must be a path or null")
        listen = data.get("listen", cls.listen)
        if isinstance(listen, str):
            listen = [listen]
        if not isinstance(listen, list | tuple) or not listen or not all(isinstance(x, str) for x in listen):
            raise _error(f"egress.listen: {listen!r} must be a list of addresses (like 127.0.0.1, ::1)")
        return cls(
            mode=mode,
            policy=policy,
            policy_file=policy_file or None,
            reload_interval_s=_number(
                data, "reload_interval_s", cls.reload_interval_s, 0.1, 3600, integer=False
            ),
            listen=tuple(listen),
            port=_number(data, "port", cls.port, 1, 65535, integer=True),
            max_tunnels=_number(data, "max_tunnels", cls.max_tunnels, 1, 1_000_000, integer=True),
            peek_bytes=_number(data, "peek_bytes", cls.peek_bytes, 512, 1 << 20, integer=True),
            hello_timeout_s=_number(data, "hello_timeout_s", cls.hello_timeout_s, 0.05, 600, integer=False),
            connect_timeout_s=_number(
                data, "connect_timeout_s", cls.connect_timeout_s, 0.05, 600, integer=False
            ),
            buffer_bytes=_number(data, "buffer_bytes", cls.buffer_bytes, 4096, 16 << 20, integer=True),
            dns_cache_s=_number(data, "dns_cache_s", cls.dns_cache_s, 0, 300, integer=False),
            idle_timeout_s=_number(data, "idle_timeout_s", cls.idle_timeout_s, 0, 86400, integer=False),
            resolver=resolver,
            resolv_conf=resolv_conf,
        )
