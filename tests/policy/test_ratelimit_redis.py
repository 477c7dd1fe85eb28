"""The rate limiter against a real `redis-server`: exact budgets, Retry-After, store loss and return."""

from __future__ import annotations

from pathlib import Path

from outrider.sidecar.inbound.jsonrpc import parse_message
from outrider.sidecar.policy.limits_config import RateLimits, budgets
from outrider.sidecar.policy.ratelimit import RateLimiter, open_storage

from .redis_server import redis_server

CALL = parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}})


async def test_budget_retry_after_and_store_health(tmp_path: Path) -> None:
    with redis_server(tmp_path) as redis:
        limiter = RateLimiter(
            open_storage(redis.uri, 0.25), on_store_error="deny", timeout_s=0.25, shared=True
        )
        spend = budgets(RateLimits.from_mapping({"per_user": "3/minute"}, "t"), CALL, "alice", "pod")
        results = [await limiter.spend(spend) for _ in range(4)]
        assert [r.allowed for r in results] == [True, True, True, False]
        assert results[3].scope == "per_user" and 1 <= results[3].retry_after_s <= 60
        assert await limiter.check_store() and limiter.store_healthy
        redis.stop()
        assert not await limiter.check_store()
        assert not limiter.store_healthy and limiter.last_store_error
        down = await limiter.spend(spend)
        assert not down.allowed and down.store_error  # configured: deny
        redis.start()
        assert await limiter.check_store() and limiter.store_healthy
