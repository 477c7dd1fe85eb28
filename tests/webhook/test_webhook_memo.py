"""The engine's memo tables never change an answer: distinct pods injected with warm tables get what
they get from empty ones, the patch applies (RFC 6902, `jsonpatch`) to the original to give the
injected pod, and each sidecar's OUTRIDER_CONFIG is the plain merge that the sidecar's own parser
accepts. Pods come from the golden fixtures, bench-like variations and Hypothesis (odd YAML types,
missing fields, init and ephemeral containers, pods that must be refused)."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from webhook_support import fixture_header, load_fixture, pod_template, templated_fixture_names

from outrider.sidecar import config as sidecar_settings
from outrider.webhook import annotations as ann
from outrider.webhook import engine, memo
from outrider.webhook.config import WebhookConfig, parse_config
from outrider.webhook.egress import plan_egress
from outrider.webhook.engine import InjectionResult, inject
from outrider.webhook.mcp_policy import plan_policy
from outrider.webhook.patch import diff

ENABLED = {"outrider.dev/inject": "enabled"}
STRICT = {"outrider.dev/inject": "strict"}
POLICY = {"egress_default_policy": {"allow": ["api.github.com:443", "*.example.com:443"]}}
CONFIGS = {
    "native": parse_config(POLICY),
    "classic": parse_config({**POLICY, "native_sidecar": False}),
    "resource": parse_config(
        {
            **POLICY,
            "resource_base_url": "https://mcp.example.com",
            "resource_template": "{base_url}/{namespace}/{app}",
            "resource_patterns": ["{base_url}/{namespace}/*"],
            "image_pull_secrets": ["regcred"],
        }
    ),
}

BASE_POD: dict[str, Any] = {
    "metadata": {
        "name": "github-mcp-0",
        "namespace": "tools",
        "labels": {"app.kubernetes.io/name": "github-mcp"},
        "annotations": {"outrider.dev/mcp-port": "mcp", "outrider.dev/egress-allow": "api.github.com:443"},
    },
    "spec": {
        "serviceAccountName": "github-mcp",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
        "initContainers": [{"name": "render-config", "image": "confd"}],
        "containers": [
            {
                "name": "github",
                "image": "github-mcp-server",
                "ports": [{"name": "mcp", "containerPort": 8082}, {"name": "metrics", "containerPort": 9102}],
                "env": [{"name": "LOG_FORMAT", "value": "json"}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "mcp"}, "periodSeconds": 5},
                "livenessProbe": {"tcpSocket": {"port": "mcp"}, "periodSeconds": 10},
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }
        ],
        "volumes": [{"name": "config", "emptyDir": {}}],
    },
}


def _outcome(result: InjectionResult) -> tuple[Any, ...]:
    return (
        result.allowed,
        result.injected,
        result.skipped,
        result.message,
        result.warnings,
        result.patch,
        result.pod,
    )


def _check(
    pod: dict[str, Any],
    labels: dict[str, str],
    config: WebhookConfig,
    namespace_annotations: dict[str, str] | None = None,
) -> InjectionResult:
    """Inject with the tables as they are, then again from empty tables: the same answer, and a
    patch that gives the injected pod. Returns the warm result."""
    before = copy.deepcopy(pod)
    warm = inject(pod, labels, config, None, "tools", namespace_annotations)
    assert pod == before, "the engine changed its input"
    memo.clear_all()
    cold = inject(copy.deepcopy(pod), labels, config, None, "tools", namespace_annotations)
    assert _outcome(warm) == _outcome(cold)
    if warm.injected:
        assert jsonpatch.apply_patch(before, warm.patch) == warm.pod
        assert warm.patch == diff(before, warm.pod)
        _check_sidecar_config(before, warm, labels, config)
    else:
        assert warm.patch == [] and warm.pod == before
    return warm


def _check_sidecar_config(
    pod: dict[str, Any], result: InjectionResult, labels: dict[str, str], config: WebhookConfig
) -> None:
    """OUTRIDER_CONFIG is the plain, uncached merge, and the sidecar's parser accepts it."""
    status = json.loads(result.pod["metadata"]["annotations"][ann.STATUS])
    spec = result.pod["spec"]
    proxy_name = [*status["initContainers"], *status["containers"]][-1]
    [proxy] = [c for c in (*spec.get("initContainers", []), *spec["containers"]) if c["name"] == proxy_name]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    settings_ = ann._parse_pod(  # the parse without its memo
        metadata.get("labels") if isinstance(metadata.get("labels"), dict) else {},
        metadata.get("annotations") if isinstance(metadata.get("annotations"), dict) else {},
        config.token_audiences,
    )
    namespace = str(metadata.get("namespace") or "tools")
    plan = plan_egress(pod, labels, None, config.plain_egress_default_policy)
    expected = engine.sidecar_config(
        config,
        status["mcpPort"],
        settings_.token_audience or config.default_audience,
        plan,
        plan_policy(namespace, settings_.policy, config.plain_mcp_policy),
        status.get("resource"),
    )
    actual = json.loads(env["OUTRIDER_CONFIG"])
    assert actual == json.loads(json.dumps(expected))
    sidecar_settings.validate(actual)


