"""`plan_egress`: mode choice, operator layer, the narrowing annotation, env and init args (pure)."""

from __future__ import annotations

from typing import Any

from outrider.sidecar.egress.policy import Destination, decide, parse_policy
from outrider.webhook.egress import EGRESS_ALLOW, EGRESS_MODE_LABEL, POD_SECURITY_ENFORCE, plan_egress

CLUSTER = {"allow": ["api.github.com:443", "*.googleapis.com:443"]}
NAMESPACE = {"allow": ["db.internal:5432", "api.github.com"]}


def pod(annotations: dict[str, str] | None = None, dns: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "mcp"}]}
    if dns is not None:
        spec["dnsConfig"] = {"nameservers": dns}
    return {"metadata": {"name": "p", "namespace": "shop", "annotations": annotations or {}}, "spec": spec}


def allows(plan_policy: Any, name: str, port: int) -> bool:
    policy, errors = parse_policy(plan_policy, "pod spec")
    assert not errors
    return decide(policy, Destination(port=port, name=name)).allowed


def test_cluster_default_without_namespace_policy() -> None:
    plan = plan_egress(pod(), {}, None, CLUSTER)
    assert plan.mode == "capture" and not plan.errors
    assert allows(plan.policy, "api.github.com", 443)
    assert allows(plan.policy, "storage.googleapis.com", 443)
    assert not allows(plan.policy, "db.internal", 5432)


def test_namespace_policy_replaces_default_unless_included() -> None:
    plan = plan_egress(pod(), {}, NAMESPACE, CLUSTER)
    assert allows(plan.policy, "db.internal", 5432) and not allows(plan.policy, "storage.googleapis.com", 443)
    plan = plan_egress(pod(), {}, {**NAMESPACE, "includeClusterDefault": True}, CLUSTER)
    assert allows(plan.policy, "db.internal", 5432) and allows(plan.policy, "storage.googleapis.com", 443)


def test_annotation_narrows_and_cannot_widen() -> None:
    plan = plan_egress(pod({EGRESS_ALLOW: "api.github.com:443, evil.example"}), {}, None, CLUSTER)
    assert allows(plan.policy, "api.github.com", 443)
    assert not allows(plan.policy, "storage.googleapis.com", 443)  # narrowed away
    assert not allows(plan.policy, "evil.example", 443)  # never added


def test_annotation_alone_allows_nothing() -> None:
    plan = plan_egress(pod({EGRESS_ALLOW: "evil.example"}), {}, None, None)
    assert not allows(plan.policy, "evil.example", 443)
    assert any("all outbound traffic is denied" in w for w in plan.warnings)


def test_bad_annotation_refuses_the_pod_with_the_rule_text() -> None:
    plan = plan_egress(pod({EGRESS_ALLOW: "api.github.com:https"}), {}, None, CLUSTER)
    assert plan.errors and "api.github.com:https" in plan.errors[0] and EGRESS_ALLOW in plan.errors[0]


def test_bad_operator_rule_is_left_out_with_a_warning() -> None:
    plan = plan_egress(pod(), {}, {"allow": ["good.example", "bad..example"]}, None)
    assert not plan.errors
    assert any("bad..example" in w and "namespace shop policy" in w for w in plan.warnings)
    assert allows(plan.policy, "good.example", 443)


def test_explicit_mode_for_pod_security_baseline_and_restricted() -> None:
    for level in ("baseline", "restricted"):
        plan = plan_egress(pod(dns=["10.0.0.10"]), {POD_SECURITY_ENFORCE: level}, None, CLUSTER)
        assert plan.mode == "explicit" and plan.init_args == ()
        env = dict(plan.app_env)
        assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:15001"
        assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:15001"
        assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
    assert plan_egress(pod(), {POD_SECURITY_ENFORCE: "privileged"}, None, CLUSTER).mode == "capture"


def test_operator_label_forces_the_mode() -> None:
    assert plan_egress(pod(), {EGRESS_MODE_LABEL: "explicit"}, None, CLUSTER).mode == "explicit"
    plan = plan_egress(
        pod(), {EGRESS_MODE_LABEL: "capture", POD_SECURITY_ENFORCE: "restricted"}, None, CLUSTER
    )
    assert plan.mode == "capture" and plan.warnings


def test_custom_dns_servers_reach_outrider_init() -> None:
    plan = plan_egress(pod(dns=["10.0.0.10", "fd00::53", "not-an-ip"]), {}, None, CLUSTER)
    assert plan.init_args == ("--dns-server", "10.0.0.10", "--dns-server", "fd00::53")
