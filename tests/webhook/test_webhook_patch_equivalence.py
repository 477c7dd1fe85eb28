"""The engine's patch, built with the injected pod (no diff), against the generic diff over varied pods.

`engine._apply` emits the RFC 6902 operations while it builds the injected pod. Over pods of every
shape the webhook meets (ports named or not, UDP ports, probes of every kind on named, numeric and
decimal-string ports, null or missing lists and annotations, existing init containers and volumes,
`metadata` after `spec`, pull secrets, native and classic layouts, capture and explicit egress), the
patch must be exactly `webhook.patch.diff(original, injected)`, op for op (what the engine emitted
before it built the ops itself), apply with a standard RFC 6902 library to the original pod, leave the
input untouched, and the objects the injected pods share (per-config parts) must never change.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outrider.webhook import admission, engine
from outrider.webhook.config import SidecarMount, WebhookConfig
from outrider.webhook.patch import diff

NAMES = ["app", "mcp", "outrider-proxy", "outrider-init", "sidecar"]
PORT_NAMES = ["mcp", "http", "outrider-admin", "outrider-mcp", "metrics"]


def _port_ref() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from([8080, 8000, 9090]),
        st.sampled_from(PORT_NAMES),
        st.sampled_from(["8080", "9090", "²"]),
        st.none(),
    )


def _probe() -> st.SearchStrategy[Any]:
    http = st.fixed_dictionaries(
        {"port": _port_ref()},
        optional={
            "path": st.sampled_from(["/healthz", ""]),
            "scheme": st.sampled_from(["HTTP", "HTTPS"]),
            "httpHeaders": st.just([{"name": "X", "value": "y"}]),
        },
    )
    handler = st.one_of(
        st.fixed_dictionaries({"httpGet": http}),
        st.fixed_dictionaries({"tcpSocket": st.fixed_dictionaries({"port": _port_ref()})}),
        st.just({"exec": {"command": ["true"]}}),
        st.just({"grpc": {"port": 8080}}),
        st.just({"httpGet": None}),
    )
    extra = st.fixed_dictionaries(
        {},
        optional={"periodSeconds": st.just(5), "timeoutSeconds": st.just(3), "failureThreshold": st.just(2)},
    )
    return st.one_of(st.none(), st.builds(lambda h, e: {**h, **e}, handler, extra))


def _container(name: str) -> st.SearchStrategy[dict[str, Any]]:
    port = st.fixed_dictionaries(
        {"containerPort": st.sampled_from([8080, 8000, 9090, 53])},
        optional={"name": st.sampled_from(PORT_NAMES), "protocol": st.sampled_from(["TCP", "UDP"])},
    )
    return st.fixed_dictionaries(
        {"name": st.just(name), "image": st.just("example/app:1")},
        optional={
            "ports": st.one_of(st.none(), st.lists(port, max_size=3)),
            "readinessProbe": _probe(),
            "livenessProbe": _probe(),
            "startupProbe": _probe(),
            "env": st.one_of(
                st.none(),
                st.lists(
                    st.fixed_dictionaries(
                        {"name": st.sampled_from(["A", "HTTP_PROXY", "NO_PROXY"]), "value": st.just("v")}
                    ),
                    max_size=2,
                    unique_by=lambda e: e["name"],
                ),
            ),
            "lifecycle": st.one_of(
                st.none(),
                st.just({"preStop": {"exec": {"command": ["sleep", "1"]}}}),
                st.just({"postStart": {"exec": {"command": ["true"]}}}),
            ),
            "securityContext": st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "runAsUser": st.sampled_from([0, 1000]),
                        "readOnlyRootFilesystem": st.booleans(),
                    },
                ),
            ),
        },
    )


def _containers() -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.tuples(*(_container(n) for n in names)).map(list)
    )


_inits = st.one_of(
    st.none(),
    st.just([]),
    st.just([{"name": "init", "image": "i"}]),
    st.just([{"name": "outrider-init", "image": "i"}, {"name": "two", "image": "i"}]),
    st.just([{"image": "nameless"}]),
    st.just(["not-an-object"]),
)
_volumes = st.one_of(
    st.none(),
    st.just([]),
    st.just([{"name": "data", "emptyDir": {}}]),
    st.just(
        [{"name": "outrider-spiffe", "emptyDir": {}}, {"name": "outrider-egress-policy", "emptyDir": {}}]
    ),
    st.just([{"emptyDir": {}}]),
)
_annotations = st.one_of(
    st.none(),
    st.just(["not", "a", "map"]),
    st.fixed_dictionaries(
        {},
        optional={
            "outrider.dev/mcp-port": st.sampled_from(["8080", "mcp", "http", "9090"]),
            "kubectl.kubernetes.io/default-container": st.just("app"),
            "outrider.dev/egress-allow": st.just("api.github.com:443"),
            "outrider.dev/resource": st.just("https://mcp.example.com/"),
            "team/x~y": st.just("1"),
        },
    ),
)
_metadata = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"name": st.just("p")},
        optional={"namespace": st.just("tools"), "annotations": _annotations, "labels": st.just({"a": "b"})},
    ),
)
_spec = st.fixed_dictionaries(
    {"containers": _containers()},
    optional={
        "initContainers": _inits,
        "volumes": _volumes,
        "imagePullSecrets": st.one_of(st.none(), st.just([{"name": "regcred"}]), st.just([{"name": "mine"}])),
        "terminationGracePeriodSeconds": st.sampled_from([0, 3, 30, None]),
        "serviceAccountName": st.just("sa"),
        "securityContext": st.one_of(st.none(), st.just({"runAsNonRoot": True, "runAsUser": 1000})),
    },
)


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    pod: dict[str, Any] = {}
    metadata_first = draw(st.booleans())
    metadata = draw(st.one_of(st.just("missing"), _metadata))
    if metadata_first and metadata != "missing":
        pod["metadata"] = metadata
    pod["spec"] = draw(_spec)
    if not metadata_first and metadata != "missing":
        pod["metadata"] = metadata
    return pod


_MOUNT = SidecarMount(name="idp", source="secret", source_name="idp-client", mount_path="/etc/idp")
CONFIGS = {
    "classic": WebhookConfig(native_sidecar=False, token_audiences=("a",)),
    "native": WebhookConfig(native_sidecar=True, token_audiences=("a",)),
    "native+pull+mount": WebhookConfig(
        native_sidecar=True,
        image_pull_secrets=("regcred", "other"),
        sidecar_mounts=(_MOUNT,),
        app_stop_delay_seconds=0,
    ),
    "classic+pull": WebhookConfig(
        native_sidecar=False, image_pull_secrets=("regcred",), app_stop_delay_seconds=9
    ),
}
LABELS = {
    "capture": {"outrider.dev/inject": "enabled"},
    "explicit": {"outrider.dev/inject": "enabled", "outrider.dev/egress-mode": "explicit"},
}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods(), config_name=st.sampled_from(sorted(CONFIGS)), mode=st.sampled_from(sorted(LABELS)))
def test_the_built_patch_is_the_diff_and_applies(pod: dict[str, Any], config_name: str, mode: str) -> None:
    config = CONFIGS[config_name]
    before = copy.deepcopy(pod)
    result = engine.inject(pod, LABELS[mode], config, namespace="tools")
    assert pod == before, "the engine changed its input"
    if not result.injected:
        assert result.patch == []
        return
    assert result.patch == diff(before, result.pod)
    assert jsonpatch.apply_patch(copy.deepcopy(before), result.patch) == result.pod
    again = engine.inject(result.pod, LABELS[mode], config, namespace="tools")
    assert again.allowed and again.patch == [] and again.pod == result.pod


def test_pods_share_no_object_that_a_later_pod_changes() -> None:
    """Every pod injected with one config shares its parts; injecting others never alters them."""
    config = CONFIGS["native+pull+mount"]
    first = engine.inject(
        {"spec": {"containers": [{"name": "app", "ports": [{"name": "mcp", "containerPort": 8080}]}]}},
        LABELS["capture"],
        config,
    )
    encoded = admission.encode_result(first)
    pod_text = json.dumps(first.pod, sort_keys=True)
    # Others with name clashes (port names, container names, volumes), other ports and layouts.
    for ports in ([{"name": "outrider-admin", "containerPort": 9000}], [{"containerPort": 7000}]):
        spec = {
            "containers": [{"name": "outrider-proxy", "ports": ports}],
            "initContainers": [{"name": "outrider-init"}],
            "volumes": [{"name": "outrider-spiffe", "emptyDir": {}}],
        }
        for other in CONFIGS.values():
            engine.inject({"spec": copy.deepcopy(spec)}, LABELS["capture"], other)
    assert admission.encode_result(first) == encoded
    assert json.dumps(first.pod, sort_keys=True) == pod_text
