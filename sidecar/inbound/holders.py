"""How many entries each holder has in a bounded cache, so that a full cache takes from the holder
with the most (the session table per caller, the DPoP replay cache per proof key): one caller
filling the cache with their own entries then only ever pushes out their own.
"""

from __future__ import annotations


class HolderCounts:
    """Holders by the number of entries they hold; O(1) per change and per look at the largest."""

    __slots__ = ("_by_count", "most")

    def __init__(self) -> None:
        # n -> the holders holding n entries, in the order they reached n
        self._by_count: dict[int, dict[str, None]] = {}
        self.most = 0  # the largest count anyone holds (0: nobody holds anything)

    def moved(self, holder: str, before: int, after: int) -> None:
        """`holder` went from `before` entries to `after` (one more or one fewer)."""
        if before:
            holders = self._by_count[before]
            del holders[holder]
            if not holders:
                del self._by_count[before]
        if after:
            self._by_count.setdefault(after, {})[holder] = None
            self.most = max(self.most, after)
        while self.most and self.most not in self._by_count:
            self.most -= 1

    def holding_most(self) -> dict[str, None]:
        """The holders holding `most` entries, in the order they reached it (empty when nobody holds any)."""
        return self._by_count.get(self.most, {})

    def counts(self) -> dict[int, list[str]]:
        """Every count held and its holders (for tests and debugging)."""
        return {n: list(holders) for n, holders in self._by_count.items()}
