"""Fixtures for tests against a real kube-apiserver: one control plane per session, API clients per test."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

# This folder is a package (`controlplane`) so its helpers import relatively; pytest then puts
# tests/ on sys.path, where tests/webhook/ would shadow the real `webhook` package as a namespace
# package. The repository root first keeps `import webhook` pointing at the code under test.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
from kubernetes_asyncio import client, config

from .harness import ControlPlane

_STATE: dict[str, ControlPlane] = {}


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    workdir = tmp_path_factory.mktemp("controlplane")
    t0 = time.monotonic()
    cp = ControlPlane.start(workdir)
    _STATE["cp"] = cp
    print(f"\n[controlplane] ready in {time.monotonic() - t0:.1f}s; {cp.logs_hint()}")
    try:
        yield cp
    finally:
        cp.stop()
        _STATE.pop("cp", None)


@pytest.fixture
async def api(control_plane: ControlPlane) -> AsyncIterator[client.ApiClient]:
    api_client = await config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    try:
        yield api_client
    finally:
        await api_client.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    cp = _STATE.get("cp")
    if report.failed and cp is not None:
        report.sections.append(("control plane", cp.logs_hint()))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
