"""Bounded least-recently-used tables for the webhook's pure computations (plans, config text, checks).

Only results of pure functions go in, keyed on every input they read; a full table drops its
least recently used entry, so a stream of distinct pods never grows memory or flushes hot entries.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_EVERY: weakref.WeakSet[Memo[Any, Any]] = weakref.WeakSet()


def clear_all() -> None:
    """Empty every table (tests compare answers from cold tables with answers from warm ones)."""
    for memo in list(_EVERY):
        memo.clear()


class Memo(Generic[K, V]):
    """At most `size` entries; `get` marks an entry as recently used."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a Memo holds at least one entry")
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        _EVERY.add(self)

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is not None:
            try:  # noqa: SIM105 - no context manager object on every hit
                self._entries.move_to_end(key)
            except KeyError:  # evicted by another thread in between: the answer is still correct
                pass
        return found

    def put(self, key: K, value: V) -> V:
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        if len(entries) > self.size:
            entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
