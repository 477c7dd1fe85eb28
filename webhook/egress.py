"""How the egress policy and capture mode reach an injected pod.

A pure function: pod + namespace facts + operator policy -> what the injection engine must write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from outrider.sidecar.egress.policy import (
    Policy,
    PolicyError,
    RuleSet,
    parse_ip,
    parse_policy,
    parse_rules,
    split_annotation,
    union,
)
from outrider.webhook.annotations import EGRESS_ALLOW, EGRESS_MODE_LABEL
from outrider.webhook.memo import Memo

# EGRESS_ALLOW and EGRESS_MODE_LABEL live with every other outrider.dev/* name (re-exported here).
__all__ = ["EGRESS_ALLOW", "EGRESS_MODE_LABEL", "EgressPlan", "plan_egress", "plan_egress_cached"]
POD_SECURITY_ENFORCE = "pod-security.kubernetes.io/enforce"
# Pod Security levels that refuse NET_ADMIN/NET_RAW, so `outrider-init` could never start there.
NO_NET_ADMIN_LEVELS = ("baseline", "restricted")

PROXY_URL = "http://127.0.0.1:15001"
# Loopback stays direct: the MCP server talks to its own sidecar and itself there.
NO_PROXY = "localhost,127.0.0.1,::1"

# Where the reloadable policy file is mounted in `outrider-proxy` (ConfigMap volume, optional).
POLICY_FILE = "/etc/outrider/egress/policy.yaml"
POLICY_CONFIG_MAP = "outrider-egress"


@dataclass(frozen=True)
class EgressPlan:
    mode: str  # "capture" (outrider-init + iptables) | "explicit" (HTTP(S)_PROXY, no init container)
    policy: Mapping[str, Any]  # the resolved policy; the engine writes it into OUTRIDER_CONFIG egress.policy
    app_env: tuple[tuple[str, str], ...] = ()  # env for every app container (explicit mode)
    init_args: tuple[str, ...] = ()  # extra `outrider iptables` arguments for outrider-init
    warnings: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()  # non-empty: refuse the pod with these messages
    # Optional narrowing file: a ConfigMap of this name in the pod's namespace, key `policy.yaml`,
    # mounted (optional: true) at `policy_file`. Anyone who can edit it can only narrow the policy.
    policy_config_map: str = POLICY_CONFIG_MAP
    policy_file: str = POLICY_FILE


def choose_mode(namespace_labels: Mapping[str, str]) -> tuple[str, tuple[str, ...]]:
    forced = namespace_labels.get(EGRESS_MODE_LABEL)
    level = namespace_labels.get(POD_SECURITY_ENFORCE, "privileged")
    if forced in ("capture", "explicit"):
        if forced == "capture" and level in NO_NET_ADMIN_LEVELS:
            return "capture", (
                f"namespace label {EGRESS_MODE_LABEL}=capture but {POD_SECURITY_ENFORCE}={level} forbids the "
                "NET_ADMIN init container; the pod will be rejected by Pod Security",
            )
        return forced, ()
    warnings: tuple[str, ...] = ()
    if forced is not None:
        warnings = (
            f"namespace label {EGRESS_MODE_LABEL}={forced!r} is not 'capture' or 'explicit'; ignored",
        )
    mode = "explicit" if level in NO_NET_ADMIN_LEVELS else "capture"
    return mode, warnings


def _operator_layer(
    namespace_policy: Mapping[str, Any] | None, cluster_policy: Mapping[str, Any] | None, namespace: str
) -> tuple[RuleSet | None, list[str]]:
    warnings: list[str] = []

    def layer(doc: Mapping[str, Any], origin: str) -> RuleSet:
        try:
            policy, errors = parse_policy(doc, origin)
        except PolicyError as exc:
            warnings.append(f"{exc}; that policy is ignored (deny by default)")
            return RuleSet(source=origin, rules=())
        # A bad rule is left out: with deny by default that can only narrow, never widen.
        warnings.extend(f"{e}; rule left out" for e in errors)
        result = policy.layers[0] if policy.layers else RuleSet(source=origin, rules=())
        warnings.extend(_broad_rule_warnings(result))
        return result

    cluster = layer(cluster_policy, "cluster default policy") if cluster_policy else None
    if namespace_policy is None:
        return cluster, warnings
    own = layer({"allow": namespace_policy.get("allow", [])}, f"namespace {namespace} policy")
    if namespace_policy.get("includeClusterDefault") and cluster is not None:
        own = union(cluster, own, f"namespace {namespace} policy + cluster default")
    return own, warnings


# The operator's layer (RuleSets are frozen) by the policies' canonical JSON and the namespace: a pod
# with its own egress allowlist gets a new plan, but the operator's policy is parsed once.
_LAYERS: Memo[tuple[bytes, bytes, str], tuple[RuleSet | None, tuple[str, ...]]] = Memo(256)


def _operator_layer_cached(
    namespace_policy: Mapping[str, Any] | None, cluster_policy: Mapping[str, Any] | None, namespace: str
) -> tuple[RuleSet | None, list[str]]:
    try:
        key = (_canon(namespace_policy), _canon(cluster_policy), namespace)
    except (TypeError, ValueError):  # odd shapes: parse without the memo
        return _operator_layer(namespace_policy, cluster_policy, namespace)
    found = _LAYERS.get(key)
    if found is None:
        layer, warnings = _operator_layer(namespace_policy, cluster_policy, namespace)
        found = _LAYERS.put(key, (layer, tuple(warnings)))
    return found[0], list(found[1])


def _canon(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=repr)


def plan_egress(
    pod: Mapping[str, Any],
    namespace_labels: Mapping[str, str],
    namespace_policy: Mapping[str, Any] | None,
    cluster_policy: Mapping[str, Any] | None,
) -> EgressPlan:
    """Operator layer (namespace policy, else the cluster default) ∩ the pod's own narrowing annotation."""
    metadata = pod.get("metadata") or {}
    namespace = str(metadata.get("namespace") or "default")
    mode, mode_warnings = choose_mode(namespace_labels)
    warnings = list(mode_warnings)
    errors: list[str] = []
    base, base_warnings = _operator_layer_cached(namespace_policy, cluster_policy, namespace)
    warnings.extend(base_warnings)
    layers: list[RuleSet] = []
    if base is None or not base.rules:
        warnings.append("no egress policy allows anything for this namespace: all outbound traffic is denied")
    # Always a first layer: without one, an annotation alone would become the whole policy (a widening).
    layers.append(base if base is not None else RuleSet(source="no operator egress policy", rules=()))
    annotation = (metadata.get("annotations") or {}).get(EGRESS_ALLOW)
    if annotation is not None:
        rules, rule_errors = parse_rules(split_annotation(str(annotation)), f"annotation {EGRESS_ALLOW}")
        errors.extend(
            f"{e}; allowed forms: host, host:443, *.example.com, 10.0.0.0/8:5432, [fd00::/8]:443, host:*"
            for e in rule_errors
        )
        layers.append(RuleSet(source=f"annotation {EGRESS_ALLOW}", rules=rules))
    policy = Policy(layers=tuple(layers))
    app_env: tuple[tuple[str, str], ...] = ()
    if mode == "explicit":
        # No outrider-init means no PREROUTING capture either: only callers that reach the sidecar's
        # port get authentication, token exchange and audit.
        warnings.append(
            "explicit-proxy egress mode: inbound traffic is not captured, so point the Service's "
            "targetPort at outrider-mcp (15006) and bind the MCP server to 127.0.0.1, or callers "
            "reaching the pod IP bypass authentication and audit"
        )
        app_env = tuple(
            (name, value)
            for upper, value in (
                ("HTTP_PROXY", PROXY_URL),
                ("HTTPS_PROXY", PROXY_URL),
                ("NO_PROXY", NO_PROXY),
            )
            for name in (upper, upper.lower())
        )
    return EgressPlan(
        mode=mode,
        policy=policy.to_mapping(),
        app_env=app_env,
        init_args=_init_args(pod) if mode == "capture" else (),
        warnings=tuple(warnings),
        errors=tuple(errors),
    )


