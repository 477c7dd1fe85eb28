"""Spends rate-limit budgets against a `limits` storage: in memory, or Redis/Valkey for a shared budget.

The adapter at the edge: `limits_config` decides which budgets a call spends; this module asks the
store, measures how long to wait, and turns an unreachable store into the configured behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from outrider.sidecar.policy.limits_config import Budget

if TYPE_CHECKING:  # `limits` (and a Redis client) load only when a limit is spent or a store is set
    from limits.aio.storage import Storage
    from limits.aio.strategies import MovingWindowRateLimiter

log = logging.getLogger("outrider.policy.ratelimit")


@dataclass(frozen=True)
class LimitResult:
    allowed: bool
    scope: str | None = None  # the budget that refused ("per_user", ...)
    retry_after_s: int = 0
    store_error: bool = False  # the store could not be asked; `allowed` is the configured fallback


OK = LimitResult(True)


def open_storage(uri: str, timeout_s: float) -> Storage:
    from limits.aio.storage import MemoryStorage, Storage
    from limits.storage import storage_from_string

    if uri.startswith("memory://"):
        return MemoryStorage()
    scheme = uri if uri.startswith("async+") else "async+" + uri
    # Short socket timeouts: a dead store must cost a call milliseconds, not the client's patience.
    storage = storage_from_string(
        scheme, wrap_exceptions=True, connect_timeout=timeout_s, stream_timeout=timeout_s
    )
    if not isinstance(storage, Storage):
        raise ValueError(f"{uri!r} is not an asyncio storage")
    return storage


class RateLimiter:
    """A moving window per budget (exact: Redis evaluates each hit atomically in a Lua script)."""

    def __init__(
        self, storage: Storage | str, *, on_store_error: str, timeout_s: float, shared: bool
    ) -> None:
        """`storage` is an open store, or the URI of one opened at the first spend or probe.

        A URI keeps a sidecar whose policy sets no rate limit from loading `limits` at all.
        """
        self._uri = storage if isinstance(storage, str) else None
        self._storage = None if isinstance(storage, str) else storage
        self._strategy: MovingWindowRateLimiter | None = None
        self.fail_open = on_store_error == "allow"
        self.timeout_s = timeout_s
        self.shared = shared
        self.store_healthy = True
        self.store_errors_total = 0
        self.limited_total = 0
        self.last_store_error: str | None = None

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            assert self._uri is not None
            self._storage = open_storage(self._uri, self.timeout_s)
        return self._storage

    @property
    def strategy(self) -> MovingWindowRateLimiter:
        if self._strategy is None:
            from limits.aio.strategies import MovingWindowRateLimiter

            self._strategy = MovingWindowRateLimiter(self.storage)
        return self._strategy

    async def spend(self, budgets: Sequence[Budget]) -> LimitResult:
        if not budgets:
            return OK
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                for budget in budgets:
                    if not await self.strategy.hit(budget.item, *budget.key):
                        stats = await self.strategy.get_window_stats(budget.item, *budget.key)
                        self.limited_total += 1
                        self._healthy()
                        wait = max(1, math.ceil(stats.reset_time - time.time()))
                        return LimitResult(False, budget.scope, wait)
        except Exception as exc:  # any store failure (timeout, refused, protocol) takes the fallback
            self.store_errors_total += 1
            detail = f"{type(exc).__name__}"
            if self.store_healthy:
                log.warning(
                    "rate-limit store unreachable (%s): %s metered calls until it is back",
                    detail,
                    "allowing" if self.fail_open else "refusing",
                )
            self.store_healthy = False
            self.last_store_error = detail
            return LimitResult(self.fail_open, "store_unavailable", 1 if not self.fail_open else 0, True)
        self._healthy()
        return OK

    def _healthy(self) -> None:
        if not self.store_healthy:
            log.info("rate-limit store reachable again")
        self.store_healthy = True

    async def check_store(self) -> bool:
        """A health probe for the readiness detail (the store's own ping)."""
        detail = "no answer"
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                ok = bool(await self.storage.check())
        except Exception as exc:  # any failure of the probe means the store is not usable
            ok, detail = False, type(exc).__name__
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # `limits`' redis `check()` swallows every exception with a bare `except:`, our own
            # cancellation included: without this the reload loop could not be stopped mid-probe.
            raise asyncio.CancelledError
        if ok:
            self._healthy()
        else:
            if self.store_healthy:
                log.warning("rate-limit store unreachable (%s)", detail)
            self.store_healthy = False
            self.last_store_error = detail
        return ok
