"""Fixtures for the telemetry tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import Harness, make_harness


@pytest.fixture
def harness() -> Iterator[Harness]:
    yield make_harness()