def _bench_like(seq: int) -> dict[str, Any]:
    """Distinct in every part a cache could key on: names, ports, annotations, env, egress allowlist."""
    pod = copy.deepcopy(BASE_POD)
    meta, app = pod["metadata"], pod["spec"]["containers"][0]
    meta["name"] = f"github-mcp-{seq:05x}"
    meta["labels"]["bench-seq"] = str(seq)
    meta["annotations"]["bench.example/revision"] = str(seq)
    if seq % 3 == 0:
        meta["annotations"]["outrider.dev/egress-allow"] = f"api.github.com:443,mirror-{seq}.example.com:443"
    if seq % 5 == 0:
        meta["annotations"]["outrider.dev/mcp-port"] = str(8000 + seq % 7)
    app["name"] = f"github-{seq % 4}"
    app["ports"][0]["containerPort"] = 8000 + seq % 7
    app["env"].append({"name": "SEQ", "value": str(seq)})
    return pod


@pytest.mark.parametrize("layout", sorted(CONFIGS))
def test_distinct_pods_in_any_order_get_what_empty_tables_give(layout: str) -> None:
    config = CONFIGS[layout]
    pods = [_bench_like(seq) for seq in range(40)]
    results = [_check(p, ENABLED, config) for p in pods]
    first = [_outcome(r) for r in results]
    for seq, result in enumerate(results):  # each pod's own values, no other pod's
        app = next(c for c in result.pod["spec"]["containers"] if c["name"].startswith("github-"))
        assert {"name": "SEQ", "value": str(seq)} in app["env"]
        status = json.loads(result.pod["metadata"]["annotations"][ann.STATUS])
        assert status["mcpPort"] == 8000 + seq % 7
        proxy = [*result.pod["spec"].get("initContainers", []), *result.pod["spec"]["containers"]]
        config_text = next(
            e["value"] for c in proxy for e in c.get("env", []) if e["name"] == "OUTRIDER_CONFIG"
        )
        assert json.loads(config_text)["inbound"]["mcp_port"] == 8000 + seq % 7
        allowed = json.loads(config_text)["egress"]["policy"]
        assert (f'"mirror-{seq}.example.com"' in json.dumps(allowed)) == (seq % 3 == 0)
    # Again, backwards, with the tables holding every other pod's entries: nothing leaks across pods.
    for pod in pods:
        inject(pod, ENABLED, config, None, "tools")
    again = [_outcome(inject(p, ENABLED, config, None, "tools")) for p in reversed(pods)]
    assert again == list(reversed(first))


def test_golden_fixtures_with_warm_tables_match_empty_tables() -> None:
    names = templated_fixture_names()
    cases = []
    for name in names:
        doc, labels, config = load_fixture(name)
        _, ns_annotations, _ = fixture_header(name)
        cases.append((pod_template(doc), labels, config, ns_annotations))
    memo.clear_all()
    cold = [_outcome(inject(copy.deepcopy(p), lab, c, None, "tools", na)) for p, lab, c, na in cases]
    for p, lab, c, na in cases:  # warm every table with every fixture
        inject(copy.deepcopy(p), lab, c, None, "tools", na)
    warm = [
        _outcome(inject(copy.deepcopy(p), lab, c, None, "tools", na)) for p, lab, c, na in reversed(cases)
    ]
    assert warm == list(reversed(cold))
    assert any(not o[0] for o in cold) and sum(o[1] for o in cold) >= 30


def test_the_sidecar_check_follows_each_pods_own_port_and_resource() -> None:
    """The per-pod part of OUTRIDER_CONFIG is checked per pod: a port the sidecar refuses (a
    containerPort beyond 65535) is refused for that pod only, whichever pod came first."""
    config = parse_config({**POLICY, "resource_patterns": ["https://mcp.example.com/*"]})
    pods = {}
    for port in (8082, 70000):
        for resource in (None, "https://mcp.example.com/github"):
            pod = copy.deepcopy(BASE_POD)
            pod["spec"]["containers"][0]["ports"][0]["containerPort"] = port
            if resource:
                pod["metadata"]["annotations"]["outrider.dev/resource"] = resource
            pods[port, resource] = pod
    memo.clear_all()
    cold = {k: _outcome(inject(copy.deepcopy(p), ENABLED, config)) for k, p in pods.items()}
    assert [k[0] for k, o in cold.items() if o[0]] == [8082, 8082]
    assert "inbound.mcp_port" in str(cold[70000, None][3])
    for order in (list(pods), list(reversed(pods))):
        memo.clear_all()
        for key in order * 2:
            assert _outcome(inject(copy.deepcopy(pods[key]), ENABLED, config)) == cold[key], key


