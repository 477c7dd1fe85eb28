"""How many connections to the MCP server the proxy holds at once, in all and per caller.

Every forwarded request holds one upstream connection until its answer ends (an SSE stream for as
long as it is open). A request that finds no free slot waits at most `wait_s`, then is refused (503).
"""

from __future__ import annotations

import asyncio
from collections import deque


class UpstreamSlots:
    """A counting gate with a per-owner cap; waiters are served first come, first served."""

    def __init__(self, total: int, per_caller: int, wait_s: float) -> None:
        self.total = total
        self.per_caller = per_caller  # 0: no per-caller cap
        self.wait_s = wait_s
        self.held = 0
        self.by_owner: dict[str, int] = {}
        self.refused_total = 0
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()

    def _free_for(self, owner: str) -> bool:
        if self.held >= self.total:
            return False
        return not self.per_caller or self.by_owner.get(owner, 0) < self.per_caller

    def _take(self, owner: str) -> None:
        self.held += 1
        self.by_owner[owner] = self.by_owner.get(owner, 0) + 1

    def take_free(self, owner: str) -> bool:
        """Take a slot if one is free now (the common case, without a coroutine); else False."""
        if self._free_for(owner):
            self._take(owner)
            return True
        return False

    async def acquire(self, owner: str) -> str | None:
        """None when a slot is now held (give it back with `release`); else `total` or `caller`: which
        limit had no slot free within `wait_s`."""
        # A free slot is never left while an eligible waiter waits (`release` hands it over), so
        # taking one at once does not jump the queue.
        if self._free_for(owner):
            self._take(owner)
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (owner, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.wait_s):
                await waiter
        except TimeoutError:
            pass
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(owner)  # handed a slot just as the caller went away
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        if waiter.done() and not waiter.cancelled():
            return None  # handed a slot by `release` (perhaps just as the wait ran out)
        self.refused_total += 1
        if self.per_caller and self.by_owner.get(owner, 0) >= self.per_caller:
            return "caller"
        return "total"

    def release(self, owner: str) -> None:
        self.held -= 1
        left = self.by_owner.get(owner, 0) - 1
        if left > 0:
            self.by_owner[owner] = left
        else:
            self.by_owner.pop(owner, None)
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to the oldest waiters that may take one (a capped caller does not block others)."""
        for entry in list(self._waiters):
            if self.held >= self.total:
                return
            owner, waiter = entry
            if waiter.done() or not self._free_for(owner):
                continue
            self._waiters.remove(entry)
            self._take(owner)
            waiter.set_result(None)
