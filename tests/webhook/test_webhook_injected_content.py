"""What an injection writes into the pod, pinned where mutation testing found it unchecked (issue 17).

Each test runs `engine.inject()` on a pod and reads the patched pod: the probes the sidecar forwards to
the app, the app's lifecycle, the stop delay and the refusal text when the sidecar would refuse.
"""

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


def test_a_probe_naming_its_port_is_resolved_as_the_kubelet_does() -> None:
    # The kubelet looks a probe's named port up among the container's ports by name alone
    # (findPortByName), whatever the protocol declared there, and probes that number over TCP: a name
    # that lands on the MCP port goes through the capture and must be rewritten; an unknown name or
    # another port is left to the kubelet.
    app = {
        "ports": [
            {"containerPort": 8080},
            {"name": "mcp-udp", "containerPort": 8080, "protocol": "UDP"},
            {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
        ],
        "livenessProbe": {"httpGet": {"port": "mcp-udp", "path": "/live"}},
        "readinessProbe": {"tcpSocket": {"port": "metrics"}},
        "startupProbe": {"httpGet": {"port": "no-such-port"}},
    }
    pod = _injected(_pod(app))
    probes = json.loads(_env(_proxy(pod))["OUTRIDER_APP_PROBES"])
    assert probes == {"/app-health/app/livez": {"httpGet": {"path": "/live", "port": 8080, "scheme": "HTTP"}}}
    assert _app(pod)["livenessProbe"] == {
        "httpGet": {"path": "/app-health/app/livez", "port": ann.ADMIN_PORT, "scheme": "HTTP"}
    }
    assert _app(pod)["readinessProbe"] == {"tcpSocket": {"port": "metrics"}}
    assert _app(pod)["startupProbe"] == {"httpGet": {"port": "no-such-port"}}


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


# --- strict namespaces: a pod carrying the status annotation is skipped only if it is a fresh injection

STRICT = {"outrider.dev/inject": "strict"}
SAFE = {"runAsUser": 1000, "runAsNonRoot": True, "allowPrivilegeEscalation": False}
AUDIENCES = parse_config({"token_audiences": ["https://a.example", "https://b.example"]})
NARROWING = {"allow": ["api.github.com:443"]}
FORBID = "forbid(principal, action, resource);"


def _safe_pod(annotations: dict[str, str] | None = None, ports: tuple[int, ...] = (8080,)) -> dict[str, Any]:
    pod = _pod({"securityContext": dict(SAFE), "ports": [{"containerPort": p} for p in ports]})
    pod["metadata"]["annotations"] = dict(annotations or {})
    return pod


def _admitted_twice(
    pod: dict[str, Any],
    labels: dict[str, str],
    config: WebhookConfig,
    namespace_policy: dict[str, Any] | None = None,
    then: dict[str, str] | None = None,
) -> engine.InjectionResult:
    """Inject `pod`, optionally change its annotations (`then`), and admit the result again."""
    first = engine.inject(pod, labels, config, namespace_policy)
    assert first.injected, first
    again = json.loads(json.dumps(first.pod))
    again["metadata"]["annotations"].update(then or {})
    return engine.inject(again, labels, config, namespace_policy)


def _skipped(result: engine.InjectionResult) -> bool:
    return result.allowed and not result.injected and result.patch == [] and result.skipped is not None


def test_strict_skips_a_genuine_injection_in_explicit_egress_mode() -> None:
    # no capture init container: the status names the sidecar alone
    labels = {**STRICT, "outrider.dev/egress-mode": "explicit"}
    assert _skipped(_admitted_twice(_safe_pod(), labels, WebhookConfig()))


def test_strict_checks_the_namespaces_egress_narrowing() -> None:
    config = parse_config({"egress_default_policy": {"allow": ["api.github.com:443", "x.example:443"]}})
    assert _skipped(_admitted_twice(_safe_pod(), STRICT, config, NARROWING))
    # injected where no narrowing applied, then admitted where it does: wider than this namespace allows
    forged = engine.inject(_safe_pod(), STRICT, config).pod
    result = engine.inject(json.loads(json.dumps(forged)), STRICT, config, NARROWING)
    assert not result.allowed and "outrider-proxy is not the sidecar this webhook injects" in str(
        result.message
    )


def test_strict_checks_the_pods_mcp_policy() -> None:
    assert _skipped(_admitted_twice(_safe_pod({ann.POLICY: FORBID}), STRICT, WebhookConfig()))
    # the policy annotation added after injection: the sidecar was started without the forbid
    result = _admitted_twice(_safe_pod(), STRICT, WebhookConfig(), then={ann.POLICY: FORBID})
    assert not result.allowed and "is not the sidecar this webhook injects" in str(result.message)


def test_strict_checks_the_token_audience() -> None:
    picked = {ann.TOKEN_AUDIENCE: "https://b.example"}
    assert _skipped(_admitted_twice(_safe_pod(picked), STRICT, AUDIENCES))
    other = {ann.TOKEN_AUDIENCE: "https://a.example"}
    result = _admitted_twice(_safe_pod(other), STRICT, AUDIENCES, then=picked)
    assert not result.allowed and "is not the sidecar this webhook injects" in str(result.message)


def test_strict_checks_the_annotated_mcp_port() -> None:
    pod = _safe_pod({ann.MCP_PORT: "9090"}, ports=(8080, 9090))
    assert _skipped(_admitted_twice(pod, STRICT, WebhookConfig()))
    result = _admitted_twice(pod, STRICT, WebhookConfig(), then={ann.MCP_PORT: "8080"})
    assert not result.allowed and "it records MCP port 9090 but the pod's MCP port is 8080" in str(
        result.message
    )


RESOURCE_TEMPLATE = parse_config(
    {
        "sidecar": {"inbound": {"issuer": "https://idp.example/realms/mcp"}},
        "resource_template": "https://{namespace}.mcp.example.com/mcp",
    }
)


def test_strict_skips_a_genuine_injection_without_an_mcp_port_but_with_a_resource() -> None:
    pod = _safe_pod()
    del pod["spec"]["containers"][0]["ports"]
    result = _admitted_twice(pod, STRICT, RESOURCE_TEMPLATE)
    assert _skipped(result), result.message


def test_strict_names_a_pod_without_a_namespace_after_the_default_namespace() -> None:
    # a pod created without metadata.namespace (and no request namespace) lands in "default"
    pod = _safe_pod()
    del pod["metadata"]["namespace"]
    first = engine.inject(pod, STRICT, RESOURCE_TEMPLATE)
    status = json.loads(first.pod["metadata"]["annotations"][ann.STATUS])
    assert status["resource"] == "https://default.mcp.example.com/mcp"
    assert _skipped(_admitted_twice(pod, STRICT, RESOURCE_TEMPLATE)), first


def test_strict_skips_a_genuine_injection_of_a_pod_with_two_ports() -> None:
    # no annotation: the webhook picks the first port (with a warning) both times
    assert _skipped(_admitted_twice(_safe_pod(ports=(8080, 9090)), STRICT, WebhookConfig()))


def _readmitted(change: Any) -> str:
    pod = json.loads(json.dumps(engine.inject(_safe_pod(), STRICT, WebhookConfig()).pod))
    change(pod)
    result = engine.inject(pod, STRICT, WebhookConfig())
    assert not result.allowed and not result.patch
    return str(result.message)


def _set_status(pod: dict[str, Any], value: Any) -> None:
    pod["metadata"]["annotations"][ann.STATUS] = value if isinstance(value, str) else json.dumps(value)


def test_strict_refusals_of_a_forged_injection_in_full() -> None:
    status = json.loads(
        engine.inject(_safe_pod(), STRICT, WebhookConfig()).pod["metadata"]["annotations"][ann.STATUS]
    )
    assert (
        _readmitted(lambda p: _set_status(p, "{")).count("but its value is not the JSON Outrider writes; ")
        == 1
    )
    assert (
        _readmitted(lambda p: _set_status(p, [])).count("but its value is not the JSON Outrider writes; ")
        == 1
    )
    gone = {**status, "initContainers": ["outrider-init", "gone", "lost"]}
    assert (
        _readmitted(lambda p: _set_status(p, gone)).count(
            "but the containers it names are missing (gone, lost); "
        )
        == 1
    )
    assert (
        _readmitted(lambda p: p["spec"]["initContainers"][0].__setitem__("image", "busybox")).count(
            "but its traffic-capture init container is missing or not the one this webhook injects; "
        )
        == 1
    )


def test_strict_refuses_an_injected_pod_whose_app_runs_as_root() -> None:
    # what strict refuses in any pod is refused in one carrying the status annotation too
    def root(pod: dict[str, Any]) -> None:
        pod["spec"]["containers"][0]["securityContext"] = {"runAsUser": 0}

    assert "says the pod is injected but spec.containers[0] (app).securityContext" in _readmitted(root)


# --- outcomes: what is skipped, what is refused, and what the status names


def test_windows_pods_are_skipped_and_refused_in_strict() -> None:
    for spec in ({"os": {"name": "windows"}}, {"nodeSelector": {"kubernetes.io/os": "windows"}}):
        skipped = engine.inject(_pod(**spec), ENABLED, WebhookConfig())
        assert skipped.allowed and not skipped.injected and not skipped.patch
        assert skipped.skipped == (
            "spec.os.name (or spec.nodeSelector[kubernetes.io/os]) is windows: the Outrider sidecar runs "
            "on Linux only; not injected"
        )
        refused = engine.inject(
            _safe_pod() | {"spec": {**_safe_pod()["spec"], **spec}}, STRICT, WebhookConfig()
        )
        assert not refused.allowed and not refused.patch
        assert refused.message == (
            "spec.os.name (or spec.nodeSelector[kubernetes.io/os]): windows pods cannot run the Outrider "
            "sidecar; run the MCP server on Linux nodes (namespace is outrider.dev/inject=strict)"
        )
    linux = engine.inject(
        _pod(os={"name": "linux"}, nodeSelector={"kubernetes.io/os": "linux"}), ENABLED, WebhookConfig()
    )
    assert linux.injected


def test_pods_without_containers_or_names_are_refused_in_full() -> None:
    empty = engine.inject(_pod() | {"spec": {"containers": []}}, ENABLED, WebhookConfig())
    assert not empty.allowed and not empty.patch
    assert empty.message == "spec.containers: the pod has no containers; nothing to inject into"
    unnamed = engine.inject(_pod() | {"spec": {"containers": [{"image": "x"}]}}, ENABLED, WebhookConfig())
    assert not unnamed.allowed and not unnamed.patch
    assert unnamed.message == "spec.containers: every container must be an object with a name"


SA_TEMPLATE = parse_config(
    {
        "sidecar": {"inbound": {"issuer": "https://idp.example/realms/mcp"}},
        "resource_template": "https://{service_account}.{namespace}.mcp.example.com/mcp",
    }
)


def test_the_service_account_falls_back_to_the_legacy_field_then_default() -> None:
    def status(**spec: Any) -> dict[str, Any]:
        pod = _injected(_pod(**spec), SA_TEMPLATE)
        return json.loads(pod["metadata"]["annotations"][ann.STATUS])  # type: ignore[no-any-return]

    legacy = status(serviceAccount="legacy-sa")
    assert legacy["resource"] == "https://legacy-sa.ns.mcp.example.com/mcp"
    assert legacy["spiffeId"].endswith("/ns/ns/sa/legacy-sa")
    plain = status()
    assert plain["resource"] == "https://default.ns.mcp.example.com/mcp"
    assert plain["spiffeId"].endswith("/ns/ns/sa/default")


def test_strict_uses_the_requests_namespace_for_a_pod_without_one() -> None:
    pod = _safe_pod()
    del pod["metadata"]["namespace"]
    first = engine.inject(pod, STRICT, RESOURCE_TEMPLATE, namespace="tools")
    assert json.loads(first.pod["metadata"]["annotations"][ann.STATUS])["resource"] == (
        "https://tools.mcp.example.com/mcp"
    )
    again = engine.inject(json.loads(json.dumps(first.pod)), STRICT, RESOURCE_TEMPLATE, namespace="tools")
    assert _skipped(again), again.message


def test_each_pods_mcp_policy_reaches_its_own_sidecar() -> None:
    # pods with the same egress inputs share one cached plan; their OUTRIDER_CONFIG must not be shared
    def policy(annotations: dict[str, str]) -> Any:
        pod = _injected(_safe_pod(annotations))
        return json.loads(_env(_proxy(pod))["OUTRIDER_CONFIG"]).get("policy")

    none = policy({})
    one = policy({ann.POLICY: FORBID})
    other = policy({ann.POLICY: "forbid(principal, action, resource) unless { false };"})
    assert none != one != other != none
    assert FORBID in json.dumps(one)
    assert policy({}) == none and policy({ann.POLICY: FORBID}) == one


def test_a_config_built_in_code_with_a_bad_section_is_refused_per_pod() -> None:
    # parse_config refuses these at load; a config built in code (or by an older webhook) is still
    # checked per pod, every section, not only the per-pod `inbound` one
    for sidecar, said in (
        ({"exchange": MappingProxyType({"cache_size": "many"})}, "exchange"),
        ({"telemetry": "nope"}, "telemetry"),
    ):
        config = WebhookConfig(sidecar=MappingProxyType(sidecar))
        for _ in range(2):  # the second answer comes from the cache
            result = engine.inject(_pod(), ENABLED, config)
            assert not result.allowed and not result.patch
            message = str(result.message)
            assert message.startswith("the outrider-proxy sidecar would refuse this pod's configuration"), (
                message
            )
            assert said in message


# --- found by the fifth mutation session: outcomes no test pinned


def test_an_app_mounting_the_operators_own_spiffe_csi_volume_is_refused_in_strict() -> None:
    # an operator whose SPIFFE CSI driver is not csi.spiffe.io: the app mounting that volume could take
    # the pod's SVID and act as the sidecar; refused for the driver the config names, not the default
    config = parse_config({"spiffe_csi_driver": "csi.example.org"})
    pod = _safe_pod()
    pod["spec"]["volumes"] = [{"name": "svid", "csi": {"driver": "csi.example.org", "readOnly": True}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "svid", "mountPath": "/svid"}]
    refused = engine.inject(pod, STRICT, config)
    assert not refused.allowed and not refused.patch
    assert "spec.containers[0] (app).volumeMounts[0] mounts svid, a SPIFFE Workload API volume" in str(
        refused.message
    )
    # the same volume of another driver is an ordinary mount
    pod["spec"]["volumes"][0]["csi"]["driver"] = "csi.spiffe.io"
    assert engine.inject(pod, STRICT, config).injected


def test_a_refusal_keeps_the_warnings_found_before_it() -> None:
    # the AdmissionReview deny carries the warnings too: kubectl shows why beside the refusal
    from outrider.webhook import admission

    pod = _safe_pod({"outrider.dev/typo": "x"}, ports=(15001,))
    result = engine.inject(pod, STRICT, WebhookConfig())
    assert not result.allowed
    unknown = "annotation outrider.dev/typo is not an Outrider annotation this version knows; ignored"
    assert result.warnings == (unknown,)
    response = admission.answer("uid-1", result)["response"]
    assert response["allowed"] is False and response["warnings"] == [unknown]
    assert response["status"]["message"] == result.message


CLASSIC = parse_config({"native_sidecar": False})


def test_strict_classic_layout_refuses_a_forged_mcp_port_that_is_the_sidecars_own() -> None:
    # In the classic layout outrider-proxy sits in spec.containers beside the app. A pod naming the
    # sidecar's own port as its MCP port (and forging the status, the config and the capture rules to
    # match) would have no inbound traffic proxied; only app containers may serve the MCP port.
    first = engine.inject(_safe_pod(), STRICT, CLASSIC)
    assert first.injected, first
    pod = json.loads(json.dumps(first.pod))
    proxy = next(c for c in pod["spec"]["containers"] if c["name"] == "outrider-proxy")
    port = next(p["containerPort"] for p in proxy["ports"] if p["name"] == engine.INBOUND_PORT_NAME)
    pod["metadata"]["annotations"][ann.MCP_PORT] = engine.INBOUND_PORT_NAME
    status = json.loads(pod["metadata"]["annotations"][ann.STATUS])
    pod["metadata"]["annotations"][ann.STATUS] = json.dumps({**status, "mcpPort": port})
    env = next(e for e in proxy["env"] if e["name"] == "OUTRIDER_CONFIG")
    config = json.loads(env["value"])
    config["inbound"]["mcp_port"] = port
    env["value"] = json.dumps(config)
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "outrider-init")
    init["args"] = [str(port) if a == "8080" else a for a in init["args"]]
    refused = engine.inject(pod, STRICT, CLASSIC)
    assert not refused.allowed and not refused.patch
    assert (
        f"but annotation {ann.MCP_PORT}='{engine.INBOUND_PORT_NAME}' names no TCP containerPort of an app "
        "container; allowed: a port number or one of the containers declare no named ports;"
    ) in str(refused.message)
    # the genuine classic injection is accepted as it is
    again = engine.inject(json.loads(json.dumps(first.pod)), STRICT, CLASSIC)
    assert _skipped(again), again.message