def test_a_bad_sidecar_block_is_refused_with_the_first_error_validate_gives() -> None:
    """The operator-only sections' first error is kept per config hash, the per-pod ones (exchange,
    egress, policy) are checked per plan: the refusal is still the first in section order."""
    import itertools
    from types import MappingProxyType

    bad = {
        "identity": {"socket": "tcp://nope"},
        "exchange": {"cache_size": "many"},
        "telemetry": {"audit": 7},
        "shutdown": {"drain_s": "x"},
    }
    for count in range(1, len(bad) + 1):
        for chosen in itertools.combinations(bad, count):
            block = {name: MappingProxyType(bad[name]) for name in chosen}
            config = WebhookConfig(sidecar=MappingProxyType(block))
            pod = copy.deepcopy(BASE_POD)
            plan = plan_egress(pod, ENABLED, None, config.plain_egress_default_policy)
            value = engine.sidecar_config(config, 8082, config.default_audience, plan, None)
            expected = engine._sidecar_refusal(value)
            assert expected is not None
            for _ in range(2):  # cold, then from the tables
                assert inject(copy.deepcopy(pod), ENABLED, config).message == expected, chosen


def test_a_refusal_is_the_same_each_time_and_a_fresh_exception() -> None:
    pod = copy.deepcopy(BASE_POD)
    pod["metadata"]["annotations"]["outrider.dev/mcp-port"] = "99999"
    messages = {inject(copy.deepcopy(pod), ENABLED, CONFIGS["native"]).message for _ in range(3)}
    assert len(messages) == 1 and "out of range" in str(messages.pop())
    metadata = pod["metadata"]
    errors = []
    for _ in range(2):
        with pytest.raises(ann.AnnotationError) as caught:
            ann.parse_pod(metadata, ())
        errors.append(caught.value)
    assert errors[0] is not errors[1] and str(errors[0]) == str(errors[1])


def test_annotation_values_of_other_types_are_not_confused() -> None:
    """1, True, 1.0 and "1" hash alike; the memo keys on the type too, so each reads as it should."""
    results = {}
    for value in ("8082", 8082, 8082.0, True, "true"):
        pod = copy.deepcopy(BASE_POD)
        pod["metadata"]["annotations"]["outrider.dev/mcp-port"] = value
        results[repr(value)] = _check(pod, ENABLED, CONFIGS["native"])
    assert results["'8082'"].injected and results["8082"].injected
    assert results["8082.0"].message == inject_cold_message(8082.0)
    assert results["True"].message == inject_cold_message(True)
    assert results["True"].message != results["'true'"].message


def inject_cold_message(value: Any) -> str | None:
    memo.clear_all()
    pod = copy.deepcopy(BASE_POD)
    pod["metadata"]["annotations"]["outrider.dev/mcp-port"] = value
    return inject(pod, ENABLED, CONFIGS["native"]).message


