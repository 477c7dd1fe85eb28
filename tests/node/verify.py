"""What the node tests check on an installed Outrider, whoever installed it (the guide's kustomize, Helm).

An MCP call by alice through a Service with an exchanged token, `outrider check -o json` as an operator
runs it, the image names `make images` loads. Shared by test_install_guide.py and test_helm_chart.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.cluster.conftest import Images, Names, run_script
from tests.cluster.kube import Kube
from tests.node.conftest import REPO


def node_images() -> Images:
    """The names `make images` gives the images it loads into the node's containerd."""
    out = subprocess.run(
        [str(REPO / "scripts" / "build-images.sh"), "names"], capture_output=True, text=True, check=True
    ).stdout
    names = dict(line.split("=", 1) for line in out.split())
    return Images(
        sidecar=names["sidecar"], webhook=names["webhook"], mcp=names["mcp"], testkit=names["testkit"]
    )


def live_pods(kube: Kube, namespace: str, selector: str) -> list[dict[str, Any]]:
    """The pods a selector matches that are not being deleted."""
    return [p for p in kube.pods(namespace, selector) if not p["metadata"].get("deletionTimestamp")]


def outrider_check(
    env: Mapping[str, str], cwd: Path, *args: str, timeout: float = 180
) -> tuple[int, dict[str, Any]]:
    """`outrider check -o json ARGS` as the operator runs it: its exit status and its report."""
    out = subprocess.run(
        ["outrider", "check", "-o", "json", *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        report = json.loads(out.stdout)
    except ValueError:
        raise AssertionError(
            f"outrider check printed no JSON (exit {out.returncode}):\n{out.stderr}"
        ) from None
    return out.returncode, report


def check_result(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The one check whose name starts with `prefix`."""
    hits = [c for c in report["checks"] if c["name"].startswith(prefix)]
    assert len(hits) == 1, f"no single check named {prefix!r} in {[c['name'] for c in report['checks']]}"
    return hits[0]


def not_passing(report: dict[str, Any]) -> list[str]:
    return [
        f"{c['status']} {c['name']}: {c['message']} {c.get('details')}"
        for c in report["checks"]
        if c["status"] != "pass"
    ]


def start_client(kube: Kube, namespace: str, images: Images) -> tuple[str, str, str]:
    """A plain (never injected) pod that runs pod_scripts/mcp_client.py: (namespace, pod, container)."""
    kube.apply(
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "client", "namespace": namespace},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "client",
                            "image": images.mcp,
                            "imagePullPolicy": "Never",
                            "command": ["python", "-c", "import time; time.sleep(10**9)"],
                        }
                    ],
                },
            },
        ]
    )
    kube.run("wait", "-n", namespace, "--for=condition=Ready", "pod/client", "--timeout=120s", timeout=150)
    return namespace, "client", "client"


def alice_calls_whoami(
    kube: Kube,
    client: tuple[str, str, str],
    names: Names,
    url: str,
    resource: str,
    audience: str,
    actor: str,
) -> dict[str, Any]:
    """alice calls `whoami` through `url` with a token for `resource`; the server must see an exchanged
    token (sub alice, aud `audience`, act `actor` = the sidecar's SPIFFE ID), and a token for another
    resource must get 401. Returns the claims the MCP server saw."""
    result = run_script(
        kube,
        client,
        "mcp_client.py",
        "call",
        url,
        "whoami",
        "{}",
        f"--idp={names.idp_url}",
        f"--resource={resource}",
    )
    assert result.get("ok"), f"alice's call through {url} failed: {result}"
    content = result["result"]
    seen = content.get("structuredContent") or json.loads(content["content"][0]["text"])
    seen = seen.get("result", seen)
    claims: dict[str, Any] = seen.get("claims") or {}
    assert claims.get("sub") == "alice" and claims.get("aud") in (audience, [audience]), claims
    assert (claims.get("act") or {}).get("sub") == actor, claims
    other = resource.replace("://", "://other-", 1)
    refused = run_script(
        kube, client, "mcp_client.py", "status", url, f"--idp={names.idp_url}", f"--resource={other}"
    )
    assert refused.get("status") == 401, f"a token for another server's resource was accepted: {refused}"
    return claims
