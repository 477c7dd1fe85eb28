"""Token exchange cost: an IdP round trip (cache miss) versus a cache hit, and single-flight under load.

Same run: the dev IdP on loopback, the sidecar's real Workload API identity against the dev Workload API
(JWT-SVID `jwt-spiffe` assertion). Prints p50/p99 per phase, the miss/hit ratio and IdP calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from outrider.sidecar.dev.idp import CallableJwtBundles, ClientRegistration, DevIdP  # noqa: E402
from outrider.sidecar.dev.workload_api import DevWorkloadApi  # noqa: E402
from outrider.sidecar.exchange.client import OAuthTokenExchanger  # noqa: E402
from outrider.sidecar.exchange.config import ExchangeConfig  # noqa: E402
from outrider.sidecar.identity.config import IdentityConfig  # noqa: E402
from outrider.sidecar.identity.workload import WorkloadApiIdentity  # noqa: E402

SIDECAR = "spiffe://example.org/ns/bench/sa/mcp"
DOWNSTREAM = "https://api.example.com"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def run(misses: int, hits: int, concurrent: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="oxb-") as tmp:
        async with DevWorkloadApi(Path(tmp) / "agent.sock", spiffe_id=SIDECAR) as api:

            async def bundles() -> dict[str, object]:
                return {api.trust_domain: api.jwks()}

            clients = [ClientRegistration("bench", spiffe_ids=(SIDECAR,), audiences=(DOWNSTREAM,))]
            identity = WorkloadApiIdentity(IdentityConfig.from_mapping({"socket": api.target}))
            async with (
                identity,
                DevIdP(clients=clients, spiffe_bundles=CallableJwtBundles(bundles)) as idp,
                aiohttp.ClientSession() as session,
            ):
                await identity.wait_ready(10)
                config = ExchangeConfig.from_mapping(
                    {
                        "token_endpoint": idp.token_endpoint,
                        "issuer": idp.issuer,
                        "audience": DOWNSTREAM,
                        "cache_size": misses + 10,
                    }
                )
                ex = OAuthTokenExchanger(config, identity, session)
                subjects = [
                    idp.mint(f"user{i}", audience="https://mcp.example.com/mcp") for i in range(misses)
                ]
                await ex.exchange(idp.mint("warmup"))  # connection pool, JWT-SVID fetch

                miss_s: list[float] = []
                for token in subjects:
                    t0 = time.perf_counter()
                    await ex.exchange(token)
                    miss_s.append(time.perf_counter() - t0)

                hit_s: list[float] = []
                for i in range(hits):
                    token = subjects[i % len(subjects)]
                    t0 = time.perf_counter()
                    await ex.exchange(token)
                    hit_s.append(time.perf_counter() - t0)

                before = idp.stats.exchange_requests
                token = idp.mint("crowd", audience="https://mcp.example.com/mcp")
                t0 = time.perf_counter()
                await asyncio.gather(*(ex.exchange(token) for _ in range(concurrent)))
                crowd_wall = time.perf_counter() - t0
                crowd_calls = idp.stats.exchange_requests - before

    return {
        "miss_p50_ms": statistics.median(miss_s) * 1e3,
        "miss_p99_ms": pct(miss_s, 99) * 1e3,
        "hit_p50_us": statistics.median(hit_s) * 1e6,
        "hit_p99_us": pct(hit_s, 99) * 1e6,
        "miss_over_hit_p50": statistics.median(miss_s) / statistics.median(hit_s),
        "misses_per_s": len(miss_s) / sum(miss_s),
        "concurrent_identical": concurrent,
        "concurrent_idp_calls": crowd_calls,
        "concurrent_wall_ms": crowd_wall * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--misses", type=int, default=300)
    parser.add_argument("--hits", type=int, default=20000)
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = asyncio.run(run(args.misses, args.hits, args.concurrent))
    if args.json:
        print(json.dumps(figures))
        return
    print(
        f"cache miss (IdP round trip, loopback): p50 {figures['miss_p50_ms']:.2f} ms, "
        f"p99 {figures['miss_p99_ms']:.2f} ms, {figures['misses_per_s']:.0f} exchanges/s"
    )
    print(f"cache hit: p50 {figures['hit_p50_us']:.1f} us, p99 {figures['hit_p99_us']:.1f} us")
    print(f"miss/hit p50 ratio: {figures['miss_over_hit_p50']:.0f}x")
    print(
        f"{figures['concurrent_identical']:.0f} concurrent identical exchanges -> "
        f"{figures['concurrent_idp_calls']:.0f} IdP call(s) in {figures['concurrent_wall_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
