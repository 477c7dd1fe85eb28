"""An MCP server run as a native sidecar (an init container with restartPolicy Always), and probes with
an explicit host: what the engine treats as the MCP server and which probes it rewrites.

Every test runs `engine.inject()` and applies its JSON patch with the `jsonpatch` library to the
original pod, so the init-container indexes (shifted by the containers the webhook inserts) are checked.
"""

from __future__ import annotations

import json
from typing import Any

import jsonpatch
import pytest

from outrider.webhook import annotations as ann
from outrider.webhook import engine, patch
from outrider.webhook.config import WebhookConfig, parse_config

ENABLED = {"outrider.dev/inject": "enabled"}
STRICT = {"outrider.dev/inject": "strict"}
CLASSIC = parse_config({"native_sidecar": False})
SAFE = {"runAsUser": 1000, "runAsNonRoot": True, "allowPrivilegeEscalation": False}
ADMIN = {"port": ann.ADMIN_PORT, "scheme": "HTTP"}
PROBES = {
    "startupProbe": {"httpGet": {"path": "/start", "port": 8080}, "periodSeconds": 1},
    "livenessProbe": {"tcpSocket": {"port": "mcp"}},
    "readinessProbe": {"httpGet": {"path": "/ready", "port": "mcp"}, "timeoutSeconds": 2},
}


def _pod(annotations: dict[str, str] | None = None, app_ports: bool = False) -> dict[str, Any]:
    """A pod whose MCP server (port 8080, named mcp) is a native sidecar behind an ordinary init."""
    app: dict[str, Any] = {"name": "app", "image": "app", "securityContext": dict(SAFE)}
    if app_ports:
        app["ports"] = [{"name": "metrics", "containerPort": 9090}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "annotations": dict(annotations or {})},
        "spec": {
            "initContainers": [
                {"name": "migrate", "image": "migrate", "securityContext": dict(SAFE)},
                {
                    "name": "mcp",
                    "image": "mcp",
                    "restartPolicy": "Always",
                    "securityContext": dict(SAFE),
                    "ports": [{"name": "mcp", "containerPort": 8080}],
                    **json.loads(json.dumps(PROBES)),
                },
            ],
            "containers": [app],
        },
    }


def _injected(pod: dict[str, Any], config: WebhookConfig | None = None) -> tuple[dict[str, Any], Any]:
    result = engine.inject(pod, ENABLED, config or WebhookConfig())
    assert result.allowed and result.injected, result
    patched = jsonpatch.apply_patch(pod, result.patch)
    assert patched == result.pod  # the patch, applied in order, gives exactly the pod the engine built
    assert result.patch == patch.diff(pod, result.pod)  # and is the generic diff, op for op
    return patched, result


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    every = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
    return next(c for c in every if c["name"] == name)


def _app_probes(pod: dict[str, Any]) -> Any:
    env = {e["name"]: e.get("value") for e in _container(pod, "outrider-proxy")["env"]}
    return json.loads(env["OUTRIDER_APP_PROBES"])


REWRITTEN = {
    "startupProbe": {"httpGet": {"path": "/app-health/mcp/startupz", **ADMIN}, "periodSeconds": 1},
    "livenessProbe": {"httpGet": {"path": "/app-health/mcp/livez", **ADMIN}},
    "readinessProbe": {"httpGet": {"path": "/app-health/mcp/readyz", **ADMIN}, "timeoutSeconds": 2},
}
ORIGINALS = {
    "/app-health/mcp/startupz": {"httpGet": {"path": "/start", "port": 8080, "scheme": "HTTP"}},
    "/app-health/mcp/livez": {"tcpSocket": {"port": 8080}},
    "/app-health/mcp/readyz": {
        "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
        "timeoutSeconds": 2,
    },
}


