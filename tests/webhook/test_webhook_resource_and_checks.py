"""Per-server resources, the sidecar's own parser applied to the webhook's `sidecar:` block (at load,
at hot reload and per pod at admission), fixed ports, and image pull secrets."""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import jsonpatch
import pytest

from outrider.webhook import annotations as ann
from outrider.webhook import engine
from outrider.webhook.config import ConfigError, WebhookConfig, parse_config

ENABLED = {"outrider.dev/inject": "enabled"}
ISSUER = {"sidecar": {"inbound": {"issuer": "https://idp.example/realms/mcp"}}}
TEMPLATE = {
    **ISSUER,
    "resource_template": "https://{app}.{namespace}.mcp.example.com/mcp",
    "resource_patterns": [
        "https://*.{namespace}.mcp.example.com/mcp",
        "https://{service_account}.shared.example/mcp",
    ],
}


def _pod(
    namespace: str = "tools", labels: dict[str, str] | None = None, **annotations: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "weather"} if labels is None else labels,
            "annotations": annotations,
        },
        "spec": {
            "serviceAccountName": "weather-sa",
            "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 8080}]}],
        },
    }


def _outrider_config(pod: dict[str, Any]) -> dict[str, Any]:
    proxy = next(c for c in pod["spec"]["initContainers"] if c["name"] == "outrider-proxy")
    return json.loads(next(e["value"] for e in proxy["env"] if e["name"] == "OUTRIDER_CONFIG"))  # type: ignore[no-any-return]


def _status(pod: dict[str, Any]) -> dict[str, Any]:
    return json.loads(pod["metadata"]["annotations"][ann.STATUS])  # type: ignore[no-any-return]


# --- per-server resource --------------------------------------------------------------------------


def test_each_pod_gets_its_own_resource_from_the_template() -> None:
    config = parse_config(TEMPLATE)
    a = engine.inject(_pod("tools"), ENABLED, config)
    b = engine.inject(_pod("billing", {"app": "ledger"}), ENABLED, config)
    assert a.injected and b.injected
    assert _outrider_config(a.pod)["inbound"]["resource"] == "https://weather.tools.mcp.example.com/mcp"
    assert _outrider_config(b.pod)["inbound"]["resource"] == "https://ledger.billing.mcp.example.com/mcp"
    assert _status(a.pod)["resource"] == "https://weather.tools.mcp.example.com/mcp"
    assert jsonpatch.apply_patch(_pod("tools"), a.patch) == a.pod


def test_annotation_may_pick_only_inside_the_patterns() -> None:
    config = parse_config(TEMPLATE)
    own = engine.inject(_pod(**{ann.RESOURCE: "https://forecast.tools.mcp.example.com/mcp"}), ENABLED, config)
    assert own.injected and _status(own.pod)["resource"] == "https://forecast.tools.mcp.example.com/mcp"
    by_sa = engine.inject(_pod(**{ann.RESOURCE: "https://weather-sa.shared.example/mcp"}), ENABLED, config)
    assert by_sa.injected
    for claimed in (
        "https://ledger.billing.mcp.example.com/mcp",  # another namespace's server
        "https://a.b.tools.mcp.example.com/mcp",  # '*' is one DNS label, not two
        "https://forecast.tools.mcp.example.com/mcp/extra",
        "https://other-sa.shared.example/mcp",
        "https://forecast.tools.mcp.example.com.evil.example/mcp",
    ):
        refused = engine.inject(_pod(**{ann.RESOURCE: claimed}), ENABLED, config)
        assert not refused.allowed, claimed
        assert refused.message is not None and ann.RESOURCE in refused.message
        assert "https://*.tools.mcp.example.com/mcp" in refused.message  # the allowed values, for this pod


def test_annotation_without_patterns_and_bad_syntax_are_refused() -> None:
    no_patterns = parse_config({**ISSUER, "resource_template": "https://{namespace}.example/mcp"})
    result = engine.inject(_pod(**{ann.RESOURCE: "https://tools.example/mcp"}), ENABLED, no_patterns)
    assert not result.allowed and "resource_patterns is empty" in str(result.message)
    for bad in ("not a url", "ftp://x/mcp", "https://x/mcp#frag", "https://x/ mcp"):
        refused = engine.inject(_pod(**{ann.RESOURCE: bad}), ENABLED, parse_config(TEMPLATE))
        assert not refused.allowed and ann.RESOURCE in str(refused.message), bad


