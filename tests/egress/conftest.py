"""Fixtures for the egress tests: the network-namespace labs (capture and explicit) and golden updates."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from outrider.sidecar.demo.uid_access import UidAccessError

from .netlab import FETCH_VENV, POLICY, Lab, ensure_mcp_server_fetch, have_netns, lab


def _require_netns() -> None:
    reason = have_netns()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"egress netns tests must run in CI: {reason}")
        pytest.skip(f"egress netns tests cannot run here: {reason}")


@pytest.fixture(scope="module")
def capture_lab() -> Iterator[Lab]:
    _require_netns()
    config = {"egress": {"mode": "capture", "policy": POLICY, "policy_file": None, "hello_timeout_s": 1.0}}
    with lab(capture=True, sidecar_config=config) as current:
        yield current


@pytest.fixture
def bare_lab() -> Iterator[Lab]:
    """Namespaces and internet only: no rules, no sidecar (for the iptables CLI tests)."""
    _require_netns()
    with lab(capture=False, sidecar_config=None) as current:
        yield current


@pytest.fixture
def update_golden() -> bool:
    return os.environ.get("UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="session")
def mcp_server_fetch() -> str:
    """The python of a venv holding PyPI `mcp-server-fetch` (installed once into a cache)."""
    _require_netns()
    try:
        return ensure_mcp_server_fetch()
    except UidAccessError as exc:
        pytest.fail(str(exc))
    except RuntimeError as exc:
        message = f"could not install mcp-server-fetch from PyPI into {FETCH_VENV}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