def test_strict_classic_layout_refuses_user_init_containers_in_full() -> None:
    pod = _safe_pod()
    pod["spec"]["initContainers"] = [{"name": "setup", "image": "x", "securityContext": dict(SAFE)}]
    refused = engine.inject(pod, STRICT, CLASSIC)
    assert not refused.allowed and not refused.patch
    assert refused.message == (
        "spec.initContainers[0] (setup) would run before outrider-init in the classic layout (webhook "
        "config native_sidecar: false), so its traffic is not captured; move its work into an app "
        "container or ask the operator for the native sidecar layout (namespace is labelled "
        "outrider.dev/inject=strict, which refuses pods that could escape the sidecar)"
    )
    assert engine.inject(pod, STRICT, WebhookConfig()).injected  # the native layout runs them captured


def test_strict_explicit_mode_names_the_forged_sidecar() -> None:
    # explicit egress mode: no capture init container, the status names the sidecar alone
    labels = {**STRICT, "outrider.dev/egress-mode": "explicit"}
    pod = json.loads(json.dumps(engine.inject(_safe_pod(), labels, WebhookConfig()).pod))
    _proxy(pod)["image"] = "registry.example/not-outrider:1"
    refused = engine.inject(pod, labels, WebhookConfig())
    assert not refused.allowed
    assert "but container outrider-proxy is not the sidecar this webhook injects;" in str(refused.message)


