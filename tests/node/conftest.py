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
