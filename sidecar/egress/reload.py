"""The policy in force: the pod-spec policy intersected with the mounted, reloadable policy file.

The pod spec is written by the webhook from operator-owned sources and cannot change for the pod's
life; the file (a ConfigMap volume) can change at any time but is only ever intersected with it, so
whoever can edit the file can narrow egress live and can never widen it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outrider.sidecar.egress.policy import Policy, PolicyError, RuleError, parse_policy
from outrider.sidecar.polled_file import read_if_changed

log = logging.getLogger("outrider.egress")


@dataclass(frozen=True)
class FileResult:
    policy: Policy | None  # None: no file (or an empty one), nothing to intersect with
    errors: tuple[str, ...] = ()


def parse_policy_file(text: str, origin: str) -> FileResult:
    """Parse the mounted file; any error rejects the whole file (the caller keeps the last good one)."""
    if not text.strip():
        return FileResult(None)
    import yaml  # only once a policy file has content (~0.8 MB resident)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return FileResult(None, (f"{origin}: not valid YAML/JSON: {exc}",))
    if data is None:
        return FileResult(None)
    try:
        policy, rule_errors = parse_policy(data, origin)
    except PolicyError as exc:
        return FileResult(None, (str(exc),))
    if rule_errors:
        return FileResult(None, tuple(str(e) for e in rule_errors))
    return FileResult(policy)


def spec_policy(data: Mapping[str, Any] | None) -> tuple[Policy, tuple[RuleError, ...]]:
    """The pod-spec policy; a bad rule is dropped (deny by default makes that a narrowing) and reported."""
    try:
        return parse_policy(data, "pod spec egress.policy")
    except PolicyError as exc:
        log.error("egress: %s; denying all egress", exc)
        return Policy(
            layers=(),
        ), ()


def effective(spec: Policy, file_policy: Policy | None) -> Policy:
    if file_policy is None:
        return spec
    return spec.narrowed(*file_policy.layers)


@dataclass
class PolicyHolder:
    """Keeps the effective policy and reloads the file when its bytes change."""

    spec: Policy
    path: Path | None
    file_policy: Policy | None = None
    last_error: str | None = None
    reloads: int = 0
    reload_errors: int = 0
    _digest: bytes | None = field(default=None, repr=False)
    # the effective policy and the (spec, file policy) it was built from: built once per reload,
    # not on each of the several reads a connection makes
    _built: tuple[Policy, Policy | None, Policy] | None = field(default=None, repr=False)

    @property
    def current(self) -> Policy:
        built = self._built
        if built is None or built[0] is not self.spec or built[1] is not self.file_policy:
            built = self._built = (self.spec, self.file_policy, effective(self.spec, self.file_policy))
        return built[2]

    def check(self) -> bool:
        """Re-read the file; True when the effective policy changed."""
        if self.path is None:
            return False
        changed = read_if_changed(self.path, self._digest, self._fail)
        if changed is None:
            return False
        raw, self._digest = changed
        result = parse_policy_file(raw.decode("utf-8", errors="replace"), f"policy file {self.path}")
        if result.errors:
            for message in result.errors:
                self._fail(message)
            return False
        self.file_policy = result.policy
        self.last_error = None
        self.reloads += 1
        log.info("egress: policy file %s loaded (%s)", self.path, "present" if result.policy else "absent")
        return True

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.reload_errors += 1
        log.warning("egress: %s; keeping the last good policy", message)