def test_memo_tables_are_bounded_and_keep_what_is_used() -> None:
    table: memo.Memo[int, str] = memo.Memo(3)
    for i in range(3):
        table.put(i, str(i))
    assert table.get(0) == "0"  # 0 is now the most recently used
    table.put(3, "3")
    assert len(table) == 3 and table.get(1) is None and table.get(0) == "0"
    with pytest.raises(ValueError):
        memo.Memo(0)
    for i in range(10_000):  # a stream of distinct pods never grows the engine's tables past their size
        inject(_bench_like(i % 2000 + 2000 * (i // 2000)), ENABLED, CONFIGS["native"], None, "tools")
    for table_ in memo._EVERY:
        assert len(table_) <= table_.size


# --- Hypothesis: odd shapes and types -------------------------------------------------------------

ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 70000),
    st.sampled_from(["mcp", "metrics", "8082", " 8082 ", "²", "0", "15000", "", "outrider-proxy", "true"]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "name"]), st.integers(0, 3), max_size=2),
)
PROBE = st.one_of(
    st.none(),
    st.fixed_dictionaries({"httpGet": st.fixed_dictionaries({"port": ODD}, optional={"path": ODD})}),
    st.fixed_dictionaries({"tcpSocket": st.fixed_dictionaries({"port": ODD})}),
    st.just({"exec": {"command": ["true"]}}),
    st.just({"grpc": {"port": 8082}}),
    ODD,
)
CONTAINER = st.fixed_dictionaries(
    {"name": st.sampled_from(["app", "github", "outrider-proxy", "outrider-init", "side"])},
    optional={
        "ports": st.one_of(
            ODD,
            st.lists(
                st.fixed_dictionaries(
                    {"containerPort": ODD},
                    optional={"name": ODD, "protocol": st.sampled_from(["TCP", "UDP", None, 6])},
                ),
                max_size=3,
            ),
        ),
        "readinessProbe": PROBE,
        "livenessProbe": PROBE,
        "startupProbe": PROBE,
        "env": st.one_of(ODD, st.lists(st.fixed_dictionaries({"name": ODD, "value": ODD}), max_size=2)),
        "lifecycle": st.one_of(ODD, st.just({"preStop": {"exec": {"command": ["sleep", "1"]}}})),
        "securityContext": st.one_of(
            ODD,
            st.fixed_dictionaries(
                {},
                optional={
                    "runAsUser": st.sampled_from([0, 1000, 1337, None, "1000"]),
                    "privileged": st.booleans(),
                    "allowPrivilegeEscalation": st.booleans(),
                    "capabilities": st.just({"add": ["NET_ADMIN"]}),
                },
            ),
        ),
        "volumeMounts": st.lists(
            st.fixed_dictionaries({"name": ODD, "mountPath": st.just("/x")}), max_size=2
        ),
    },
)
NAMED = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "outrider-spiffe"])}), max_size=2)
POD = st.fixed_dictionaries(
    {"spec": st.fixed_dictionaries({"containers": st.lists(CONTAINER, min_size=1, max_size=3)})}
)


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    pod = draw(POD)
    spec = pod["spec"]
    for key, values in (
        ("initContainers", st.one_of(ODD, NAMED, st.lists(CONTAINER, max_size=2))),
        ("ephemeralContainers", st.one_of(st.none(), st.lists(CONTAINER, max_size=1))),
        ("volumes", st.one_of(ODD, NAMED)),
        ("imagePullSecrets", st.one_of(ODD, st.just([{"name": "regcred"}]), NAMED)),
        ("terminationGracePeriodSeconds", ODD),
        ("hostNetwork", ODD),
        ("serviceAccountName", st.sampled_from(["sa", "", None])),
        ("securityContext", st.one_of(ODD, st.just({"runAsUser": 1000}), st.just({"fsGroup": 1337}))),
        ("dnsConfig", st.one_of(st.none(), st.just({"nameservers": ["10.0.0.10"]}))),
    ):
        if draw(st.booleans()):
            spec[key] = draw(values)
    if draw(st.booleans()):
        metadata: Any = draw(ODD)
    else:
        annotations = draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "outrider.dev/mcp-port",
                        "outrider.dev/inject",
                        "outrider.dev/egress-allow",
                        "outrider.dev/token-audience",
                        "outrider.dev/resource",
                        "outrider.dev/typo",
                        "kubectl.kubernetes.io/default-container",
                        "example.com/x",
                    ]
                ),
                st.one_of(ODD, st.sampled_from(["api.github.com:443", "https://mcp.example.com/tools/x"])),
                max_size=4,
            )
            | ODD
        )
        labels = draw(
            st.dictionaries(
                st.sampled_from(["app.kubernetes.io/name", "app", "outrider.dev/inject"]),
                st.sampled_from(["github-mcp", "x.y", "false", "true"]),
                max_size=2,
            )
        )
        metadata = {"name": "p", "labels": labels, "annotations": annotations}
        if draw(st.booleans()):
            metadata["namespace"] = draw(st.sampled_from(["tools", "other", ""]))
    if metadata is not None or draw(st.booleans()):
        pod["metadata"] = metadata
    return pod


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods(), layout=st.sampled_from(sorted(CONFIGS)), strict=st.booleans())
def test_odd_pods_get_what_empty_tables_give(pod: dict[str, Any], layout: str, strict: bool) -> None:
    labels = STRICT if strict else ENABLED
    config = CONFIGS[layout]
    result = _check(pod, labels, config)
    # and once more with the tables warm from this very pod (the second admission of a ReplicaSet)
    assert _outcome(inject(copy.deepcopy(pod), labels, config, None, "tools")) == _outcome(result)
    event("injected" if result.injected else "refused" if not result.allowed else "skipped")
    if not result.allowed:
        assert result.message and "Traceback" not in result.message