def test_strict_refusals_of_a_pod_whose_annotations_changed_after_injection_say_why() -> None:
    first = engine.inject(_safe_pod(), STRICT, RESOURCE_TEMPLATE)
    assert first.injected, first

    def readmitted(annotations: dict[str, str], **kwargs: Any) -> str:
        pod = json.loads(json.dumps(first.pod))
        pod["metadata"]["annotations"].update(annotations)
        result = engine.inject(pod, STRICT, RESOURCE_TEMPLATE, **kwargs)
        assert not result.allowed and not result.patch
        prefix = f"metadata.annotations[{ann.STATUS}] says the pod is injected but "
        message = str(result.message)
        assert message.startswith(prefix), message
        return message[len(prefix) :].split("; remove the Outrider containers")[0]

    assert readmitted({ann.MCP_PORT: "web"}) == (
        f"annotation {ann.MCP_PORT}='web' names no TCP containerPort of an app container; allowed: a "
        "port number or one of the containers declare no named ports"
    )
    wrong = "https://elsewhere.example/mcp"
    assert readmitted({ann.RESOURCE: wrong}).startswith(f"annotation {ann.RESOURCE}={wrong!r}")
    # a namespace egress policy the planner cannot read: refused, never a crash
    assert readmitted({}, namespace_policy=7) == "its egress plan cannot be checked"


