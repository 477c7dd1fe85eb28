"""What an injection writes into the pod, pinned where mutation testing found it unchecked (issue 17).

Each test runs `engine.inject()` on a pod and reads the patched pod: the probes the sidecar forwards to
the app, the app's lifecycle, the stop delay and the refusal text when the sidecar would refuse.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import jsonpatch

from outrider.webhook import annotations as ann
from outrider.webhook import engine
from outrider.webhook.config import WebhookConfig, parse_config

ENABLED = {"outrider.dev/inject": "enabled"}


def _pod(app: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    container = {"name": "app", "image": "x", "ports": [{"containerPort": 8080}], **(app or {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"containers": [container], **spec},
    }


def _injected(pod: dict[str, Any], config: WebhookConfig | None = None) -> dict[str, Any]:
    result = engine.inject(pod, ENABLED, config or WebhookConfig())
    assert result.allowed and result.injected, result
    patched = jsonpatch.apply_patch(pod, result.patch)
    assert patched == result.pod  # the patch says exactly what the pod shows
    return patched  # type: ignore[no-any-return]


def _proxy(pod: dict[str, Any]) -> dict[str, Any]:
    every = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
    return next(c for c in every if c["name"] == "outrider-proxy")


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _app(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "app")


def test_probes_on_the_mcp_port_keep_their_scheme_path_and_string_port() -> None:
    # An HTTPS probe forwarded as HTTP (or to "/" instead of its path) fails on a healthy app, and a
    # port written as a string ("8080", what Helm charts often render) must be recognised as the MCP port.
    app = {
        "livenessProbe": {
            "httpGet": {"port": "8080", "path": "/live", "scheme": "HTTPS"},
            "timeoutSeconds": 3,
        },
        "readinessProbe": {"httpGet": {"port": 8080}},
        "startupProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
    }
    pod = _injected(_pod(app))
    probes = json.loads(_env(_proxy(pod))["OUTRIDER_APP_PROBES"])
    assert probes == {
        "/app-health/app/livez": {
            "httpGet": {"path": "/live", "port": 8080, "scheme": "HTTPS"},
            "timeoutSeconds": 3,
        },
        "/app-health/app/readyz": {"httpGet": {"path": "/", "port": 8080, "scheme": "HTTP"}},
        "/app-health/app/startupz": {"tcpSocket": {"port": 8080}},
    }
    admin = {"port": ann.ADMIN_PORT, "scheme": "HTTP"}
    assert _app(pod)["livenessProbe"] == {
        "httpGet": {"path": "/app-health/app/livez", **admin},
        "timeoutSeconds": 3,
    }
    assert _app(pod)["readinessProbe"] == {"httpGet": {"path": "/app-health/app/readyz", **admin}}
    assert _app(pod)["startupProbe"] == {
        "httpGet": {"path": "/app-health/app/startupz", **admin},
        "periodSeconds": 1,
    }


def test_a_probe_on_another_port_is_left_alone() -> None:
    app = {
        "ports": [{"containerPort": 8080}, {"containerPort": 9090}],
        "livenessProbe": {"httpGet": {"port": "9090"}},
    }
    pod = _injected(_pod(app), WebhookConfig())
    assert "OUTRIDER_APP_PROBES" not in _env(_proxy(pod))
    assert _app(pod)["livenessProbe"] == {"httpGet": {"port": "9090"}}


def test_the_apps_own_lifecycle_is_kept_beside_the_stop_sleep() -> None:
    post_start = {"exec": {"command": ["/bin/warm-up"]}}
    pod = _injected(_pod({"lifecycle": {"postStart": post_start}}))
    assert _app(pod)["lifecycle"] == {"postStart": post_start, "preStop": {"sleep": {"seconds": 5}}}


def test_an_app_with_its_own_pre_stop_gets_no_sleep_and_none_is_recorded() -> None:
    own = {"preStop": {"exec": {"command": ["/bin/drain"]}}}
    config = parse_config({"native_sidecar": False})
    pod = _injected(_pod({"lifecycle": own}), config)
    assert _app(pod)["lifecycle"] == own
    assert "lifecycle" not in _proxy(pod)
    assert "appStopDelaySeconds" not in json.loads(pod["metadata"]["annotations"][ann.STATUS])


def test_the_stop_delay_leaves_two_seconds_of_the_grace_period() -> None:
    config = parse_config({"app_stop_delay_seconds": 60})
    # no terminationGracePeriodSeconds: the Kubernetes default of 30 s
    assert _app(_injected(_pod(), config))["lifecycle"] == {"preStop": {"sleep": {"seconds": 28}}}
    short = _injected(_pod(terminationGracePeriodSeconds=10), config)
    assert _app(short)["lifecycle"] == {"preStop": {"sleep": {"seconds": 8}}}
    assert "lifecycle" not in _app(_injected(_pod(terminationGracePeriodSeconds=2), config))


def test_the_refusal_when_the_sidecar_would_refuse_its_config_in_full() -> None:
    config = WebhookConfig(sidecar=MappingProxyType({"inbound": MappingProxyType({"isuer": "https://idp"})}))
    result = engine.inject(_pod(), ENABLED, config)
    assert not result.allowed and not result.injected and not result.patch
    message = str(result.message)
    assert message.startswith(
        "the outrider-proxy sidecar would refuse this pod's configuration (OUTRIDER_CONFIG): "
        "inbound: unknown key(s) ['isuer']; allowed: ['algorithms', "
    )
    assert message.endswith(
        "]; fix the pod's outrider.dev/* annotations or ask the operator to fix the webhook config"
    )
