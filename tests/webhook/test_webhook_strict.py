"""Strict namespaces refuse every pod setting that lets an app escape the sidecar.

Each case starts from a pod that strict mode accepts, adds one escape, and checks the refusal names
the field path and says how to fix it; `enabled` namespaces warn about the hard ones and inject.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from webhook_support import ThreadedWebhook, review

from outrider.webhook import engine
from outrider.webhook import strict as strict_rules
from outrider.webhook.config import WebhookConfig
from outrider.webhook.namespaces import StaticNamespaces

STRICT = {"outrider.dev/inject": "strict"}
ENABLED = {"outrider.dev/inject": "enabled"}
SAFE_SC = {
    "runAsUser": 1000,
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


def safe_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mcp", "namespace": "secure"},
        "spec": {
            "initContainers": [
                {"name": "migrate", "image": "ghcr.io/example/migrate:1", "securityContext": dict(SAFE_SC)}
            ],
            "containers": [
                {
                    "name": "app",
                    "image": "ghcr.io/example/mcp:1",
                    "ports": [{"name": "mcp", "containerPort": 8080}],
                    "securityContext": copy.deepcopy(SAFE_SC),
                }
            ],
        },
    }


def app_sc(**values: Any) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        pod["spec"]["containers"][0]["securityContext"].update(values)

    return change


def pod_sc(**values: Any) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        pod["spec"].setdefault("securityContext", {}).update(values)

    return change


def spec(**values: Any) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        pod["spec"].update(values)

    return change


def caps(*names: str) -> Callable[[dict[str, Any]], None]:
    return app_sc(capabilities={"add": list(names), "drop": ["ALL"]})


def without_app_uid(pod: dict[str, Any]) -> None:
    del pod["spec"]["containers"][0]["securityContext"]["runAsUser"]


def inherit_uid(uid: int) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        without_app_uid(pod)
        pod["spec"]["securityContext"] = {"runAsUser": uid}

    return change


def root_keeping_setuid(pod: dict[str, Any]) -> None:
    sc = pod["spec"]["containers"][0]["securityContext"]
    sc.update(runAsUser=0, runAsNonRoot=False, capabilities={"drop": ["NET_BIND_SERVICE"]})


def rename(name: str) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        pod["spec"]["containers"][0]["name"] = name

    return change


def init_with(**sc: Any) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        pod["spec"]["initContainers"][0]["securityContext"].update(sc)

    return change


def ephemeral(pod: dict[str, Any]) -> None:
    pod["spec"]["ephemeralContainers"] = [{"name": "debug", "image": "busybox", "securityContext": SAFE_SC}]


def spiffe_mount(pod: dict[str, Any]) -> None:
    pod["spec"]["volumes"] = [{"name": "spiffe-workload-api", "csi": {"driver": "csi.spiffe.io"}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "spiffe-workload-api", "mountPath": "/spiffe-workload-api", "readOnly": True}
    ]


# (id, change, text the refusal must contain, field path it must name, warned in `enabled` too)
CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str, bool]] = [
    ("app-run-as-group", app_sc(runAsGroup=15337), "runAsGroup is 15337", "containers[0] (app)", True),
    (
        "pod-run-as-group",
        pod_sc(runAsGroup=15337),
        "spec.securityContext.runAsGroup is 15337",
        "containers[0] (app)",
        True,
    ),
    (
        "supplemental-groups",
        pod_sc(supplementalGroups=[1000, 15337]),
        "supplementalGroups contains 15337",
        "spec.securityContext",
        True,
    ),
    ("fs-group", pod_sc(fsGroup=15337), "fsGroup is 15337", "spec.securityContext", True),
    (
        "pod-run-as-user-inherited",
        inherit_uid(15337),
        "spec.securityContext.runAsUser is 15337",
        "containers[0] (app)",
        True,
    ),
    ("host-pid", spec(hostPID=True), "spec.hostPID is true", "hostPID: false", True),
    ("host-ipc", spec(hostIPC=True), "spec.hostIPC is true", "hostIPC: false", True),
    (
        "share-process-namespace",
        spec(shareProcessNamespace=True),
        "shareProcessNamespace is true",
        "shareProcessNamespace: false",
        False,
    ),
    ("net-admin", caps("NET_ADMIN"), "has NET_ADMIN", "containers[0] (app).securityContext", True),
    ("net-raw", caps("NET_RAW"), "has NET_RAW", "capabilities.add", True),
    ("sys-admin", caps("SYS_ADMIN"), "has SYS_ADMIN", "capabilities.add", True),
    ("all", caps("ALL"), "has ALL", "capabilities.add", True),
    ("lowercase", caps("net_admin"), "has NET_ADMIN", "capabilities.add", True),
    ("cap-prefix", caps("CAP_NET_ADMIN"), "has NET_ADMIN", "capabilities.add", True),
    ("cap-prefix-lower", caps("cap_sys_admin"), "has SYS_ADMIN", "capabilities.add", True),
    ("setuid", caps("SETUID"), "has SETUID", "capabilities.add", False),
    ("sys-ptrace", caps("SYS_PTRACE"), "has SYS_PTRACE", "capabilities.add", False),
    ("privileged", app_sc(privileged=True), "privileged is true", "containers[0] (app)", True),
    (
        "privilege-escalation",
        app_sc(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation is not false",
        "containers[0] (app)",
        False,
    ),
    ("root-with-setuid", root_keeping_setuid, "runs as root with CAP_SETUID", "drop", False),
    ("no-run-as-user", without_app_uid, "runAsUser is not set", "containers[0] (app)", False),
    (
        "init-net-admin",
        init_with(capabilities={"add": ["NET_ADMIN"]}),
        "has NET_ADMIN",
        "initContainers[0]",
        True,
    ),
    (
        "init-run-as-15337",
        init_with(runAsUser=15337),
        "runAsUser is 15337",
        "initContainers[0] (migrate)",
        True,
    ),
    ("named-like-ours", rename("outrider-proxy"), "starts with 'outrider-'", "containers[0]", False),
    ("ephemeral-at-create", ephemeral, "spec.ephemeralContainers is set", "kubectl debug", False),
    ("spiffe-mount", spiffe_mount, "SPIFFE Workload API volume", "volumeMounts[0]", False),
    (
        "host-path",
        spec(volumes=[{"name": "sock", "hostPath": {"path": "/run/containerd/containerd.sock"}}]),
        "spec.volumes[0] (sock).hostPath",
        "use another volume type",
        False,
    ),
]


def test_the_safe_pod_is_injected_in_strict_namespaces() -> None:
    result = engine.inject(safe_pod(), STRICT, WebhookConfig())
    assert result.allowed and result.injected, result.message


@pytest.mark.parametrize(
    ("change", "text", "where", "warned"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_strict_refuses(
    change: Callable[[dict[str, Any]], None], text: str, where: str, warned: bool
) -> None:
    pod = safe_pod()
    change(pod)
    result = engine.inject(pod, STRICT, WebhookConfig())
    assert not result.allowed and result.patch == []
    message = result.message or ""
    assert text in message and where in message, message
    assert "outrider.dev/inject=strict" in message
    enabled = engine.inject(pod, ENABLED, WebhookConfig())
    if warned:
        assert any(text in w for w in enabled.warnings), enabled.warnings
    if "outrider-proxy" not in json.dumps(pod["spec"]["containers"]):
        assert enabled.allowed  # enabled namespaces inject (warning where it is a hard escape)


def test_every_problem_is_listed_once_numbered() -> None:
    pod = safe_pod()
    pod["spec"]["containers"][0]["securityContext"] = {"capabilities": {"add": ["NET_ADMIN"]}}
    message = engine.inject(pod, STRICT, WebhookConfig()).message or ""
    assert "[1]" in message and "[2]" in message and "[3]" in message and "[4]" not in message


def test_root_that_drops_setuid_and_setgid_is_accepted() -> None:
    pod = safe_pod()
    pod["spec"]["containers"][0]["securityContext"] = {
        "runAsUser": 0,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["cap_setuid", "SETGID"]},
    }
    assert engine.inject(pod, STRICT, WebhookConfig()).allowed


def test_classic_layout_refuses_user_init_containers_in_strict() -> None:
    config = WebhookConfig(native_sidecar=False)
    result = engine.inject(safe_pod(), STRICT, config)
    assert not result.allowed
    assert "spec.initContainers[0] (migrate) would run before outrider-init" in (result.message or "")
    pod = safe_pod()
    del pod["spec"]["initContainers"]
    assert engine.inject(pod, STRICT, config).allowed
    # the native layout runs outrider-init and the proxy first, so user init containers are captured
    native = engine.inject(safe_pod(), STRICT, WebhookConfig()).pod
    assert [c["name"] for c in native["spec"]["initContainers"]] == [
        "outrider-init",
        "outrider-proxy",
        "migrate",
    ]


@pytest.mark.parametrize("port", [15001, 15006, 15020])
def test_our_ports_are_refused_everywhere(port: int) -> None:
    pod = safe_pod()
    pod["spec"]["containers"][0]["ports"].append({"containerPort": port})
    for labels in (STRICT, ENABLED):
        result = engine.inject(pod, labels, WebhookConfig())
        assert not result.allowed and f"containerPort {port}" in (result.message or "")


@pytest.mark.parametrize("port", [15001, 15006, 15020])
def test_our_ports_are_refused_in_init_containers_too(port: int) -> None:
    # An init container shares the pod's network namespace: its listener would take the sidecar's port.
    # Entries that are not objects are passed over, not a reason to stop looking.
    pod = safe_pod()
    warm_up = {**copy.deepcopy(pod["spec"]["initContainers"][0]), "name": "warm-up"}
    warm_up["ports"] = [{"containerPort": port}]
    pod["spec"]["initContainers"] = [None, warm_up, *pod["spec"]["initContainers"]]
    for labels in (STRICT, ENABLED):
        result = engine.inject(pod, labels, WebhookConfig())
        assert not result.allowed
        assert f"container warm-up declares containerPort {port}" in (result.message or "")


@pytest.mark.parametrize("name", ["outrider-proxy", "outrider-init"])
def test_enabled_namespaces_rename_ours_around_user_containers(name: str) -> None:
    pod = safe_pod()
    pod["spec"]["containers"].append({"name": name, "image": "nginx"})
    result = engine.inject(pod, ENABLED, WebhookConfig())
    names = [c["name"] for c in [*result.pod["spec"]["initContainers"], *result.pod["spec"]["containers"]]]
    assert result.allowed and len(names) == len(set(names)) and f"{name}-1" in names


# --- UPDATE: ephemeral containers and swapped sidecar images -----------------------------------


def injected_pod() -> dict[str, Any]:
    return engine.inject(safe_pod(), STRICT, WebhookConfig()).pod


def with_debugger(pod: dict[str, Any], **container: Any) -> dict[str, Any]:
    new = copy.deepcopy(pod)
    debugger = {
        "name": "debugger",
        "image": "busybox",
        "securityContext": copy.deepcopy(SAFE_SC),
        **container,
    }
    new["spec"]["ephemeralContainers"] = [debugger]
    return new


def test_restricted_debug_container_is_accepted() -> None:
    old = injected_pod()
    assert strict_rules.ephemeral_problems(old, with_debugger(old, targetContainerName="app")) == []


@pytest.mark.parametrize(
    ("container", "text"),
    [
        ({"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}, "has NET_ADMIN"),
        ({"securityContext": {**SAFE_SC, "runAsUser": 15337}}, "runAsUser is 15337"),
        ({"securityContext": {"privileged": True}}, "privileged is true"),
        ({}, None),  # no securityContext at all: runAsUser/allowPrivilegeEscalation
        ({"targetContainerName": "outrider-proxy"}, "targetContainerName is outrider-proxy"),
        ({"volumeMounts": [{"name": "outrider-spiffe", "mountPath": "/s"}]}, "SPIFFE Workload API"),
    ],
)
def test_risky_debug_containers_are_refused(container: dict[str, Any], text: str | None) -> None:
    old = injected_pod()
    new = with_debugger(old, **container)
    if not container:
        new["spec"]["ephemeralContainers"][0].pop("securityContext")
    found = strict_rules.ephemeral_problems(old, new)
    assert found and all(p.startswith("spec.ephemeralContainers[0] (debugger)") for p in found)
    if text:
        assert any(text in p for p in found), found
    # an existing ephemeral container is not judged again (it was judged when it was added)
    assert strict_rules.ephemeral_problems(new, new) == []


def test_swapped_sidecar_image_is_refused() -> None:
    old = injected_pod()
    new = copy.deepcopy(old)
    new["spec"]["initContainers"][1]["image"] = "busybox"
    [problem] = strict_rules.sidecar_image_changes(old, new)
    assert problem.startswith("spec.initContainers[1] (outrider-proxy).image changed")
    app_only = copy.deepcopy(old)
    app_only["spec"]["containers"][0]["image"] = "ghcr.io/example/mcp:2"
    assert strict_rules.sidecar_image_changes(old, app_only) == []


def _update(obj: dict[str, Any], old: dict[str, Any], namespace: str, sub: str | None) -> dict[str, Any]:
    document = review(obj, namespace=namespace, operation="UPDATE")
    document["request"]["oldObject"] = old
    if sub:
        document["request"]["subResource"] = sub
    return document


def test_server_judges_updates_in_strict_namespaces_only(cert_dir: Path) -> None:
    facts = StaticNamespaces(namespace_labels={"secure": STRICT, "tools": ENABLED})
    server = ThreadedWebhook(cert_dir, namespaces=facts)
    old = injected_pod()
    risky = with_debugger(old, securityContext={"capabilities": {"add": ["NET_ADMIN"]}})
    fine = with_debugger(old, targetContainerName="app")
    swapped = copy.deepcopy(old)
    swapped["spec"]["initContainers"][1]["image"] = "busybox"
    answers = {}
    try:
        for name, (obj, ns, sub) in {
            "risky-strict": (risky, "secure", "ephemeralcontainers"),
            "risky-enabled": (risky, "tools", "ephemeralcontainers"),
            "fine-strict": (fine, "secure", "ephemeralcontainers"),
            "swapped-strict": (swapped, "secure", None),
            "status-update": (swapped, "secure", "status"),
        }.items():
            status, body, _ = server.request(
                "POST", "/mutate", json.dumps(_update(obj, old, ns, sub)).encode()
            )
            assert status == 200
            answers[name] = json.loads(body)["response"]
    finally:
        server.close()
    refused = answers["risky-strict"]
    assert refused["allowed"] is False and refused["status"]["code"] == 403
    assert (
        "spec.ephemeralContainers[0] (debugger).securityContext.capabilities.add has NET_ADMIN"
        in (refused["status"]["message"])
    )
    assert answers["risky-enabled"] == {"uid": "uid-1", "allowed": True}
    assert answers["fine-strict"] == {"uid": "uid-1", "allowed": True}
    assert answers["swapped-strict"]["allowed"] is False
    assert "outrider-proxy).image changed" in answers["swapped-strict"]["status"]["message"]
    assert answers["status-update"] == {"uid": "uid-1", "allowed": True}  # other subresources: ignored
    assert not any("patch" in a for a in answers.values())


# --- fuzz: odd shapes never crash the strict rules ----------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 20000) | st.text(max_size=8) | st.sampled_from([15337, 0]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
container_like = st.fixed_dictionaries(
    {"name": json_values | st.sampled_from(["app", "outrider-proxy", "debugger"])},
    optional={
        "securityContext": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "runAsUser": json_values,
                "allowPrivilegeEscalation": json_values,
                "capabilities": json_values
                | st.fixed_dictionaries({"add": json_values, "drop": json_values}),
                "privileged": json_values,
            },
        ),
        "volumeMounts": json_values,
        "targetContainerName": json_values,
        "image": json_values,
    },
)
spec_like = st.fixed_dictionaries(
    {"containers": st.lists(container_like, min_size=1, max_size=2)},
    optional={
        "initContainers": json_values | st.lists(container_like, max_size=2),
        "ephemeralContainers": json_values | st.lists(container_like, max_size=2),
        "securityContext": json_values,
        "volumes": json_values,
        "shareProcessNamespace": json_values,
        "hostPID": json_values,
    },
)
annotations_like = json_values | st.fixed_dictionaries(
    {"outrider.dev/status": json_values.map(json.dumps) | json_values}
)


@settings(max_examples=300, deadline=None)
@given(
    spec=spec_like,
    old_spec=spec_like,
    annotations=annotations_like,
    strict=st.booleans(),
    native=st.booleans(),
)
def test_fuzz_strict_rules_never_crash(
    spec: dict[str, Any], old_spec: dict[str, Any], annotations: Any, strict: bool, native: bool
) -> None:
    pod = {"metadata": {"name": "p", "annotations": annotations}, "spec": spec}
    old = {"metadata": {"annotations": annotations}, "spec": old_spec}
    assert all(isinstance(p, str) for p in strict_rules.problems(spec, strict))
    strict_rules.ephemeral_problems(old, pod)
    strict_rules.sidecar_image_changes(old, pod)
    labels = STRICT if strict else ENABLED
    result = engine.inject(copy.deepcopy(pod), labels, WebhookConfig(native_sidecar=native))
    assert result.allowed or result.message


# --- decisions pinned down by mutation testing (issue 17) --------------------------------------


def test_a_container_after_a_skipped_outrider_container_is_still_checked() -> None:
    # `skip` names the Outrider containers of an injected pod; the app containers listed after
    # them (same list) must still be judged.
    spec = {
        "initContainers": [{"name": "outrider-proxy", "securityContext": {"privileged": True}}],
        "containers": [
            {"name": "outrider-proxy-2", "image": "x", "securityContext": dict(SAFE_SC)},
            {"name": "app", "securityContext": {**SAFE_SC, "privileged": True}},
        ],
    }
    found = strict_rules.problems(spec, strict=True, skip={"outrider-proxy", "outrider-proxy-2"})
    assert [p for p in found if "privileged" in p] == [
        "spec.containers[1] (app).securityContext.privileged is true (a privileged container can rewrite "
        "the pod's iptables); remove it"
    ]
    # the skipped one is really skipped, also in `enabled` namespaces
    assert not any(
        "initContainers[0]" in p for p in strict_rules.problems(spec, False, skip={"outrider-proxy"})
    )


def test_a_second_new_debug_container_is_checked_after_an_old_one() -> None:
    old = with_debugger(injected_pod())
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"].append(
        {"name": "second", "image": "busybox", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}
    )
    found = strict_rules.ephemeral_problems(old, new)
    assert found and all(p.startswith("spec.ephemeralContainers[1] (second)") for p in found)
    assert any("has NET_ADMIN" in p for p in found)


def test_image_swap_that_strips_the_status_annotation_is_refused() -> None:
    old = injected_pod()
    new = copy.deepcopy(old)
    del new["metadata"]["annotations"]["outrider.dev/status"]
    new["spec"]["initContainers"][1]["image"] = "busybox"
    assert [p.split(" (")[0] for p in strict_rules.sidecar_image_changes(old, new)] == [
        "spec.initContainers[1]"
    ]


def test_image_swap_that_forges_the_status_annotation_is_refused() -> None:
    # The old pod's status names outrider-proxy; the UPDATE rewrites the status to name nothing.
    old = injected_pod()
    new = copy.deepcopy(old)
    new["metadata"]["annotations"]["outrider.dev/status"] = json.dumps(
        {"initContainers": [], "containers": []}
    )
    new["spec"]["initContainers"][1]["image"] = "busybox"
    assert len(strict_rules.sidecar_image_changes(old, new)) == 1
    # ...and a status forged onto a pod that had none still guards the containers it names
    plain = safe_pod()
    forged = copy.deepcopy(plain)
    forged["metadata"]["annotations"] = {"outrider.dev/status": json.dumps({"containers": ["app"]})}
    forged["spec"]["containers"][0]["image"] = "busybox"
    assert len(strict_rules.sidecar_image_changes(plain, forged)) == 1
    # an unparsable status names nothing and refuses nothing
    broken = copy.deepcopy(plain)
    broken["metadata"]["annotations"] = {"outrider.dev/status": "{not json"}
    broken["spec"]["containers"][0]["image"] = "busybox"
    assert strict_rules.sidecar_image_changes(plain, broken) == []


def test_image_swap_of_the_classic_layout_sidecar_in_containers_is_refused() -> None:
    old = engine.inject(safe_pod_without_init(), STRICT, WebhookConfig(native_sidecar=False)).pod
    index = [c["name"] for c in old["spec"]["containers"]].index("outrider-proxy")
    new = copy.deepcopy(old)
    new["spec"]["containers"][index]["image"] = "busybox"
    [problem] = strict_rules.sidecar_image_changes(old, new)
    assert problem.startswith(f"spec.containers[{index}] (outrider-proxy).image changed from ")


def safe_pod_without_init() -> dict[str, Any]:
    pod = safe_pod()
    del pod["spec"]["initContainers"]
    return pod


@pytest.mark.parametrize(
    ("drop", "refused"),
    [(["ALL"], False), (["all"], False), (["SETUID", "SETGID"], False), (["SETUID"], True), ([], True)],
)
def test_root_container_is_accepted_only_without_setuid_and_setgid(drop: list[str], refused: bool) -> None:
    pod = safe_pod()
    pod["spec"]["containers"][0]["securityContext"] = {
        "runAsUser": 0,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": drop},
    }
    result = engine.inject(pod, STRICT, WebhookConfig())
    assert result.allowed is not refused
    if refused:
        assert "spec.containers[0] (app) runs as root with CAP_SETUID/CAP_SETGID" in (result.message or "")


def test_refusal_message_shapes() -> None:
    head = (
        "namespace is labelled outrider.dev/inject=strict, which refuses pods that could escape the sidecar"
    )
    assert strict_rules.refusal(["p1"]) == f"p1 ({head})"
    assert strict_rules.refusal(["p1", "p2"]) == f"{head}: [1] p1. [2] p2."
    many = strict_rules.refusal([f"p{n}" for n in range(1, 9)])
    assert many == f"{head}: " + " ".join(f"[{n}] p{n}." for n in range(1, 7)) + " (and 2 more)"
    assert strict_rules.refusal(["p1", "p2", "p3"], limit=1) == f"p1 (and 2 more) ({head})"


def test_every_strict_message_in_full() -> None:
    # One pod with every problem at once: the messages users read, verbatim and in order.
    spec = {
        "securityContext": {"fsGroup": 15337, "supplementalGroups": [15337]},
        "hostPID": True,
        "hostIPC": True,
        "shareProcessNamespace": True,
        "volumes": [
            {"name": "h", "hostPath": {"path": "/"}},
            {"name": "svid", "csi": {"driver": "csi.spiffe.io"}},
        ],
        "ephemeralContainers": [{"name": "dbg"}],
        "containers": [
            {
                "name": "outrider-x",
                "securityContext": {"runAsUser": 0, "capabilities": {"add": ["NET_ADMIN", "SYS_PTRACE"]}},
                "volumeMounts": [{"name": "svid", "mountPath": "/s"}],
            },
            {"name": "b"},
        ],
    }
    assert strict_rules.problems(spec, strict=True) == [
        "spec.securityContext.fsGroup is 15337, the sidecar's GID, which every container would get as a supplementary group; pick another fsGroup",  # noqa: E501
        "spec.securityContext.supplementalGroups contains 15337, the sidecar's GID; remove it",
        "spec.hostPID is true: it shares the node's processes (nsenter into the node's network); set hostPID: false",  # noqa: E501
        "spec.hostIPC is true: it shares the node's IPC namespace; set hostIPC: false",
        "spec.shareProcessNamespace is true: app containers could signal the sidecar or read its /proc (tokens, SVID keys); set shareProcessNamespace: false",  # noqa: E501
        "spec.volumes[0] (h).hostPath exposes the node's filesystem (a container runtime socket or /proc there runs code outside the sidecar); use another volume type",  # noqa: E501
        "spec.ephemeralContainers is set at creation; remove it (add debug containers later with kubectl debug --profile=restricted)",  # noqa: E501
        "spec.containers[0] (outrider-x).securityContext.capabilities.add has NET_ADMIN, SYS_PTRACE (they let the container bypass or rewrite the traffic capture); remove them",  # noqa: E501
        "spec.containers[0] (outrider-x).securityContext.allowPrivilegeEscalation is not false: a setuid program in the image could switch to UID 15337; set allowPrivilegeEscalation: false",  # noqa: E501
        'spec.containers[0] (outrider-x) runs as root with CAP_SETUID/CAP_SETGID, so it can switch to UID 15337; run it as non-root or set spec.containers[0] (outrider-x).securityContext.capabilities.drop: ["ALL"]',  # noqa: E501
        "spec.containers[0] (outrider-x).name starts with 'outrider-', which operators read as an Outrider container; rename it",  # noqa: E501
        "spec.containers[0] (outrider-x).volumeMounts[0] mounts svid, a SPIFFE Workload API volume: the app could take the pod's SVID and act as the sidecar; only outrider-proxy may mount it, remove the mount",  # noqa: E501
        "spec.containers[1] (b).securityContext.runAsUser is not set (nor spec.securityContext.runAsUser): the image's USER could be 15337, whose traffic is never captured; set runAsUser to the UID the image runs as",  # noqa: E501
        "spec.containers[1] (b).securityContext.allowPrivilegeEscalation is not false: a setuid program in the image could switch to UID 15337; set allowPrivilegeEscalation: false",  # noqa: E501
        "spec.ephemeralContainers[0] (dbg).securityContext.runAsUser is not set (nor spec.securityContext.runAsUser): the image's USER could be 15337, whose traffic is never captured; set runAsUser to the UID the image runs as",  # noqa: E501
        "spec.ephemeralContainers[0] (dbg).securityContext.allowPrivilegeEscalation is not false: a setuid program in the image could switch to UID 15337; set allowPrivilegeEscalation: false",  # noqa: E501
    ]


def test_enabled_namespaces_warn_only_about_hard_capabilities_of_every_container() -> None:
    spec = {
        "containers": [
            {"name": "a", "securityContext": {"capabilities": {"add": ["SETUID", "SYS_PTRACE", "SETGID"]}}},
            {"name": "b", "securityContext": {"capabilities": {"add": ["NET_RAW"]}}},
        ]
    }
    assert [p.split(".securityContext")[0] for p in strict_rules.problems(spec, strict=False)] == [
        "spec.containers[1] (b)"
    ]


def test_pod_level_run_as_user_is_inherited_in_strict() -> None:
    pod = safe_pod()
    pod["spec"]["securityContext"] = {"runAsUser": 1000}
    for c in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
        c["securityContext"].pop("runAsUser")
    assert engine.inject(pod, STRICT, WebhookConfig()).allowed
    pod["spec"]["securityContext"] = {"runAsUser": 0}
    pod["spec"]["containers"][0]["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    message = engine.inject(pod, STRICT, WebhookConfig()).message or ""
    assert "spec.containers[0] (app) runs as root with CAP_SETUID/CAP_SETGID" in message


def test_ordinary_volume_mounts_are_fine_in_strict() -> None:
    pod = safe_pod()
    pod["spec"]["volumes"] = [
        {"name": "data", "emptyDir": {}},
        {"name": "other-csi", "csi": {"driver": "x.example"}},
    ]
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "data", "mountPath": "/data"},
        {"name": "other-csi", "mountPath": "/x"},
    ]
    assert engine.inject(pod, STRICT, WebhookConfig()).allowed
    assert strict_rules.problems(pod["spec"], strict=True) == []


def test_debug_container_inherits_the_pods_run_as_user() -> None:
    old = injected_pod()
    old["spec"]["securityContext"] = {"runAsUser": 1000}
    new = with_debugger(
        old, securityContext={"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    )
    assert strict_rules.ephemeral_problems(old, new) == []
    old["spec"]["securityContext"] = {"runAsUser": 15337}
    new["spec"]["securityContext"] = {"runAsUser": 15337}
    assert any(
        "spec.securityContext.runAsUser is 15337" in p for p in strict_rules.ephemeral_problems(old, new)
    )


def test_odd_shapes_in_mounts_and_names_are_judged_not_crashed_on() -> None:
    spec = {
        "volumes": [{"name": "svid", "csi": {"driver": "csi.spiffe.io"}}],
        "containers": [
            {"name": 7, "securityContext": dict(SAFE_SC), "volumeMounts": ["svid", 7, {"name": "svid"}]}
        ],
    }
    found = strict_rules.problems(spec, strict=True)
    assert found == [
        "spec.containers[0] (7).volumeMounts[2] mounts svid, a SPIFFE Workload API volume: the app could "
        "take the pod's SVID and act as the sidecar; only outrider-proxy may mount it, remove the mount"
    ]
    assert strict_rules.name_of({"name": 7}) is None and strict_rules.name_of("app") is None


def test_debug_containers_may_not_mount_the_sidecars_volumes() -> None:
    old = injected_pod()
    old["spec"]["volumes"] += [
        {"name": "data", "emptyDir": {}},
        {"name": "app-csi", "csi": {"driver": "secrets-store.csi.k8s.io"}},
    ]
    mounts = [
        {"name": "data", "mountPath": "/d"},
        {"name": "app-csi", "mountPath": "/c"},
        {"name": "outrider-egress-policy", "mountPath": "/p"},
    ]
    new = with_debugger(old, volumeMounts=mounts)
    assert strict_rules.ephemeral_problems(old, new) == [
        "spec.ephemeralContainers[0] (debugger).volumeMounts[2] mounts outrider-egress-policy, a volume only "
        "outrider-proxy may mount (its Secrets or egress policy); remove the mount"
    ]
    # two new debug containers: the problems of both are reported
    both = with_debugger(old, securityContext={"privileged": True})
    both["spec"]["ephemeralContainers"].append(
        {
            "name": "second",
            "image": "busybox",
            "securityContext": dict(SAFE_SC),
            "targetContainerName": "outrider-proxy",
        }
    )
    found = strict_rules.ephemeral_problems(old, both)
    assert any(
        p.startswith("spec.ephemeralContainers[0] (debugger).securityContext.privileged") for p in found
    )
    assert found[-1] == (
        "spec.ephemeralContainers[1] (second).targetContainerName is outrider-proxy: a debug container in "
        "the sidecar's process namespace can read its tokens and keys; target the app container"
    )


def test_refusal_counts_only_what_it_leaves_out() -> None:
    assert "more" not in strict_rules.refusal([f"p{n}" for n in range(6)])


def test_swapped_image_message_in_full() -> None:
    old = injected_pod()
    new = copy.deepcopy(old)
    before = old["spec"]["initContainers"][1]["image"]
    new["spec"]["initContainers"][1]["image"] = "busybox"
    assert strict_rules.sidecar_image_changes(old, new) == [
        f"spec.initContainers[1] (outrider-proxy).image changed from {before!r} to 'busybox': the Outrider "
        "containers cannot be changed in place; roll the workload so the webhook injects them again"
    ]
