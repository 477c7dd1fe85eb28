"""Fixtures for the identity tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    # unix socket paths must stay short (108 bytes); pytest's tmp_path usually is
    return tmp_path