def test_an_annotated_mcp_port_no_container_declares_is_served_by_the_first_container() -> None:
    for containers in (1, 2):
        pod = _pod()
        pod["spec"]["containers"] += [{"name": f"extra{i}", "image": "x"} for i in range(1, containers)]
        pod["metadata"]["annotations"] = {ann.MCP_PORT: "9000"}
        injected = _injected(pod)
        assert json.loads(injected["metadata"]["annotations"][ann.STATUS])["mcpPort"] == 9000
        assert injected["metadata"]["annotations"][ann.DEFAULT_CONTAINER] == "app"
        assert _app(injected)["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}


def test_a_port_entry_that_is_not_an_object_is_ignored_not_crashed_on() -> None:
    pod = _pod({"ports": ["8080", {"containerPort": 8080, "name": "web"}, None]})
    injected = _injected(pod)
    assert json.loads(injected["metadata"]["annotations"][ann.STATUS])["mcpPort"] == 8080


def test_a_mapping_that_is_not_a_dict_is_read_like_one() -> None:
    # callers may hand over any Mapping; the result is plain JSON, whether injected or skipped
    pod = _pod()
    injected = engine.inject(MappingProxyType(pod), ENABLED, WebhookConfig())
    assert injected.injected and injected.pod == engine.inject(pod, ENABLED, WebhookConfig()).pod
    skipped = engine.inject(MappingProxyType(pod), {}, WebhookConfig())
    assert skipped.allowed and not skipped.injected and json.loads(json.dumps(skipped.pod)) == pod


def test_the_resource_template_uses_the_base_url_and_its_errors_name_it() -> None:
    config = parse_config(
        {
            "sidecar": {"inbound": {"issuer": "https://idp.example/realms/mcp"}},
            "resource_base_url": "https://mcp.example.com/",
            "resource_template": "{base_url}/{namespace}/{app}",
        }
    )
    pod = _pod()
    pod["metadata"]["labels"] = {"app.kubernetes.io/name": "search"}
    status = json.loads(_injected(pod, config)["metadata"]["annotations"][ann.STATUS])
    assert status["resource"] == "https://mcp.example.com/ns/search"
    refused = engine.inject(_pod(), ENABLED, config)  # no app label
    assert not refused.allowed and not refused.patch
    assert str(refused.message).startswith(
        "cannot build this MCP server's resource URI: resource_template uses {app} but the pod has "
        "neither label "
    )


def test_outrider_config_escapes_non_ascii_and_del_as_json_does() -> None:
    # the env value is the same text whichever JSON writer built it: non-ASCII and DEL \\u-escaped
    for comment, escaped in (("caf\u00e9", "\\u00e9"), ("\x7f", "\\u007f")):
        policy = f"// {comment}\nforbid(principal, action, resource);"
        text = _env(_proxy(_injected(_safe_pod({ann.POLICY: policy}))))["OUTRIDER_CONFIG"]
        assert text.isascii() and "\x7f" not in text and escaped in text
        assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_strict_checks_the_sidecar_against_the_namespaces_own_mcp_policy() -> None:
    # the operator's policy for this namespace (not the cluster default) is what a genuine sidecar holds
    config = parse_config(
        {
            "mcp_policy": {
                "default": {"cedar": "permit(principal, action, resource);"},
                "namespaces": {"ns": {"cedar": FORBID}},
            }
        }
    )
    first = engine.inject(_safe_pod(), STRICT, config)
    assert FORBID in _env(_proxy(first.pod))["OUTRIDER_CONFIG"]
    assert _skipped(engine.inject(json.loads(json.dumps(first.pod)), STRICT, config))


def test_the_operators_sidecar_env_reaches_the_proxy() -> None:
    config = parse_config({"sidecar_env": {"OTEL_SERVICE_NAME": "search"}})
    env = _proxy(_injected(_pod(), config))["env"]
    assert {"name": "OTEL_SERVICE_NAME", "value": "search"} in env


def test_every_volume_outrider_adds_gets_a_name_of_its_own() -> None:
    # an operator's sidecar mount may want the name Outrider picked (or the pod already uses) for its own
    # volume; a pod with two volumes of one name is refused by the API server
    config = parse_config(
        {"sidecar_mounts": [{"name": "outrider-spiffe", "secret": "idp", "mountPath": "/etc/outrider/idp"}]}
    )
    for pod_volumes in ([], [{"name": "outrider-spiffe", "emptyDir": {}}]):
        pod = _pod(volumes=list(pod_volumes))
        names = [v["name"] for v in _injected(pod, config)["spec"]["volumes"]]
        assert len(names) == len(set(names)), names
        assert names[: len(pod_volumes)] == [v["name"] for v in pod_volumes]  # the pod's own come first


def test_strict_refuses_an_injected_pod_whose_app_declares_the_sidecars_port() -> None:
    pod = json.loads(json.dumps(engine.inject(_safe_pod(), STRICT, WebhookConfig()).pod))
    _app(pod)["ports"].insert(0, {"containerPort": 15001})
    refused = engine.inject(pod, STRICT, WebhookConfig())
    assert not refused.allowed and not refused.patch
    assert "but it records MCP port 8080 but the pod's MCP port is None;" in str(refused.message)


def test_every_egress_annotation_error_is_said() -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {"outrider.dev/egress-allow": "ok.example.com, host!!, bad::x"}
    refused = engine.inject(pod, ENABLED, WebhookConfig())
    assert not refused.allowed and not refused.patch
    first, second = str(refused.message).split("; annotation outrider.dev/egress-allow [")
    assert first.startswith("annotation outrider.dev/egress-allow [1]: egress rule 'host!!'")
    assert second.startswith("2]: egress rule 'bad::x'")


# --- browser origins (`inbound.cors`) reach every injected pod from the webhook's `sidecar:` block


def test_the_sidecar_block_sets_the_browser_origins_of_every_injected_pod() -> None:
    config = parse_config(
        {"sidecar": {"inbound": {"cors": {"allowed_origins": ["https://Inspector.example.com"]}}}}
    )
    pod = _injected(_pod(), config)
    inbound = json.loads(_env(_proxy(pod))["OUTRIDER_CONFIG"])["inbound"]
    assert inbound["cors"] == {"allowed_origins": ["https://Inspector.example.com"]}
    assert inbound["mcp_port"] == 8080  # merged beside the per-pod values


@pytest.mark.parametrize("origin", ["*", "null", "https://inspector.example.com/"])
def test_a_wildcard_or_malformed_origin_is_refused_when_the_webhook_config_loads(origin: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"sidecar": {"inbound": {"cors": {"allowed_origins": [origin]}}}})
    assert "inbound.cors.allowed_origins" in str(error.value)