@pytest.mark.parametrize(
    ("config", "order"),
    [
        (WebhookConfig(), ["outrider-init", "outrider-proxy", "migrate", "mcp"]),
        (CLASSIC, ["migrate", "mcp", "outrider-init"]),
    ],
    ids=["native-layout", "classic-layout"],
)
@pytest.mark.parametrize("annotation", [None, "8080", "mcp"], ids=["found", "by-number", "by-name"])
def test_a_native_sidecar_mcp_server_is_proxied_and_its_probes_rewritten(
    config: WebhookConfig, order: list[str], annotation: str | None
) -> None:
    # Its port is the MCP port (found, or named, among native sidecars too) and its kubelet probes on
    # it go to the admin port like an app container's: else the proxy answers them 401, never ready.
    pod, result = _injected(_pod({ann.MCP_PORT: annotation} if annotation else None), config)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == order
    status = json.loads(pod["metadata"]["annotations"][ann.STATUS])
    assert status["mcpPort"] == 8080
    assert _container(pod, "outrider-init")["args"][-2:] == ["--inbound-ports", "8080"]
    mcp = _container(pod, "mcp")
    assert {k: mcp[k] for k in PROBES} == REWRITTEN
    assert _app_probes(pod) == ORIGINALS
    # patched where the container sits after the webhook's own inserts
    index = order.index("mcp")
    paths = [op["path"] for op in result.patch]
    for kind in PROBES:
        assert any(p.startswith(f"/spec/initContainers/{index}/{kind}") for p in paths), paths
    # the app container (no MCP port) and the ordinary init container are untouched
    assert _container(pod, "migrate") == _pod()["spec"]["initContainers"][0]
    assert "livenessProbe" not in _container(pod, "app")
    assert not any(w.startswith("no MCP port found") for w in result.warnings), result.warnings


def test_app_containers_come_before_native_sidecars_when_finding_the_port() -> None:
    # an app container's port stays the MCP port (as before native sidecars were searched) and the
    # sidecar's probes on another port are left alone
    pod, _ = _injected(_pod(app_ports=True))
    assert json.loads(pod["metadata"]["annotations"][ann.STATUS])["mcpPort"] == 9090
    assert {k: _container(pod, "mcp")[k] for k in PROBES} == PROBES


def test_a_named_port_of_a_run_to_completion_init_container_is_refused() -> None:
    # an ordinary init container has exited before the pod serves: it is never the MCP server
    pod = _pod({ann.MCP_PORT: "job"})
    pod["spec"]["initContainers"][0]["ports"] = [{"name": "job", "containerPort": 7070}]
    result = engine.inject(pod, ENABLED, WebhookConfig())
    assert not result.allowed
    assert result.message == (
        "annotation outrider.dev/mcp-port='job' names no TCP containerPort of an app container; "
        "allowed: a port number or one of ['mcp']"
    )


def test_a_run_to_completion_init_containers_port_is_not_the_mcp_port() -> None:
    pod = _pod()
    pod["spec"]["initContainers"] = [
        {"name": "migrate", "image": "migrate", "ports": [{"containerPort": 7070}]},
        {"name": "later", "image": "later", "restartPolicy": "Never", "ports": [{"containerPort": 7071}]},
    ]
    pod_out, result = _injected(pod)
    assert json.loads(pod_out["metadata"]["annotations"][ann.STATUS])["mcpPort"] is None
    assert any(w.startswith("no MCP port found") for w in result.warnings)


def test_strict_skips_a_genuine_injection_of_a_native_sidecar_mcp_server() -> None:
    # the re-admission check finds the MCP port as the injection did, without the webhook's own
    # native sidecar (which declares the proxy's ports) in the way
    first = engine.inject(_pod(), STRICT, WebhookConfig())
    assert first.injected, first
    again = engine.inject(json.loads(json.dumps(first.pod)), STRICT, WebhookConfig())
    assert again.allowed and not again.injected and again.patch == [], again
    assert again.skipped is not None and again.skipped.startswith("pod already injected")


@pytest.mark.parametrize(
    "handler",
    [
        {"httpGet": {"host": "10.0.0.7", "path": "/ready", "port": 8080}},
        {"tcpSocket": {"host": "db.example", "port": 8080}},
    ],
    ids=["httpGet", "tcpSocket"],
)
def test_a_probe_with_its_own_host_is_left_alone(handler: dict[str, Any]) -> None:
    # The kubelet connects to that host, not to the pod's IP, so the capture never sees the probe; a
    # rewrite would replay it against 127.0.0.1 and check another server than the one written.
    app = {
        "name": "app",
        "image": "app",
        "ports": [{"containerPort": 8080}],
        "readinessProbe": handler,
        "livenessProbe": {"httpGet": {"host": "", "path": "/live", "port": 8080}},
    }
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [app]}}
    out, _ = _injected(pod)
    assert _container(out, "app")["readinessProbe"] == handler
    # an empty host is the pod's IP (the kubelet's default): rewritten as before
    assert _container(out, "app")["livenessProbe"] == {"httpGet": {"path": "/app-health/app/livez", **ADMIN}}
    assert _app_probes(out) == {
        "/app-health/app/livez": {"httpGet": {"path": "/live", "port": 8080, "scheme": "HTTP"}}
    }


