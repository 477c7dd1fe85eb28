"""Every `outrider.dev/*` label and annotation: its name, its allowed values, and its parsing.

One place owns the names and their error messages (like vault-k8s `annotations.go`); the engine,
the docs and the offline tool import the constants from here and never spell a key themselves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from outrider.webhook.memo import Memo

PREFIX = "outrider.dev/"

# Namespace label: `enabled` injects every pod, `strict` also refuses pods that would escape the
# sidecar. Any other value (or no label) means the namespace has not opted in.
NAMESPACE_INJECT = "outrider.dev/inject"
NAMESPACE_ENABLED = "enabled"
NAMESPACE_STRICT = "strict"
NAMESPACE_VALUES = (NAMESPACE_ENABLED, NAMESPACE_STRICT)

# Pod label or annotation: "false" opts the pod out (refused in strict namespaces); "true" is the
# default and only documents intent.
POD_INJECT = "outrider.dev/inject"
POD_INJECT_VALUES = ("true", "false")

# Pod annotation written by the webhook: JSON with version, injected names and the config hash.
# Its presence marks a pod as already injected, which makes injection idempotent.
STATUS = "outrider.dev/status"

# Pod annotation: the MCP server's port, a number (1-65535) or the name of an app containerPort.
# Default: the first TCP containerPort of the first app container, else of the first native sidecar
# (an init container with restartPolicy Always).
MCP_PORT = "outrider.dev/mcp-port"

# Pod annotation: the downstream audience the sidecar exchanges caller tokens for. Must be one of
# the operator's allowed audiences (webhook config `token_audiences`); it can only narrow.
TOKEN_AUDIENCE = "outrider.dev/token-audience"  # noqa: S105 (a name, not a secret)

# Pod annotation: this MCP server's protected resource URI (the audience its callers' tokens must
# carry, advertised in its RFC 9728 metadata). Only a value the operator's `resource_patterns`
# allow for this pod; without it the operator's `resource_template` decides.
RESOURCE = "outrider.dev/resource"

# Pod annotation: the app team's egress allowlist. Parsed by `webhook.egress.plan_egress`, which
# intersects it with the operator's policy (it can only narrow, never widen).
EGRESS_ALLOW = "outrider.dev/egress-allow"

# Pod annotation: the app team's Cedar policies, `forbid` only (a `permit` is refused at admission).
# They narrow the operators' policies (webhook config `mcp_policy`); parsed by `outrider.webhook.mcp_policy`.
POLICY = "outrider.dev/policy"

# Namespace label (operator): force egress mode `capture` or `explicit`; without it the namespace's
# Pod Security level decides (baseline/restricted forbid NET_ADMIN, so explicit). Read by
# `webhook.egress.plan_egress`.
EGRESS_MODE_LABEL = "outrider.dev/egress-mode"

# Kubernetes' own annotation that `kubectl logs/exec` uses to pick a container without `-c`.
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

# Other meshes' labels, annotations and container names live in `outrider.webhook.meshes`.

# Fixed ports of the sidecar (design.md); the app may not claim them as its MCP port.
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15020
SIDECAR_PORTS = (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT)
SIDECAR_UID = 15337

# Kubernetes IANA_SVC_NAME: at most 15 characters, lowercase alphanumerics and '-', one letter.
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
# An OAuth audience is a URI or a plain client id; whitespace or quotes mean a pasting accident.
_AUDIENCE = re.compile(r"^[^\s\"']{1,512}$")


class AnnotationError(ValueError):
    """An `outrider.dev/*` value is wrong; the message names the key and the allowed values."""


@dataclass(frozen=True)
class PodSettings:
    """The app team's settings from one pod's labels and annotations, validated."""

    opt_out: bool = False
    opt_out_source: str | None = None  # "label" | "annotation", for the strict-mode message
    mcp_port: int | str | None = None  # a number or a containerPort name, resolved by the engine
    token_audience: str | None = None
    resource: str | None = None  # syntax-checked only; the engine checks it against the patterns
    already_injected: bool = False
    policy: str | None = None  # forbid-only Cedar text (validated: syntax with line/column, no permit)


def namespace_mode(labels: Mapping[str, str]) -> str | None:
    """`enabled`, `strict`, or None when the namespace has not opted in."""
    value = labels.get(NAMESPACE_INJECT)
    return value if value in NAMESPACE_VALUES else None


def _str_map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def parse_inject_flag(value: Any, where: str) -> bool | None:
    """True/False for a valid `outrider.dev/inject` pod value, None when absent."""
    if value is None:
        return None
    text = str(value).strip().lower() if isinstance(value, str | bool) else None
    if text not in POD_INJECT_VALUES:
        raise AnnotationError(f'{where} {POD_INJECT}={value!r} is not valid; allowed values: "true", "false"')
    return text == "true"


def parse_mcp_port(value: Any) -> int | str | None:
    if value is None:
        return None
    text = str(value).strip()
    allowed = "a port number 1-65535 or the name of a containerPort of an app container"
    if text.isdecimal():  # not isdigit: "²" is a digit that int() refuses
        port = int(text)
        if not 1 <= port <= 65535:
            raise AnnotationError(f"annotation {MCP_PORT}={value!r} is out of range; allowed: {allowed}")
        if port in SIDECAR_PORTS:
            raise AnnotationError(
                f"annotation {MCP_PORT}={value!r} is a port the outrider-proxy sidecar uses "
                f"({', '.join(map(str, SIDECAR_PORTS))}); move the MCP server to another port"
            )
        return port
    if _PORT_NAME.match(text):
        return text
    raise AnnotationError(f"annotation {MCP_PORT}={value!r} is not valid; allowed: {allowed}")


def parse_token_audience(value: Any, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if not _AUDIENCE.match(text):
        raise AnnotationError(
            f"annotation {TOKEN_AUDIENCE}={value!r} is not a valid audience (a URI or client id "
            "without spaces or quotes)"
        )
    if allowed and text not in allowed:
        raise AnnotationError(
            f"annotation {TOKEN_AUDIENCE}={value!r} is not an audience the operator allows; "
            f"allowed values: {', '.join(allowed)}"
        )
    if not allowed:
        raise AnnotationError(
            f"annotation {TOKEN_AUDIENCE}={value!r} cannot be used: the webhook config allows no "
            "token audiences (token_audiences is empty); ask the operator to add it"
        )
    return text


def parse_resource(value: Any) -> str | None:
    """The syntax of `outrider.dev/resource`: an absolute http(s) URL; whether it is allowed for this
    pod is `resource_allowed`'s question (it needs the operator's patterns and the pod's facts)."""
    if value is None:
        return None
    text = str(value).strip()
    parts = urlsplit(text)
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or parts.fragment
        or not _AUDIENCE.match(text)
    ):
        raise AnnotationError(
            f"annotation {RESOURCE}={value!r} is not valid; allowed: an absolute https:// URL without "
            "a fragment, matching the operator's resource_patterns"
        )
    return text