def test_unsafe_or_missing_pod_facts_are_refused() -> None:
    config = parse_config(TEMPLATE)
    dotted = engine.inject(_pod(labels={"app": "x.billing"}), ENABLED, config)
    assert not dotted.allowed and "DNS label" in str(dotted.message)
    missing = engine.inject(_pod(labels={}), ENABLED, config)
    assert not missing.allowed and "app.kubernetes.io/name" in str(missing.message)


def test_strict_reinjection_checks_the_recorded_resource() -> None:
    config = parse_config(TEMPLATE)
    strict = {"outrider.dev/inject": "strict"}
    pod = _pod()
    pod["spec"]["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "runAsUser": 1000,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    first = engine.inject(pod, strict, config)
    assert first.injected, first.message
    injected = first.pod
    assert engine.inject(injected, strict, config).skipped  # idempotent
    forged = json.loads(json.dumps(injected))
    status = _status(forged)
    status["resource"] = "https://ledger.billing.mcp.example.com/mcp"
    forged["metadata"]["annotations"][ann.STATUS] = json.dumps(status)
    result = engine.inject(forged, strict, config)
    assert not result.allowed and "resource" in str(result.message)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"resource_template": "https://{nmspace}.x/mcp"}, "unknown placeholder {nmspace}"),
        ({"resource_template": "{base_url}/{namespace}/mcp"}, "resource_base_url is not set"),
        ({"resource_template": "https://*.x/mcp"}, "may not contain '*'"),
        ({"resource_template": "{namespace}/mcp"}, "not an absolute http(s) URL"),
        ({"resource_patterns": "https://*.x/mcp"}, "resource_patterns"),
        ({"resource_patterns": ["https://{label:Bad Key}.x/mcp"]}, "does not name a label key"),
        ({"resource_base_url": "mcp.example.com"}, "resource_base_url"),
        (
            {
                "resource_template": "https://{namespace}.x/mcp",
                "sidecar": {"inbound": {"resource": "https://a/mcp"}},
            },
            "sidecar.inbound.resource",
        ),
        ({"image_pull_secrets": "regcred"}, "image_pull_secrets"),
        ({"image_pull_secrets": ["Reg_Cred"]}, "image_pull_secrets"),
        ({"image_pull_secrets": ["a", "a"]}, "twice"),
    ],
)
def test_resource_and_pull_secret_settings_are_checked_at_load(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**ISSUER, **data})
    assert fragment in str(err.value)


# --- the sidecar block, checked by the sidecar's parser ---------------------------------------------


@pytest.mark.parametrize(
    ("sidecar", "fragment"),
    [
        ({"inbound": {"isuer": "https://idp"}}, "sidecar: inbound: unknown key(s) ['isuer']"),
        ({"inbound": {"mtls": {"enabeld": True}}}, "inbound.mtls: unknown key(s) ['enabeld']"),
        ({"telemetry": {"audit": "syslog"}}, "telemetry.audit: 'syslog'"),
        ({"inbound": {"issuer": "https://idp"}}, "inbound.resource is required"),
        ({"exchange": {"token_endpoint": "https://idp/token"}}, "exchange.issuer: required"),
        ({"egress": {"mode": "explicit"}}, "sidecar.egress.mode: set per pod by the webhook"),
        ({"egress": {"policy": {"allow": []}}}, "sidecar.egress.policy: set per pod"),
        ({"egress": {"max_tunnels": 0}}, "egress.max_tunnels"),
        ({"admin": {"port": 9090}}, "sidecar.admin.port: 9090 cannot be changed"),
        ({"inbound": {"port": 16006}}, "sidecar.inbound.port: 16006 cannot be changed"),
        ({"egress": {"port": 16001}}, "sidecar.egress.port: 16001 cannot be changed"),
        ({"inbund": {}}, "unknown sidecar config section(s) ['inbund']"),
    ],
)
def test_sidecar_block_is_refused_with_the_sidecars_error(sidecar: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"sidecar": sidecar})
    assert fragment in str(err.value)


def test_fixed_ports_at_their_own_value_and_a_good_block_load() -> None:
    config = parse_config(
        {"sidecar": {"admin": {"port": 15020}, "inbound": {"port": 15006}, "egress": {"port": 15001}}}
    )
    assert engine.inject(_pod(), ENABLED, config).injected


