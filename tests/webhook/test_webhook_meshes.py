"""Other meshes: a pod that has, or asks for, another mesh's capturing proxy is warned about and
left alone in `enabled` namespaces and refused in `strict` ones, with the label, annotation or
container named; through the engine and through the real webhook server over TLS.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from webhook_support import ThreadedWebhook, review

from outrider.webhook import engine, meshes
from outrider.webhook.config import WebhookConfig
from outrider.webhook.namespaces import StaticNamespaces

STRICT = {"outrider.dev/inject": "strict"}
ENABLED = {"outrider.dev/inject": "enabled"}


def pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mcp", "labels": {}, "annotations": {}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "ghcr.io/example/mcp:1",
                    "ports": [{"containerPort": 8080}],
                    "securityContext": {"runAsUser": 1000, "allowPrivilegeEscalation": False},
                }
            ]
        },
    }


def label(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda p: p["metadata"]["labels"].__setitem__(key, value)


def annotation(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda p: p["metadata"]["annotations"].__setitem__(key, value)


def init(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda p: p["spec"].setdefault("initContainers", []).append({"name": name, "image": "mesh:1"})


def sidecar(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda p: p["spec"]["containers"].append({"name": name, "image": "mesh:1"})


def nothing(_: dict[str, Any]) -> None:
    return None


# (case, change to the pod, extra namespace labels, namespace annotations, text the message must name)
CONFLICTS: list[tuple[str, Callable[[dict[str, Any]], None], dict[str, str], dict[str, str], str]] = [
    (
        "istio label",
        label("sidecar.istio.io/inject", "true"),
        {},
        {},
        'pod label sidecar.istio.io/inject: "true"',
    ),
    ("istio label yes", label("sidecar.istio.io/inject", "Yes"), {}, {}, "sidecar.istio.io/inject"),
    ("istio label bool", label("sidecar.istio.io/inject", True), {}, {}, "sidecar.istio.io/inject"),
    (
        "istio annotation",
        annotation("sidecar.istio.io/inject", "true"),
        {},
        {},
        "pod annotation sidecar.istio",
    ),
    ("istio pod revision", label("istio.io/rev", "canary"), {}, {}, "pod label istio.io/rev=canary"),
    (
        "istio namespace",
        nothing,
        {"istio-injection": "enabled"},
        {},
        "namespace label istio-injection=enabled",
    ),
    ("istio revision", nothing, {"istio.io/rev": "1-27"}, {}, "namespace label istio.io/rev=1-27"),
    (
        "ambient namespace",
        nothing,
        {"istio.io/dataplane-mode": "ambient"},
        {},
        "istio.io/dataplane-mode=ambient",
    ),
    ("ambient pod", label("istio.io/dataplane-mode", "ambient"), {}, {}, "pod label istio.io/dataplane-mode"),
    (
        "ambient cni",
        annotation("ambient.istio.io/redirection", "enabled"),
        {},
        {},
        "ambient.istio.io/redirection",
    ),
    (
        "istio status",
        annotation("sidecar.istio.io/status", "{}"),
        {},
        {},
        "annotation sidecar.istio.io/status",
    ),
    ("istio proxy", sidecar("istio-proxy"), {}, {}, "container istio-proxy"),
    ("istio native proxy", init("istio-proxy"), {}, {}, "container istio-proxy"),
    ("istio-init alone", init("istio-init"), {}, {}, "spec.initContainers has istio-init"),
    ("istio-validation", init("istio-validation"), {}, {}, "spec.initContainers has istio-validation"),
    (
        "linkerd annotation",
        annotation("linkerd.io/inject", "enabled"),
        {},
        {},
        "pod annotation linkerd.io/inject",
    ),
    ("linkerd ingress", annotation("linkerd.io/inject", "ingress"), {}, {}, "linkerd.io/inject: ingress"),
    (
        "linkerd namespace",
        nothing,
        {},
        {"linkerd.io/inject": "enabled"},
        "namespace annotation linkerd.io/inject",
    ),
    ("linkerd proxy", sidecar("linkerd-proxy"), {}, {}, "container linkerd-proxy"),
    ("linkerd version", annotation("linkerd.io/proxy-version", "edge"), {}, {}, "linkerd.io/proxy-version"),
    ("linkerd-init alone", init("linkerd-init"), {}, {}, "spec.initContainers has linkerd-init"),
    ("linkerd cni validator", init("linkerd-network-validator"), {}, {}, "linkerd-network-validator"),
]

# another mesh is around, but this pod is not captured by it: Outrider injects
NO_CONFLICT: list[tuple[str, Callable[[dict[str, Any]], None], dict[str, str], dict[str, str]]] = [
    ("istio opt-out label", label("sidecar.istio.io/inject", "false"), {"istio-injection": "enabled"}, {}),
    ("istio opt-out annotation", annotation("sidecar.istio.io/inject", "false"), {"istio.io/rev": "x"}, {}),
    ("istio other value", label("sidecar.istio.io/inject", "maybe"), {"istio-injection": "enabled"}, {}),
    ("revision but disabled", nothing, {"istio.io/rev": "x", "istio-injection": "disabled"}, {}),
    ("ambient opt-out", label("istio.io/dataplane-mode", "none"), {"istio.io/dataplane-mode": "ambient"}, {}),
    ("linkerd disabled", annotation("linkerd.io/inject", "disabled"), {}, {"linkerd.io/inject": "enabled"}),
    ("linkerd ns disabled", nothing, {}, {"linkerd.io/inject": "disabled"}),
    ("istio label as namespace annotation", nothing, {}, {"istio-injection": "enabled"}),
    ("unrelated istio settings", annotation("traffic.sidecar.istio.io/excludeOutboundPorts", "1"), {}, {}),
]


@pytest.mark.parametrize(("case", "change", "ns_labels", "ns_annotations", "named"), CONFLICTS)
def test_other_mesh_is_warned_when_enabled_refused_when_strict(
    case: str,
    change: Callable[[dict[str, Any]], None],
    ns_labels: dict[str, str],
    ns_annotations: dict[str, str],
    named: str,
) -> None:
    subject = pod()
    change(subject)
    enabled = engine.inject(
        copy.deepcopy(subject),
        {**ENABLED, **ns_labels},
        WebhookConfig(),
        namespace_annotations=ns_annotations,
    )
    assert enabled.allowed and not enabled.injected and enabled.patch == []
    [warning] = [w for w in enabled.warnings if "two traffic-capturing proxies" in w]
    assert named in warning and "does not inject it" in warning
    strict = engine.inject(
        copy.deepcopy(subject), {**STRICT, **ns_labels}, WebhookConfig(), namespace_annotations=ns_annotations
    )
    assert not strict.allowed
    assert named in (strict.message or "") and "outrider.dev/inject=strict" in (strict.message or "")


@pytest.mark.parametrize(("case", "change", "ns_labels", "ns_annotations"), NO_CONFLICT)
def test_pods_out_of_the_other_mesh_are_injected(
    case: str,
    change: Callable[[dict[str, Any]], None],
    ns_labels: dict[str, str],
    ns_annotations: dict[str, str],
) -> None:
    subject = pod()
    change(subject)
    assert meshes.conflict(subject["metadata"], subject["spec"], ns_labels, ns_annotations) is None
    for mode in (ENABLED, STRICT):
        result = engine.inject(
            copy.deepcopy(subject),
            {**mode, **ns_labels},
            WebhookConfig(),
            namespace_annotations=ns_annotations,
        )
        assert result.allowed and result.injected, (mode, result.message)


def test_odd_shapes_never_crash() -> None:
    for metadata in ({}, {"labels": None, "annotations": []}, {"labels": {"sidecar.istio.io/inject": 1}}):
        for spec in ({}, {"initContainers": [None, 3, {"name": 5}]}, {"containers": "x"}):
            assert (
                meshes.conflict(metadata, spec, {"istio.io/rev": ""}, {"linkerd.io/inject": None}) is not None
            )


def test_the_webhook_server_reads_namespace_labels_and_annotations(cert_dir: Path) -> None:
    facts = StaticNamespaces(
        namespace_labels={
            "istio-strict": {**STRICT, "istio-injection": "enabled"},
            "linkerd-strict": STRICT,
            "linkerd-enabled": ENABLED,
            "plain-strict": STRICT,
        },
        namespace_annotations={
            "linkerd-strict": {"linkerd.io/inject": "enabled"},
            "linkerd-enabled": {"linkerd.io/inject": "enabled"},
        },
    )
    server = ThreadedWebhook(cert_dir, namespaces=facts)
    answers: dict[str, Any] = {}
    try:
        # the same pod object in each namespace: the answer cache must keep them apart
        for namespace in ("istio-strict", "linkerd-strict", "linkerd-enabled", "plain-strict"):
            status, body, _ = server.request(
                "POST", "/mutate", json.dumps(review(pod(), namespace=namespace)).encode()
            )
            assert status == 200
            answers[namespace] = json.loads(body)["response"]
    finally:
        server.close()
    assert answers["istio-strict"]["allowed"] is False
    assert "namespace label istio-injection=enabled" in answers["istio-strict"]["status"]["message"]
    assert answers["linkerd-strict"]["allowed"] is False
    assert "namespace annotation linkerd.io/inject: enabled" in answers["linkerd-strict"]["status"]["message"]
    enabled = answers["linkerd-enabled"]
    assert enabled["allowed"] is True and "patch" not in enabled
    assert any("linkerd.io/inject" in w for w in enabled["warnings"])
    assert answers["plain-strict"]["allowed"] is True and "patch" in answers["plain-strict"]
