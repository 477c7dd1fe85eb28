"""The engine's fast paths give exactly what the generic paths give: the JSON Patch emitted while
injecting equals `webhook.patch.diff(original, injected)`, and `encode_result` equals `encode_response`."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from webhook_support import load_fixture, pod_template, templated_fixture_names

from outrider.webhook import admission
from outrider.webhook.annotations import EGRESS_MODE_LABEL
from outrider.webhook.config import parse_config
from outrider.webhook.egress import plan_egress_cached
from outrider.webhook.engine import _sidecar_config_json, inject, sidecar_config
from outrider.webhook.patch import diff

ENABLED = {"outrider.dev/inject": "enabled"}
CONFIGS = {
    "native": parse_config({}),
    "classic": parse_config({"native_sidecar": False}),
}
POD: dict[str, Any] = {
    "metadata": {"name": "p", "annotations": {"outrider.dev/mcp-port": "8080"}},
    "spec": {
        "initContainers": [{"name": "setup", "image": "busybox"}],
        "containers": [
            {
                "name": "app",
                "image": "example/app",
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/r", "port": 8080}},
                "livenessProbe": {"tcpSocket": {"port": 8080}},
            },
            {"name": "other", "image": "example/other"},
        ],
        "volumes": [{"name": "data", "emptyDir": {}}],
    },
}


def _shapes() -> list[tuple[str, dict[str, Any]]]:
    """The base pod with each list absent, null, empty, holding an unnamed or non-object entry."""
    shapes: list[tuple[str, dict[str, Any]]] = [("base", POD)]
    for key in ("initContainers", "volumes"):
        for label, value in (
            ("absent", None),
            ("null", "null"),
            ("empty", []),
            ("unnamed", [{"image": "x"}]),
            ("scalar", ["x"]),
            ("two", [{"name": "a"}, {"name": "b"}]),
        ):
            pod = copy.deepcopy(POD)
            if value is None:
                del pod["spec"][key]
            else:
                pod["spec"][key] = None if value == "null" else value
            shapes.append((f"{key}-{label}", pod))
    no_meta = copy.deepcopy(POD)
    del no_meta["metadata"]
    shapes.append(("no-metadata", no_meta))
    no_ann = copy.deepcopy(POD)
    del no_ann["metadata"]["annotations"]
    shapes.append(("no-annotations", no_ann))
    explicit = copy.deepcopy(POD)
    explicit["metadata"]["annotations"]["outrider.dev/egress-mode"] = "explicit"
    shapes.append(("explicit", explicit))
    return shapes


@pytest.mark.parametrize("layout", sorted(CONFIGS))
@pytest.mark.parametrize(("label", "pod"), _shapes(), ids=[s[0] for s in _shapes()])
def test_emitted_patch_is_the_diff(label: str, pod: dict[str, Any], layout: str) -> None:
    before = copy.deepcopy(pod)
    result = inject(pod, ENABLED, CONFIGS[layout], None, "tools")
    assert pod == before, "the engine changed its input"
    if result.injected:
        assert result.patch == diff(pod, result.pod), label
    encoded = admission.encode_response(admission.answer("u", result)["response"])
    assert admission.encode_result(result) == encoded


@pytest.mark.parametrize("name", templated_fixture_names())
def test_golden_fixture_patch_is_the_diff(name: str) -> None:
    doc, labels, config = load_fixture(name)
    pod = pod_template(doc)
    result = inject(pod, labels, config)
    assert result.patch == diff(pod, result.pod)
    encoded = admission.encode_response(admission.answer("u", result)["response"])
    assert admission.encode_result(result) == encoded


@pytest.mark.parametrize(
    "block",
    [
        {},
        {"inbound": {"max_body_bytes": 1024, "mcp_port": 1}},
        {"inbound": {"leeway_s": 0.25}, "telemetry": {"background": False}},
        {
            "exchange": {
                "audience": "x",
                "token_endpoint": "https://idp.example/token",
                "issuer": "https://idp.example",
            }
        },
    ],
)
@pytest.mark.parametrize("port", [None, 8080, 9000])
@pytest.mark.parametrize("audience", [None, "api://a"])
def test_cached_sidecar_config_text_is_the_plain_json(
    block: dict[str, Any], port: int | None, audience: str | None
) -> None:
    config = parse_config({"sidecar": block})
    pod = copy.deepcopy(POD)
    plan = plan_egress_cached(pod, ENABLED, None, config.plain_egress_default_policy)
    expected = json.dumps(sidecar_config(config, port, audience, plan), sort_keys=True, separators=(",", ":"))
    for _ in range(2):  # cold, then from the caches
        assert _sidecar_config_json(config, port, audience, plan) == expected


@pytest.mark.parametrize("layout", sorted(CONFIGS))
def test_explicit_mode_proxies_every_app_container_even_after_one_that_sets_its_own(layout: str) -> None:
    """Explicit egress mode sends apps through the sidecar only by their proxy variables. A container
    that sets one itself keeps its value (and is warned about); every other variable, and every
    container after it, still gets Outrider's: a container left without them would go around the
    egress policy."""
    pod = copy.deepcopy(POD)
    pod["spec"]["containers"][0]["env"] = [{"name": "HTTPS_PROXY", "value": "http://elsewhere:3128"}]
    labels = {**ENABLED, EGRESS_MODE_LABEL: "explicit"}
    result = inject(pod, labels, CONFIGS[layout], None, "tools")
    assert result.injected
    assert (
        result.warnings.count("container app sets HTTPS_PROXY itself; Outrider's value is not applied") == 1
    )
    env = {
        c["name"]: {e["name"]: e.get("value") for e in c.get("env", [])}
        for c in result.pod["spec"]["containers"]
    }
    names = {f(n) for n in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY") for f in (str.upper, str.lower)}
    assert env["app"]["HTTPS_PROXY"] == "http://elsewhere:3128"
    assert names <= set(env["app"]) and names <= set(env["other"])
    assert env["other"]["HTTPS_PROXY"] == env["app"]["HTTP_PROXY"] != "http://elsewhere:3128"
    assert pod["spec"]["containers"][0]["env"] == [{"name": "HTTPS_PROXY", "value": "http://elsewhere:3128"}]
    assert "env" not in pod["spec"]["containers"][1], "the engine changed its input"
    assert result.patch == diff(pod, result.pod)


def test_the_patch_is_base64_encoded_by_the_simd_encoder_with_the_standard_bytes() -> None:
    # the answer's base64 is the largest piece of its encoding (~12-14 us for a ~4 KiB patch with
    # binascii); pybase64 gives the same RFC 4648 bytes in ~1 us
    import binascii

    import pybase64

    assert admission.b64encode is pybase64.b64encode
    for size in (*range(0, 70), 4059, 4060, 4061):
        data = bytes((i * 37 + size) % 256 for i in range(size))
        assert admission.b64encode(data) == binascii.b2a_base64(data, newline=False), size
    result = inject(copy.deepcopy(POD), ENABLED, CONFIGS["native"], None, "tools")
    patch = admission.dumps(result.patch)
    encoded = admission.encode_result(result)
    assert b'"patch":"' + binascii.b2a_base64(patch, newline=False) + b'"}' in encoded
