"""Fixtures for the webhook tests: the golden-file switch, generated certs and a running webhook."""

from __future__ import annotations

import os

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