def test_only_named_native_sidecars_among_init_containers_have_their_probes_rewritten() -> None:
    # The API server refuses probes on a run-to-completion init container and an unnamed container,
    # but only after mutating admission: the engine sees them, leaves them alone and does not fail.
    probe = {"httpGet": {"path": "/ready", "port": 8080}}
    pod = _pod()
    pod["spec"]["initContainers"] = [
        {"name": "migrate", "image": "migrate", "readinessProbe": dict(probe)},
        {"image": "unnamed", "restartPolicy": "Always", "readinessProbe": dict(probe)},
    ]
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 8080}]
    result = engine.inject(pod, ENABLED, WebhookConfig())
    assert result.injected, result
    inits = result.pod["spec"]["initContainers"]
    assert inits[2:] == pod["spec"]["initContainers"]
    assert not any(op["path"].startswith("/spec/initContainers/2") for op in result.patch)
    assert not any(op["path"].startswith("/spec/initContainers/3") for op in result.patch)


@pytest.mark.parametrize("annotation", [None, "mcp"], ids=["found", "by-name"])
def test_the_app_container_serving_the_port_is_the_default_container(annotation: str | None) -> None:
    # found or named in the second app container: that one, not the first, gets the annotation
    # (and the preStop sleep); with the port in a native sidecar, that sidecar gets the annotation
    # and the first app container the preStop sleep
    pod = _pod({ann.MCP_PORT: annotation} if annotation else None)
    pod["spec"]["containers"] = [
        {"name": "helper", "image": "helper"},
        {"name": "server", "image": "server", "ports": [{"name": "mcp", "containerPort": 8081}]},
    ]
    out, _ = _injected(pod)
    assert out["metadata"]["annotations"][ann.DEFAULT_CONTAINER] == "server"
    assert "lifecycle" not in _container(out, "helper")
    assert _container(out, "server")["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    del pod["spec"]["containers"][1]["ports"]
    out, _ = _injected(pod)
    assert json.loads(out["metadata"]["annotations"][ann.STATUS])["mcpPort"] == 8080
    assert out["metadata"]["annotations"][ann.DEFAULT_CONTAINER] == "mcp"
    assert _container(out, "helper")["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}


@pytest.mark.parametrize(
    ("annotations", "app_ports", "default"),
    [
        (None, False, "mcp"),  # found: the only TCP port is the native sidecar's
        ({ann.MCP_PORT: "mcp"}, True, "mcp"),  # named, while the app container has a port of its own
        ({ann.MCP_PORT: "8080"}, True, "mcp"),  # its number
        ({ann.MCP_PORT: "9090"}, True, "app"),  # the app container's own port
        ({ann.MCP_PORT: "7000"}, False, "app"),  # a number nobody declares: the first app container
        # The pod's own choice is never overridden, whichever container it names.
        ({ann.MCP_PORT: "mcp", ann.DEFAULT_CONTAINER: "app"}, False, "app"),
        ({ann.DEFAULT_CONTAINER: "migrate"}, False, "migrate"),
    ],
)
def test_a_native_sidecar_serving_the_mcp_port_is_the_default_container(
    annotations: dict[str, str] | None, app_ports: bool, default: str
) -> None:
    """`kubectl logs/exec` without `-c` went to the first app container (`app`, here an indexer
    beside the server) even when the MCP server the pod exists for is a native sidecar; kubectl
    looks the annotation's name up among the init containers too, so it now names the server, as it
    does an app container that serves the port."""
    out, _ = _injected(_pod(annotations, app_ports))
    assert out["metadata"]["annotations"][ann.DEFAULT_CONTAINER] == default
    # The preStop sleep stays on the first app container: the native sidecar outlives it anyway.
    assert _container(out, "app")["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    assert "lifecycle" not in _container(out, "mcp")