def _init_args(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """Custom `dnsConfig` nameservers join the resolvers from /etc/resolv.conf that UDP may reach."""
    spec = pod.get("spec") or {}
    servers = ((spec.get("dnsConfig") or {}).get("nameservers")) or []
    args: list[str] = []
    for server in servers:
        if parse_ip(str(server)) is not None:  # the API server validates these; be safe offline too
            args += ["--dns-server", str(server)]
    return tuple(args)


def _broad_rule_warnings(layer: RuleSet) -> list[str]:
    """A `/0` CIDR is accepted (an operator may mean it) but said out loud: it allows every address of
    its family, and with it the metadata service and the pod's own loopback for IP-literal traffic."""
    out: list[str] = []
    for rule in layer.rules:
        if rule.network is not None and rule.network.prefixlen == 0:
            family = "IPv4" if rule.network.version == 4 else "IPv6"
            out.append(f"{layer.source}: egress rule {str(rule)!r} allows every {family} address")
    return out


# --- admission-time cache (added by the webhook hardening work) -----------------------------------
# plan_egress is pure and re-parses the same operator policy on every admission (~half of an
# uncached admission's Python time). The key holds every input plan_egress reads: keep it in step
# with plan_egress and _init_args when they read more of the pod. Plans are shared: read-only.
_PLAN_CACHE: Memo[tuple[Any, ...], EgressPlan] = Memo(512)


def plan_egress_cached(
    pod: Mapping[str, Any],
    namespace_labels: Mapping[str, str],
    namespace_policy: Mapping[str, Any] | None,
    cluster_policy: Mapping[str, Any] | None,
) -> EgressPlan:
    """`plan_egress`, memoised on exactly the inputs it reads."""
    canon = _canon
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotation = (metadata.get("annotations") or {}).get(EGRESS_ALLOW)
    try:
        key = (
            canon(cluster_policy),
            canon(namespace_policy),
            tuple(sorted((str(k), str(v)) for k, v in namespace_labels.items())),
            str(metadata.get("namespace") or "default"),
            None if annotation is None else str(annotation),
            canon((spec.get("dnsConfig") or {}).get("nameservers")),
        )
    except (AttributeError, TypeError, ValueError):  # odd shapes: plan without the cache
        return plan_egress(pod, namespace_labels, namespace_policy, cluster_policy)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _PLAN_CACHE.put(key, plan_egress(pod, namespace_labels, namespace_policy, cluster_policy))
    return plan
