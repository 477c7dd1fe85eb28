"""Golden injection fixtures: input manifests beside their injected output, checked five ways.

`NAME.injected.yaml` is exactly what `outrider inject` prints for `NAME.yaml` (empty when the workload
is refused); `NAME.result.yaml` records the verdict, warnings and patch.
Regenerate with `pytest tests/webhook --update-golden` (or UPDATE_GOLDEN=1) and review the YAML diff.
"""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
from webhook_support import (
    GOLDEN_DIR,
    fixture_header,
    fixture_names,
    load_fixture,
    pod_template,
    semantic_problems,
    templated_fixture_names,
)

from outrider.webhook import kubeyaml
from outrider.webhook.engine import inject
from outrider.webhook.offline import dump_all, inject_document, render

K8S_VERSION = "1.34"
NAMES = fixture_names()
# kinds outrider inject does not inject (DeploymentConfig, Rollout, Knative Service): copied as they are
TEMPLATED = templated_fixture_names()


def _dump(data: Any) -> str:
    return dump_all([data])


def _run(name: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    doc, labels, config = load_fixture(name)
    _, ns_annotations, _ = fixture_header(name)
    result = inject_document(copy.deepcopy(doc), labels, config, None, ns_annotations)
    record: dict[str, Any] = {
        "allowed": result.error is None,
        "injected": result.injected,
        "message": result.error,
        "warnings": list(result.warnings),
    }
    if doc["kind"] == "Pod":
        engine = inject(doc, labels, config, namespace_annotations=ns_annotations)
        record["patch"] = engine.patch
    return result.document, record


def _printed(name: str) -> str:
    """What `outrider inject -f NAME.yaml` prints for the fixture."""
    labels, ns_annotations, config = fixture_header(name)
    text = (GOLDEN_DIR / f"{name}.yaml").read_text()
    output, _ = render(kubeyaml.read_stream(text), labels, config, None, ns_annotations, err=io.StringIO())
    return output


def test_other_kinds_are_copied_unchanged_with_a_warning() -> None:
    others = [n for n in NAMES if n not in TEMPLATED]
    assert len(others) >= 3, others
    for name in others:
        document, record = _run(name)
        assert document == load_fixture(name)[0] and not record["injected"]
        assert _printed(name) == (GOLDEN_DIR / f"{name}.yaml").read_text()  # byte for byte
        [warning] = record["warnings"]
        assert f"kind {document['kind']} ({document['apiVersion']}) carries a pod template at" in warning


def test_there_are_enough_fixtures() -> None:
    assert len(NAMES) >= 50, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_golden(name: str, update_golden: bool) -> None:
    document, record = _run(name)
    printed = _printed(name)
    injected_path = GOLDEN_DIR / f"{name}.injected.yaml"
    result_path = GOLDEN_DIR / f"{name}.result.yaml"
    if update_golden:
        injected_path.write_text(printed)
        result_path.write_text(_dump(record))
    assert injected_path.exists(), f"no golden output for {name}; run pytest --update-golden"
    assert injected_path.read_text() == printed, f"{name}: injected output changed"
    assert (kubeyaml.load(printed) if printed else None) == document, f"{name}: printed != injected"
    assert kubeyaml.load(result_path.read_text()) == record, f"{name}: result (warnings/patch) changed"


@pytest.mark.parametrize("name", TEMPLATED)
def test_output_is_valid_kubernetes(name: str) -> None:
    document, _ = _run(name)
    if document is None:
        return  # refused: nothing is printed
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    assert semantic_problems(document) == []


@pytest.mark.parametrize("name", TEMPLATED)
def test_patch_applies_to_the_original(name: str) -> None:
    doc, labels, config = load_fixture(name)
    pod = {"metadata": pod_template(doc).get("metadata"), "spec": pod_template(doc).get("spec")}
    if doc["kind"] == "Pod":
        pod = doc
    result = inject(pod, labels, config)
    assert jsonpatch.apply_patch(pod, result.patch) == result.pod
    # Never two adds on the same missing list path (kube-apiserver would reject the second).
    add_paths = [op["path"] for op in result.patch if op["op"] == "add" and not op["path"].endswith("/-")]
    assert len(add_paths) == len(set(add_paths))


@pytest.mark.parametrize("name", TEMPLATED)
def test_injection_is_idempotent(name: str) -> None:
    doc, labels, config = load_fixture(name)
    once = inject_document(copy.deepcopy(doc), labels, config)
    if once.document is None:
        return  # refused: nothing is printed, so nothing to inject again
    twice = inject_document(copy.deepcopy(once.document), labels, config)
    assert twice.document == once.document
    if doc["kind"] == "Pod" and once.injected:
        again = inject(once.document, labels, config)
        assert again.patch == []
        assert again.allowed


@pytest.mark.parametrize("name", TEMPLATED)
def test_injected_sidecar_invariants(name: str) -> None:
    doc, labels, config = load_fixture(name)
    result = inject_document(copy.deepcopy(doc), labels, config)
    if not result.injected:
        return
    spec = pod_template(result.document)["spec"]
    status = json.loads(pod_template(result.document)["metadata"]["annotations"]["outrider.dev/status"])
    everything = {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}
    proxy = everything[(status["initContainers"] + status["containers"])[-1]]
    assert proxy["securityContext"]["runAsUser"] == 15337
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert proxy["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env["SPIFFE_ENDPOINT_SOCKET"] == "unix:///spiffe-workload-api/spire-agent.sock"
    sidecar_config = json.loads(env["OUTRIDER_CONFIG"])
    assert sidecar_config["egress"]["mode"] == status["egressMode"]
    if status["mcpPort"] is not None:
        assert sidecar_config["inbound"]["mcp_port"] == status["mcpPort"]
    [spiffe_volume] = [v for v in spec["volumes"] if v["name"] == status["volumes"][0]]
    assert spiffe_volume["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    mounted_by = [
        n
        for n, c in everything.items()
        if any(m["name"] == spiffe_volume["name"] for m in c.get("volumeMounts") or [])
    ]
    assert mounted_by == [proxy["name"]]
    assert all(m["readOnly"] for m in proxy["volumeMounts"])
    if config.native_sidecar:
        assert proxy["restartPolicy"] == "Always"
        # the proxy starts before every user init container (they run behind the capture, with the
        # proxy up), and after outrider-init, which must have set the rules first
        names = [c["name"] for c in spec["initContainers"]]
        ours = set(status["initContainers"])
        first_user = next((i for i, n in enumerate(names) if n not in ours), len(names))
        assert names.index(proxy["name"]) < first_user
        if status["egressMode"] == "capture":
            assert names.index(status["initContainers"][0]) < names.index(proxy["name"])
    if status["egressMode"] == "capture":
        init = everything[status["initContainers"][0]]
        assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    default = pod_template(result.document)["metadata"]["annotations"][
        "kubectl.kubernetes.io/default-container"
    ]
    # An app container, or the pod's own native sidecar that serves the MCP port; never one of ours.
    user_sidecars = {
        c["name"]
        for c in spec.get("initContainers", [])
        if c.get("restartPolicy") == "Always" and c["name"] not in status["initContainers"]
    }
    assert default in {c["name"] for c in spec["containers"]} | user_sidecars
    assert default != proxy["name"] and default not in status["initContainers"]
