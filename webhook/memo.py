"""Bounded least-recently-used tables for the webhook's pure computations (plans, config text, checks).

Only results of pure functions go in, keyed on every input they read; a full table drops its
least recently used entry, so a stream of distinct pods never grows memory or flushes hot entries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """At most `size` entries; `get` marks an entry as recently used."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a Memo holds at least one entry")
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
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
