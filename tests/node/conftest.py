"""Fixtures for the real one-node cluster: brought up through `python -m localnode up` when needed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from localnode import host
from localnode.config import K8S_VERSION, NodeConfig, from_env

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Node:
    cfg: NodeConfig
    kubectl: str
    was_up: bool  # the node ran before this session (then the session leaves it up)
    before: host.HostState | None  # the host before this session brought the node up

    def k(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        out = subprocess.run(
            [self.kubectl, f"--kubeconfig={self.cfg.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
            timeout=180,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args[:4])} failed: {out.stderr.strip()[-1500:]}")
        return out.stdout


def localnode(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localnode", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )


# What `python -m localnode up` builds when it is missing (scripts/build-node.sh, scripts/build-images.sh).
NODE_BINARIES = ("kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl")
ADDON_GLOBS = (
    "coredns-*/bin/coredns",
    "spiffe-csi-driver-*/bin/spiffe-csi-driver",
    "spire-controller-manager-*/bin/spire-controller-manager",
)
# The first node test's timeout when those parts are not built yet: its setup brings the node up, and
# on a fresh machine that means compiling them first (~25 min at 2 cores, longer under load).
COLD_SETUP_TIMEOUT_S = 3600


def missing_node_parts(cfg: NodeConfig) -> list[str]:
    """The parts `localnode up` would have to build first (an empty list once they are cached)."""
    k8s = cfg.cache_dir / f"kubernetes-{K8S_VERSION}" / "bin"
    missing = [name for name in NODE_BINARIES if not (k8s / name).is_file()]
    missing += [g.split("/")[0].rstrip("-*") for g in ADDON_GLOBS if not any(cfg.cache_dir.glob(g))]
    if not cfg.images_dir.is_dir() or not any(cfg.images_dir.glob("*.tar")):
        missing.append("images")
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a cold cache the first test that brings the node up gets COLD_SETUP_TIMEOUT_S, not 600 s.

    `make test` builds these parts before the suite; a direct `pytest -m node tests/node` on a fresh
    machine builds them in the session fixture, which counts against its first test's timeout."""
    if os.geteuid() != 0:
        return
    first = next((item for item in items if "node" in getattr(item, "fixturenames", ())), None)
    if first is None:
        return
    missing = missing_node_parts(from_env())
    if missing:
        print(
            f"[node] not built yet: {', '.join(missing)}; the first node test ({first.name}) may take up to "
            f"{COLD_SETUP_TIMEOUT_S} s while they are built"
        )
        first.add_marker(pytest.mark.timeout(COLD_SETUP_TIMEOUT_S))


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    if os.geteuid() != 0:
        print("SKIP node tests: the one-node cluster needs root (kubelet, containerd, CNI, iptables)")
        pytest.skip("the one-node cluster needs root (kubelet, containerd, CNI, iptables)")
    cfg = from_env()
    was_up = localnode("status").returncode == 0
    before = None if was_up else host.snapshot()
    res = localnode("up")
    if res.returncode != 0:
        pytest.fail(f"python -m localnode up failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    kubectl = str(cfg.cache_dir / f"kubernetes-{K8S_VERSION}" / "bin" / "kubectl")
    yield Node(cfg, kubectl, was_up, before)
