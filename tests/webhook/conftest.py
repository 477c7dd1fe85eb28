"""Fixtures for the webhook tests: the golden-file switch, generated certs and a running webhook."""

from __future__ import annotations

import os
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/testdata/inject/*.injected.yaml and *.result.yaml from the engine",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    # The option only exists when this conftest is loaded at start-up; UPDATE_GOLDEN=1 always works.
    try:
        flag = bool(request.config.getoption("--update-golden"))
    except ValueError:
        flag = False
    return flag or os.environ.get("UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from outrider.webhook.certs import DEFAULT_DNS_NAMES, write_certs

    out = tmp_path_factory.mktemp("certs")
    write_certs(out, DEFAULT_DNS_NAMES)
    return out


@pytest.fixture(scope="module")
def webhook_server(cert_dir: Any) -> Any:
    from webhook_support import ThreadedWebhook

    server = ThreadedWebhook(cert_dir, max_body=256 * 1024)
    yield server
    server.close()