def resource_not_allowed(value: str, allowed: tuple[str, ...], configured: bool = True) -> AnnotationError:
    """The refusal for an `outrider.dev/resource` value outside what the operator allows.

    `allowed` are the operator's patterns as they read for this pod ('*' is one DNS label).
    """
    if not configured:
        return AnnotationError(
            f"annotation {RESOURCE}={value!r} cannot be used: the webhook config allows no choice of "
            "resource (resource_patterns is empty); remove the annotation or ask the operator"
        )
    if not allowed:
        return AnnotationError(
            f"annotation {RESOURCE}={value!r} cannot be used: none of the operator's resource_patterns "
            "applies to this pod (they need labels it does not have)"
        )
    return AnnotationError(
        f"annotation {RESOURCE}={value!r} is not a resource the operator allows for this pod; allowed "
        f"values: {', '.join(allowed)} ('*' is one DNS label)"
    )


# Parsed settings (or the refusal) by every value parse_pod reads, each with its type (1, True and
# "1" read differently): distinct pods of one workload share them, and a policy annotation's Cedar
# text is compiled once, not per pod.
_POD_KEYS = (POD_INJECT, MCP_PORT, TOKEN_AUDIENCE, RESOURCE, POLICY)
_PARSED: Memo[tuple[Any, ...], PodSettings | str] = Memo(1024)


def parse_pod(metadata: Mapping[str, Any], allowed_audiences: tuple[str, ...]) -> PodSettings:
    """Validate every `outrider.dev/*` key of a pod; raise `AnnotationError` on the first bad one."""
    labels = _str_map(metadata.get("labels"))
    annotations = _str_map(metadata.get("annotations"))
    flag = labels.get(POD_INJECT)
    key = (
        allowed_audiences,
        type(flag),
        flag,
        STATUS in annotations,
        *((type(v), v) for v in map(annotations.get, _POD_KEYS)),
    )
    try:
        found = _PARSED.get(key)
    except TypeError:  # an unhashable value (a YAML list or map): parse it without the memo
        return _parse_pod(labels, annotations, allowed_audiences)
    if found is None:
        try:
            found = _parse_pod(labels, annotations, allowed_audiences)
        except AnnotationError as exc:
            found = str(exc)
        _PARSED.put(key, found)
    if isinstance(found, str):
        raise AnnotationError(found)  # a new exception each time: no traceback shared across pods
    return found


def _parse_pod(
    labels: Mapping[str, Any], annotations: Mapping[str, Any], allowed_audiences: tuple[str, ...]
) -> PodSettings:
    from_label = parse_inject_flag(labels.get(POD_INJECT), "label")
    from_annotation = parse_inject_flag(annotations.get(POD_INJECT), "annotation")
    opt_out_source = None
    if from_label is False:
        opt_out_source = "label"
    elif from_annotation is False:
        opt_out_source = "annotation"
    return PodSettings(
        opt_out=opt_out_source is not None,
        opt_out_source=opt_out_source,
        mcp_port=parse_mcp_port(annotations.get(MCP_PORT)),
        token_audience=parse_token_audience(annotations.get(TOKEN_AUDIENCE), allowed_audiences),
        resource=parse_resource(annotations.get(RESOURCE)),
        already_injected=STATUS in annotations,
        policy=parse_policy(annotations.get(POLICY)),
    )


def parse_policy(value: Any) -> str | None:
    from outrider.webhook.mcp_policy import parse_annotation  # the Cedar checks live with the policy planner

    try:
        return parse_annotation(value)
    except ValueError as exc:
        raise AnnotationError(str(exc)) from None


_KNOWN = frozenset({POD_INJECT, STATUS, MCP_PORT, TOKEN_AUDIENCE, EGRESS_ALLOW, RESOURCE, POLICY})


def unknown_keys(metadata: Mapping[str, Any]) -> list[str]:
    """`outrider.dev/*` annotations this version does not know (warned about: likely a typo)."""
    annotations = _str_map(metadata.get("annotations"))
    return sorted(k for k in annotations if isinstance(k, str) and k.startswith(PREFIX) and k not in _KNOWN)
