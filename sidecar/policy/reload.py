"""The policy in force: the pod-spec layers plus the app team's reloadable narrowing file.

The pod-spec layers (written by the webhook) are fixed for the pod's life; the file (a ConfigMap
volume) may change at any time, may only narrow, and a bad version keeps the last good one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outrider.sidecar.policy.cedar_text import CedarError, CompiledPolicies, compile_policies
from outrider.sidecar.policy.config import PolicyConfig
from outrider.sidecar.policy.engine import Policies, build, compile_layers
from outrider.sidecar.policy.limits_config import LimitsError, RateLimits
from outrider.sidecar.polled_file import read_if_changed

log = logging.getLogger("outrider.policy")
_FILE_KEYS = frozenset({"cedar", "rate_limits"})
# A spec layer that does not compile cannot be guessed at: it is replaced by this (deny everything).
_DENY_ALL = "forbid(principal, action, resource);"


@dataclass(frozen=True)
class FileLayer:
    policies: CompiledPolicies | None
    limits: RateLimits


def parse_file(text: str, origin: str) -> FileLayer:
    """The narrowing file: YAML with `cedar` (forbid-only text) and `rate_limits`. Raises ValueError."""
    if not text.strip():
        return FileLayer(None, RateLimits())
    import yaml  # only once a policy file has content (~0.8 MB resident)

    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"{origin}: {where}not valid YAML") from None
    if data is None:
        return FileLayer(None, RateLimits())
    if not isinstance(data, dict):
        raise ValueError(f"{origin}: must be a mapping with keys {sorted(_FILE_KEYS)}")
    unknown = sorted(set(map(str, data)) - _FILE_KEYS)
    if unknown:
        raise ValueError(f"{origin}: unknown key(s) {unknown}; allowed: {sorted(_FILE_KEYS)}")
    cedar = data.get("cedar")
    policies = None
    if cedar is not None:
        if not isinstance(cedar, str):
            raise ValueError(f"{origin}: `cedar` must be Cedar policy text")
        try:
            policies = compile_policies(cedar, f"{origin} cedar", forbid_only=True)
        except CedarError as exc:
            raise ValueError(str(exc)) from None
    try:
        limits = RateLimits.from_mapping(data.get("rate_limits"), f"{origin} rate_limits")
    except LimitsError as exc:
        raise ValueError(str(exc)) from None
    return FileLayer(policies if policies is not None and len(policies) else None, limits)


@dataclass
class PolicyHolder:
    """The effective policies and rate limits; `check()` re-reads the file when its bytes change."""

    spec: list[tuple[CompiledPolicies, bool]]
    spec_limits: RateLimits
    path: Path | None
    spec_errors: tuple[str, ...] = ()
    file_layer: FileLayer | None = None
    last_error: str | None = None
    reloads: int = 0
    reload_errors: int = 0
    policies: Policies = field(default_factory=lambda: build(()))
    limits: RateLimits = field(default_factory=RateLimits)
    _digest: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: PolicyConfig) -> PolicyHolder:
        compiled, errors = compile_layers(config.layers)
        for message in errors:
            log.error("policy: %s; that layer is replaced by deny-all until the pod is fixed", message)
            compiled.append((compile_policies(_DENY_ALL, "deny-all (a policy layer did not compile)"), True))
        holder = cls(
            spec=compiled,
            spec_limits=config.rate_limits,
            path=Path(config.file) if config.file else None,
            spec_errors=tuple(errors),
        )
        holder._rebuild()
        holder.check()
        return holder

    def _rebuild(self) -> None:
        layers = list(self.spec)
        limits = self.spec_limits
        if self.file_layer is not None:
            if self.file_layer.policies is not None:
                layers.append((self.file_layer.policies, True))
            limits = limits.narrowed(self.file_layer.limits)
        self.policies = build(layers)
        self.limits = limits

    def check(self) -> bool:
        """Re-read the file; True when the effective policy changed."""
        if self.path is None:
            return False
        changed = read_if_changed(self.path, self._digest, self._fail)
        if changed is None:
            return False
        raw, self._digest = changed
        try:
            text = raw.decode("utf-8")
            layer = parse_file(text, f"policy file {self.path}")
        except UnicodeDecodeError:
            self._fail(f"policy file {self.path}: not UTF-8 text")
            return False
        except ValueError as exc:
            self._fail(str(exc))
            return False
        self.file_layer = layer if (layer.policies is not None or not layer.limits.empty) else None
        self._rebuild()
        self.last_error = None
        self.reloads += 1
        log.info("policy: file %s loaded: %s", self.path, self.policies.describe())
        return True

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.reload_errors += 1
        log.warning("policy: %s; keeping the last good policy", message)