def test_admission_refuses_a_pod_whose_merged_config_the_sidecar_would_refuse() -> None:
    # A config that never went through parse_config (built in code, or by an older webhook): the
    # per-pod check still stops it before it reaches a pod.
    config = WebhookConfig(sidecar=MappingProxyType({"inbound": MappingProxyType({"isuer": "https://idp"})}))
    result = engine.inject(_pod(), ENABLED, config)
    assert not result.allowed and not result.patch
    assert "outrider-proxy sidecar would refuse" in str(result.message)
    assert "inbound: unknown key(s) ['isuer']" in str(result.message)
    # the same refusal again, from the cache
    assert engine.inject(_pod(), ENABLED, config).message == result.message


# --- image pull secrets ------------------------------------------------------------------------------


def test_image_pull_secrets_are_added_once_and_the_pods_own_kept() -> None:
    config = parse_config({"image_pull_secrets": ["outrider-registry", "shared"]})
    pod = _pod()
    pod["spec"]["imagePullSecrets"] = [{"name": "shared"}]
    result = engine.inject(pod, ENABLED, config)
    assert result.pod["spec"]["imagePullSecrets"] == [{"name": "shared"}, {"name": "outrider-registry"}]
    assert _status(result.pod)["imagePullSecrets"] == ["outrider-registry"]  # only what was added
    assert jsonpatch.apply_patch(pod, result.patch) == result.pod
    plain = engine.inject(_pod(), ENABLED, config).pod
    assert plain["spec"]["imagePullSecrets"] == [{"name": "outrider-registry"}, {"name": "shared"}]
    assert "imagePullSecrets" not in engine.inject(_pod(), ENABLED, WebhookConfig()).pod["spec"]
    assert parse_config({}).hash == WebhookConfig().hash  # unset keys leave the hash alone


@pytest.mark.parametrize(
    "value",
    [
        "ftp://mcp.example/x",
        "https://",
        "https:///x",
        "https://mcp.example/x#f",
        "https://mcp.example/a b",
        "x",
    ],
)
def test_resource_annotation_syntax_is_refused_in_full(value: str) -> None:
    from outrider.webhook.annotations import AnnotationError, parse_resource

    with pytest.raises(AnnotationError) as caught:
        parse_resource(value)
    assert str(caught.value) == (
        f"annotation outrider.dev/resource={value!r} is not valid; allowed: an absolute https:// URL "
        "without a fragment, matching the operator's resource_patterns"
    )


def test_resource_annotation_accepts_http_and_ports_and_refusals_say_what_is_allowed() -> None:
    from outrider.webhook.annotations import parse_resource, resource_not_allowed

    assert parse_resource(" http://mcp.example/x ") == "http://mcp.example/x"
    assert parse_resource("https://mcp.example:8443/mcp") == "https://mcp.example:8443/mcp"
    assert parse_resource(None) is None
    value = "https://a.example/x"
    assert str(resource_not_allowed(value, ("https://*.a.example/mcp", "https://b.example/mcp"))) == (
        f"annotation outrider.dev/resource={value!r} is not a resource the operator allows for this pod; "
        "allowed values: https://*.a.example/mcp, https://b.example/mcp ('*' is one DNS label)"
    )
    assert str(resource_not_allowed(value, ())) == (
        f"annotation outrider.dev/resource={value!r} cannot be used: none of the operator's "
        "resource_patterns applies to this pod (they need labels it does not have)"
    )
    assert str(resource_not_allowed(value, (), configured=False)) == (
        f"annotation outrider.dev/resource={value!r} cannot be used: the webhook config allows no choice "
        "of resource (resource_patterns is empty); remove the annotation or ask the operator"
    )


def test_a_pod_without_an_mcp_port_still_gets_its_resource() -> None:
    """A pod whose MCP port is not declared (no container port): the template still names its
    resource, so tokens minted for another server are refused by its sidecar once a port is used."""
    pod = _pod()
    del pod["spec"]["containers"][0]["ports"]
    result = engine.inject(pod, ENABLED, parse_config(TEMPLATE))
    assert result.injected, result.message
    config = _outrider_config(result.pod)
    assert config["inbound"]["resource"] == "https://weather.tools.mcp.example.com/mcp"
    assert "mcp_port" not in config["inbound"]
    assert _status(result.pod)["resource"] == "https://weather.tools.mcp.example.com/mcp"
