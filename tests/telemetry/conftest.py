"""Fixtures for the telemetry tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import Harness, make_harness


@pytest.fixture(params=[False, True], ids=["inline", "background"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Every observer test runs with recording on the caller's thread and on the worker thread."""
    h = make_harness(background=request.param)
    yield h
    h.observer.worker.close()
