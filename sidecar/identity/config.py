"""The `identity` section of the sidecar configuration: where the Workload API is and how to retry.

Parsed once at start-up; every key has a default that works with the SPIFFE CSI driver mount.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outrider.sidecar.config_error import ConfigError

DEFAULT_SOCKET = "unix:///spiffe-workload-api/spire-agent.sock"
SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"


def _config_error(message: str) -> ConfigError:
    return ConfigError(message)


def _number(data: Mapping[str, Any], key: str, default: float, *, low: float, high: float) -> float:
    value = data.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _config_error(f"identity.{key}: {value!r} is not a number ({low}..{high})") from None
    if not low <= number <= high:
        raise _config_error(f"identity.{key}: {number} is outside the allowed range {low}..{high}")
    return number


def normalise_socket(value: str) -> str:
    """Accept `unix:///path`, `unix:/path` or a bare absolute path; return the gRPC target."""
    if value.startswith("unix://"):
        path = value[len("unix://") :]
    elif value.startswith("unix:"):
        path = value[len("unix:") :]
    elif value.startswith("/"):
        path = value
    else:
        raise _config_error(
            f"identity.socket: {value!r} is not a unix socket address; use unix:///path/to/agent.sock "
            f"(or set {SOCKET_ENV})"
        )
    if not path.startswith("/"):
        raise _config_error(f"identity.socket: {value!r} must name an absolute path (unix:///...)")
    return "unix://" + path


@dataclass(frozen=True)
class IdentityConfig:
    # gRPC target of the SPIFFE Workload API, `unix:///...` (config key, else SPIFFE_ENDPOINT_SOCKET).
    socket: str = DEFAULT_SOCKET
    # Retry backoff after a failed Workload API stream: exponential from min to max, with full jitter.
    backoff_min_s: float = 0.5
    backoff_max_s: float = 15.0
    # A JWT-SVID is reused until this fraction of its lifetime has passed (SPIRE rotates at 1/2).
    jwt_refresh_fraction: float = 0.5
    # Upper bound on one JWT-SVID fetch; the caller gets IdentityUnavailable after it.
    jwt_fetch_timeout_s: float = 5.0
    # How many audiences' JWT-SVIDs are cached (least recently used are dropped first).
    jwt_cache_size: int = 256
    # While the agent is unreachable (e.g. a DaemonSet roll) the cached SVID keeps serving and the
    # pod stays ready for this long, as long as the SVID itself is still valid.
    stale_grace_s: float = 30.0
    # The SVID counts as unusable this many seconds before its notAfter (clock skew margin).
    expiry_margin_s: float = 2.0

    @property
    def socket_path(self) -> str:
        return self.socket[len("unix://") :]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> IdentityConfig:
        env = os.environ if env is None else env
        known = {
            "socket",
            "backoff_min_s",
            "backoff_max_s",
            "jwt_refresh_fraction",
            "jwt_fetch_timeout_s",
            "jwt_cache_size",
            "stale_grace_s",
            "expiry_margin_s",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise _config_error(f"identity: unknown key(s) {unknown}; allowed: {sorted(known)}")
        raw_socket = data.get("socket") or env.get(SOCKET_ENV) or DEFAULT_SOCKET
        if not isinstance(raw_socket, str):
            raise _config_error(f"identity.socket: {raw_socket!r} must be a string like unix:///path")
        backoff_min = _number(data, "backoff_min_s", cls.backoff_min_s, low=0.01, high=60)
        backoff_max = _number(data, "backoff_max_s", cls.backoff_max_s, low=0.01, high=600)
        if backoff_max < backoff_min:
            raise _config_error(
                f"identity.backoff_max_s ({backoff_max}) must not be below "
                f"identity.backoff_min_s ({backoff_min})"
            )
        return cls(
            socket=normalise_socket(raw_socket),
            backoff_min_s=backoff_min,
            backoff_max_s=backoff_max,
            jwt_refresh_fraction=_number(
                data, "jwt_refresh_fraction", cls.jwt_refresh_fraction, low=0.1, high=0.9
            ),
            jwt_fetch_timeout_s=_number(
                data, "jwt_fetch_timeout_s", cls.jwt_fetch_timeout_s, low=0.1, high=120
            ),
            jwt_cache_size=int(_number(data, "jwt_cache_size", cls.jwt_cache_size, low=1, high=100_000)),
            stale_grace_s=_number(data, "stale_grace_s", cls.stale_grace_s, low=0, high=3600),
            expiry_margin_s=_number(data, "expiry_margin_s", cls.expiry_margin_s, low=0, high=300),
        )
