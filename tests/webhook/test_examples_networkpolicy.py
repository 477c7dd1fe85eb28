"""The explicit-mode example's NetworkPolicy admits callers only on the sidecar's authenticated port and
its Service targets that port, matching what the webhook injects (the apiserver test applies it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from outrider.webhook import annotations as ann
from outrider.webhook import engine
from outrider.webhook.config import WebhookConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "explicit-mode.yaml"


def test_explicit_mode_example_only_lets_callers_reach_15006() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d}
    policy = docs["NetworkPolicy"]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ports = [p for rule in policy["ingress"] for p in rule["ports"]]
    assert ports == [{"protocol": "TCP", "port": ann.INBOUND_PORT}]
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert ("UDP", 53) in egress_ports and ("TCP", 53) in egress_ports
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == engine.INBOUND_PORT_NAME
    assert docs["Namespace"]["metadata"]["labels"][ann.EGRESS_MODE_LABEL] == "explicit"
    # The injected pod really is in explicit mode (no init container) and names the port that way.
    deployment = docs["Deployment"]
    template = deployment["spec"]["template"]
    pod = {"metadata": {**template["metadata"], "namespace": "mcp-explicit"}, "spec": template["spec"]}
    result = engine.inject(pod, docs["Namespace"]["metadata"]["labels"], WebhookConfig())
    assert result.injected and "outrider-init" not in str(result.pod["spec"].get("initContainers"))
    proxy = next(c for c in result.pod["spec"]["initContainers"] if c["name"] == "outrider-proxy")
    assert {"name": engine.INBOUND_PORT_NAME, "containerPort": ann.INBOUND_PORT, "protocol": "TCP"} in proxy[
        "ports"
    ]
