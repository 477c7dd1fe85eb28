"""docs/install.md followed literally on the real one-node cluster, then `outrider check` on the result.

The guide's fenced blocks carry `<!-- install-step: NAME -->` comments (invisible when rendered). The
test reads them from the guide itself and, in the guide's order, runs each shell block with bash
(`set -euo pipefail`) or writes each file block where its first line says, in a working directory
holding the checkout as `outrider/`, as the guide's prerequisites say. The only changes to the text
are the ones the guide tells the operator to make (SUBSTITUTIONS: the registry, the identity
provider's URLs, the registry credentials); each must still occur in the guide. Every block must be
named in STEPS, so a new block fails here until it is run or its node difference is written down.

Where this node provides something differently from a user's cluster (NODE_DIFFERS; also
docs/node.md): no registry (`make images` imports straight into the node's containerd), no Docker,
SPIRE as host processes instead of the Helm charts (their settings are checked instead), and the
project's dev IdP as a pod instead of Keycloak/Entra ID/Okta (step 4 has no commands; the dev IdP
is registered the way the guide registers Keycloak: the sidecar's SPIFFE ID as a token-exchange
client allowed the downstream audience, SPIRE's JWT keys from its own SVID's bundle).

Then: the MCP server deployed as the guide says is injected, Ready, and answers an authenticated MCP
call through the Service and the sidecar with an exchanged token; `outrider check` passes on the
healthy install and names each fault injected into it (issue 15 against a real cluster).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import Images, Names, idp_objects, rollout
from tests.cluster.kube import Kube, eventually
from tests.node.conftest import REPO, Node
from tests.node.verify import (
    alice_calls_whoami,
    check_result,
    live_pods,
    node_images,
    not_passing,
    outrider_check,
    start_client,
)

pytestmark = [pytest.mark.node, pytest.mark.root, pytest.mark.slow]

GUIDE = REPO / "docs" / "install.md"
MARKER = re.compile(r"<!-- install-step: ([a-z0-9-]+) -->")
RUN, FILE, NODE = "run", "file", "node differs"

# what the test does with each block of the guide, in the guide's order
STEPS: dict[str, tuple[str, str]] = {
    "build-images": (RUN, ""),
    "push-images": (
        NODE,
        "no registry is reachable here: `make images` has already imported the three images into the "
        "node's containerd, where `imagePullPolicy: IfNotPresent` (the guide's default) finds them",
    ),
    "docker-images": (NODE, "the Docker alternative to the two blocks above; there is no Docker engine here"),
    "spire": (
        NODE,
        "SPIRE server, agent, SPIFFE CSI driver and spire-controller-manager run as host processes of "
        "`make node` (docs/node.md), not from the Helm charts; test_spire_settings_the_guide_relies_on "
        "checks the guide's table of settings on them",
    ),
    "clusterspiffeid": (RUN, ""),
    "overlay": (FILE, ""),
    "config": (FILE, ""),
    "install": (RUN, ""),
    "namespace": (RUN, ""),
    "mcp-server": (FILE, ""),
    "deploy": (RUN, ""),
    "verify": (RUN, ""),
}
# step 4 (the identity provider) has no commands: the dev IdP stand-in is deployed before this block
IDP_BEFORE = "namespace"
GUIDE_NS, APP = "tools", "weather"
RESOURCE = "https://weather.tools.mcp.example.com/mcp"  # the guide's resource_template for this pod
AUDIENCE = "https://api.example.com"  # the guide's default_audience


@dataclass(frozen=True)
class Block:
    name: str
    lang: str
    text: str
    line: int


def guide_blocks(text: str) -> list[Block]:
    """Every fenced block of the guide, each with the install-step name on the line before it.

    The guide ends at the `# Reference` heading: what follows (example output, file listings) is not
    a step an operator runs.
    """
    blocks: list[Block] = []
    lines = text.split("\n# Reference\n", 1)[0].splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        start, lang = i, lines[i][3:].strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"docs/install.md:{start + 1}: a fenced block is never closed"
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = MARKER.fullmatch(before.strip())
        assert mark, (
            f"docs/install.md:{start + 1}: a fenced block without an `<!-- install-step: NAME -->` line "
            "before it (name it, and add it to STEPS in tests/node/test_install_guide.py)"
        )
        blocks.append(Block(mark.group(1), lang, "\n".join(lines[start + 1 : end]) + "\n", start + 1))
        i = end + 1
    return blocks


def substitutions(idp_url: str, version: str) -> list[tuple[str, str]]:
    """(what the guide says, what this node uses): only the replacements the guide asks for."""
    return [
        # "Replace the example names (registry.example.com/platform, ...)": make images' default
        # repository, the names the images have in the node's containerd
        ("registry.example.com/platform", "localhost/outrider-dev"),
        ("IMAGE_TAG=0.1.0", f"IMAGE_TAG={version}"),
        ("newTag: 0.1.0", f"newTag: {version}"),
        ("/outrider:0.1.0", f"/outrider:{version}"),
        ("/mcp-example-server:0.1.0", f"/mcp-example-server:{version}"),
        # the identity provider's URLs (the Keycloak realm's token endpoint, then its issuer)
        ("https://keycloak.example.com/realms/mcp/protocol/openid-connect/token", f"{idp_url}/token"),
        ("https://keycloak.example.com/realms/mcp", idp_url),
    ]


def substitute(text: str, subs: list[tuple[str, str]]) -> str:
    for old, new in subs:
        text = text.replace(old, new)
    return text


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert match
    return match.group(1)


@dataclass
class Install:
    kube: Kube
    workdir: Path
    env: dict[str, str]
    outputs: dict[str, str]
    images: Images
    names: Names
    seconds: dict[str, float]

    def sh(self, script: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def check(self, *args: str) -> tuple[int, dict[str, Any]]:
        """`outrider check -o json` as the operator runs it: its exit status and its report."""
        return outrider_check(self.env, self.workdir, *args)


def _uninstall(kube: Kube, names: Names) -> None:
    """Remove what the guide and this test installed, so later tests meet the node as it was."""
    for ns in (GUIDE_NS, names.idp, names.client, names.ns("escaped")):
        kube.delete_namespace(ns)
    kube.run("delete", "clusterspiffeid", f"{names.idp}-idp", "--ignore-not-found", check=False)
    # the objects of manifests/base, whichever overlay installed them (this guide's, or make node-e2e's)
    kube.run("delete", "-k", str(REPO / "manifests" / "base"), "--ignore-not-found", check=False, timeout=300)
    kube.run(
        "delete",
        "-f",
        str(REPO / "manifests/examples/spire-clusterspiffeid.yaml"),
        "--ignore-not-found",
        check=False,
    )
    for ns in (GUIDE_NS, names.idp, names.client, names.ns("escaped"), "outrider-system"):
        kube.run("wait", "--for=delete", f"namespace/{ns}", "--timeout=180s", check=False, timeout=200)


@pytest.fixture(scope="module")
def install(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    """docs/install.md, block by block, on the node; torn down at the end of the module."""
    kube = Kube(node.kubectl, str(node.cfg.kubeconfig))
    names = Names(run=f"guide{secrets.token_hex(2)}")
    workdir = tmp_path_factory.mktemp("install-guide")
    (workdir / "outrider").symlink_to(REPO)  # "a checkout of this repository as outrider/"
    # a previous run that died half-way must not leave the guide's fixed names behind
    _uninstall(kube, names)
    env = {
        **os.environ,
        "PATH": os.pathsep.join(
            [str(Path(node.kubectl).parent), str(REPO / ".venv" / "bin"), os.environ.get("PATH", "")]
        ),
        "KUBECONFIG": str(node.cfg.kubeconfig),
        # the operator's registry credentials (the node has no registry: the Secret is only created)
        "REGISTRY_USER": "node-test",
        "REGISTRY_PASSWORD": secrets.token_hex(8),
    }
    text = GUIDE.read_text()
    subs = substitutions(names.idp_url, project_version())
    for old, _ in subs:
        assert old in text, f"docs/install.md no longer says {old!r}: update SUBSTITUTIONS in this test"
    blocks = guide_blocks(text)
    assert [b.name for b in blocks] == list(STEPS), (
        "the guide's install-step blocks differ from STEPS (add, remove or reorder both):\n"
        f"guide: {[b.name for b in blocks]}\nSTEPS: {list(STEPS)}"
    )
    images = node_images()
    result = Install(kube, workdir, env, {}, images, names, {})
    try:
        for block in blocks:
            what, why = STEPS[block.name]
            if block.name == IDP_BEFORE:
                t0 = time.monotonic()
                kube.apply(
                    # the IdP only (idp_objects also holds an OTLP receiver, not needed here)
                    o
                    for o in idp_objects(
                        names, images, [f"spiffe://cluster.local/ns/{GUIDE_NS}/sa/{APP}"], AUDIENCE
                    )
                    if o["metadata"]["name"] != "otlp"
                )
                rollout(kube, names.idp, "idp")
                result.seconds["idp (step 4 stand-in)"] = time.monotonic() - t0
            body = substitute(block.text, subs)
            if what == NODE:
                print(f"[install guide] {block.name} (docs/install.md:{block.line}): not run: {why}")
                continue
            if what == FILE:
                first = body.splitlines()[0]
                assert first.startswith("# "), (
                    f"docs/install.md:{block.line}: a file block names its file first"
                )
                path = workdir / first[2:].split(":")[0].strip()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(body)
                print(f"[install guide] {block.name}: wrote {path.relative_to(workdir)}")
                continue
            assert block.lang == "sh", f"docs/install.md:{block.line}: a run block must be ```sh"
            t0 = time.monotonic()
            out = result.sh("set -euo pipefail\n" + body, timeout=3600)
            result.seconds[block.name] = time.monotonic() - t0
            result.outputs[block.name] = out.stdout
            print(
                f"[install guide] {block.name}: exit {out.returncode} in {result.seconds[block.name]:.0f} s"
            )
            assert out.returncode == 0, (
                f"docs/install.md:{block.line} ({block.name}) failed when followed literally "
                f"(exit {out.returncode}):\n--- block ---\n{body}--- stdout ---\n{out.stdout[-3000:]}"
                f"\n--- stderr ---\n{out.stderr[-3000:]}"
            )
        print(
            "[install guide] seconds per step: "
            + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items())
        )
        yield result
    finally:
        if os.environ.get("OUTRIDER_GUIDE_KEEP") != "1":
            _uninstall(kube, names)


def _pods(kube: Kube, selector: str, ns: str = GUIDE_NS) -> list[dict[str, Any]]:
    return live_pods(kube, ns, selector)


def test_spire_settings_the_guide_relies_on(node: Node) -> None:
    """The guide's SPIRE table, checked on the node's SPIRE (host processes instead of the charts)."""
    assert node.cfg.trust_domain == "cluster.local"  # the guide's trust_domain
    assert node.k("get", "csidriver", "csi.spiffe.io", "-o", "name").strip().endswith("/csi.spiffe.io")
    assert node.cfg.agent_socket.name == "spire-agent.sock" and node.cfg.agent_socket.is_socket(), (
        "the agent's Workload API socket is not named spire-agent.sock, the name the guide promises"
    )


def test_the_guide_installs_an_injected_mcp_server(install: Install) -> None:
    status = json.loads(install.outputs["deploy"].strip().splitlines()[-1])
    assert status["resource"] == RESOURCE, status
    assert status["spiffeId"] == f"spiffe://cluster.local/ns/{GUIDE_NS}/sa/{APP}", status
    assert status.get("imagePullSecrets") == ["outrider-registry"], status
    (pod,) = _pods(install.kube, f"app.kubernetes.io/name={APP}")
    inits = [c["name"] for c in pod["spec"]["initContainers"]]
    assert inits[:2] == ["outrider-init", "outrider-proxy"], inits
    conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert conditions.get("Ready") == "True", pod["status"]
    readyz = install.outputs["verify"]
    assert "NOT READY" not in readyz and "identity: ok" in readyz and "inbound: ok" in readyz, readyz
    assert "Status check results are √" in readyz, readyz  # `outrider check` in the same block


def test_an_authenticated_call_through_the_service_and_the_sidecar(install: Install) -> None:
    client = start_client(install.kube, install.names.client, install.images)
    alice_calls_whoami(
        install.kube,
        client,
        install.names,
        f"http://{APP}.{GUIDE_NS}.svc.cluster.local:8080/mcp",
        RESOURCE,
        AUDIENCE,
        actor=f"spiffe://cluster.local/ns/{GUIDE_NS}/sa/{APP}",
    )


def test_outrider_check_passes_on_the_installed_node_and_names_each_fault(install: Install) -> None:
    kube, names = install.kube, install.names
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    code, report = install.check()
    timings["healthy"] = time.monotonic() - t0
    assert code == 0 and report["success"], not_passing(report)
    assert not_passing(report) == [], "a healthy install should pass every check"

    # 1. the webhook scaled to 0: no ready endpoints, the dry-run pod cannot be admitted
    kube.run("-n", "outrider-system", "scale", "deploy/outrider-webhook", "--replicas=0")
    try:
        # gone, not only terminating: a stopping replica still answers admissions for its
        # --shutdown-delay (5 s) while the Service moves away from it
        eventually(
            lambda: not kube.pods("outrider-system", "app.kubernetes.io/name=outrider-webhook"),
            "the webhook pods to go",
            within=120,
            every=2,
        )

        def down() -> dict[str, Any] | None:
            code, report = install.check()
            endpoints = check_result(report, "Service outrider-webhook has ready endpoints")
            return report if code == 1 and endpoints["status"] == "fail" else None

        report = eventually(down, "check to see the webhook down", within=90, every=3)
        assert check_result(report, "a dry-run pod in an opted-in namespace is injected")["status"] == "fail"
    finally:
        kube.run("-n", "outrider-system", "scale", "deploy/outrider-webhook", "--replicas=2")
        kube.run(
            "-n",
            "outrider-system",
            "rollout",
            "status",
            "deploy/outrider-webhook",
            "--timeout=240s",
            timeout=260,
        )

    # 2. a stale pod: the configuration changes, the running pod keeps the older config hash
    config = install.workdir / "outrider-install" / "config.yaml"
    original = config.read_text()
    assert "allow: [api.example.com:443]" in original
    config.write_text(
        original.replace("allow: [api.example.com:443]", "allow: [api.example.com:443, x.example.com:443]")
    )
    try:
        assert install.sh("kubectl apply --server-side -k outrider-install").returncode == 0
        code, report = install.check()
        stale = check_result(report, "pods run the current configuration")
        (pod,) = _pods(kube, f"app.kubernetes.io/name={APP}")
        assert stale["status"] == "warn", stale
        assert f"{GUIDE_NS}/{pod['metadata']['name']}" in stale["details"], stale
        assert f"kubectl -n {GUIDE_NS} rollout restart deployment/{APP}" in stale["details"], stale
    finally:
        config.write_text(original)
        assert install.sh("kubectl apply --server-side -k outrider-install").returncode == 0

    # 3. a pod that escaped injection: created before its namespace opted in
    escaped = names.ns("escaped")
    kube.apply(
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": escaped}},
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "early", "namespace": escaped},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "app",
                            "image": install.images.mcp,
                            "imagePullPolicy": "Never",
                            "command": ["python", "-c", "import time; time.sleep(10**9)"],
                        }
                    ],
                },
            },
        ]
    )
    kube.run("label", "namespace", escaped, "outrider.dev/inject=enabled")
    code, report = install.check()
    escapes = check_result(report, "pods in opted-in namespaces are injected")
    assert escapes["status"] == "warn" and f"{escaped}/early" in escapes["details"], escapes
    assert any(d.startswith(f"kubectl -n {escaped} delete pod early") for d in escapes["details"]), escapes
    kube.delete_namespace(escaped)

    # 4. an outrider-proxy that is not Ready: a new pod while the identity provider is down
    kube.run("-n", names.idp, "scale", "deploy/idp", "--replicas=0")
    fault = f"{APP}-unready"
    try:
        # gone, not only terminating: kube-proxy still routes to a terminating pod when no other is ready
        eventually(lambda: not kube.pods(names.idp, "app=idp"), "the IdP pod to go", within=120, every=2)
        (pod,) = _pods(kube, f"app.kubernetes.io/name={APP}")
        template = kube.json("get", "deploy", APP, "-n", GUIDE_NS)["spec"]["template"]
        template["metadata"]["labels"] = {"app.kubernetes.io/name": fault}
        template["metadata"].pop("creationTimestamp", None)
        kube.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": fault, "namespace": GUIDE_NS, **template["metadata"]},
                    "spec": template["spec"],
                }
            ]
        )

        def proxy_started_unready() -> bool:
            p = kube.json("get", "pod", fault, "-n", GUIDE_NS)
            statuses = {s["name"]: s for s in p["status"].get("initContainerStatuses", [])}
            proxy = statuses.get("outrider-proxy", {})
            return (
                p["status"].get("phase") == "Running"
                and bool(proxy.get("started"))
                and not proxy.get("ready")
            )

        eventually(
            proxy_started_unready,
            f"{fault} Running with outrider-proxy started, not Ready",
            within=180,
            every=2,
        )
        code, report = install.check()
        ready = check_result(report, "outrider-proxy containers are ready")
        assert code == 1 and ready["status"] == "fail", ready
        detail = next((d for d in ready["details"] if d.startswith(f"{GUIDE_NS}/{fault}:")), "")
        assert "inbound: NOT READY" in detail and "issuer signing keys not loaded" in detail, ready
        assert all(not d.startswith(f"{GUIDE_NS}/{pod['metadata']['name']}:") for d in ready["details"]), (
            ready
        )
    finally:
        kube.run("-n", names.idp, "scale", "deploy/idp", "--replicas=1")
        kube.run("-n", GUIDE_NS, "delete", "pod", fault, "--ignore-not-found", "--wait=false", check=False)
    rollout(kube, names.idp, "idp")
    print(f"\n[outrider check] healthy run {timings['healthy']:.1f} s")
