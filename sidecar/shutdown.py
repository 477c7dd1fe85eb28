"""The sidecar's graceful stop on SIGTERM: the `shutdown` configuration section and its phases.

Phases: /readyz reports `draining` at once; new connections are still accepted for `grace_s` (the
endpoint removal may not have reached every node yet); then the listeners close and in-flight calls
get at most `drain_timeout_s` to finish; then the process exits 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outrider.sidecar.config_error import ConfigError

_KEYS = ("grace_s", "drain_timeout_s")


def _seconds(data: Mapping[str, Any], key: str, default: float, hi: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= hi:
        raise ConfigError(f"shutdown.{key}: {value!r} must be a number of seconds (0-{hi:g})")
    return float(value)


@dataclass(frozen=True)
class ShutdownConfig:
    # keep accepting new connections this long after SIGTERM (while /readyz already says draining)
    grace_s: float = 1.0
    # then wait at most this long for in-flight calls (open SSE streams included) before closing them
    drain_timeout_s: float = 10.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ShutdownConfig:
        unknown = sorted(str(k) for k in set(data) - set(_KEYS))
        if unknown:
            raise ConfigError(f"shutdown: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        return cls(
            grace_s=_seconds(data, "grace_s", cls.grace_s, 60),
            drain_timeout_s=_seconds(data, "drain_timeout_s", cls.drain_timeout_s, 600),
        )

    @property
    def longest_s(self) -> float:
        """The longest a stop can take: the grace, the drain, and aiohttp's cancel phase after it."""
        return self.grace_s + 2 * self.drain_timeout_s
