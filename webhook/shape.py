"""Tolerant readers for objects users send: a field of the wrong type reads as empty, never crashes.

The engine, the strict rules and offline inject judge user-supplied pods through these.
"""

from __future__ import annotations

from typing import Any


def as_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
