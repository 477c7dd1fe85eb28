"""Identity-provider features through the sidecar, each against the same sidecar without it (same run).

- token exchange per profile against its stand-in (`rfc8693`: the dev IdP; `entra-obo`: the Entra
  stand-in; `okta`: the Okta stand-in): a cache miss (a new user token every call) and a cache hit,
  against the same issuer with the exchange off;
- RFC 7662 introspection of opaque tokens (Okta stand-in): miss and hit, against the same sidecar
  verifying the issuer's JWTs locally;
- DPoP: bound tokens with a proof per call against unbound bearer tokens on the same sidecar
  (target: <= 0.3 ms added at p50).

The MCP server is the real `mcp` SDK server in its own process (stateless JSON); the sidecar's
inbound and identity components run in this process with the dev Workload API. The stand-ins
authenticate the sidecar with a client secret here (the JWT-SVID path is a cached Workload API
call either way). Prints p50/p99 per phase and the added latency; `--json` for `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from outrider.sidecar.config import parse  # noqa: E402
from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles  # noqa: E402
from outrider.sidecar.dev.workload_api import DevWorkloadApi  # noqa: E402
from outrider.sidecar.identity import component as identity_component  # noqa: E402
from outrider.sidecar.inbound import component as inbound_component  # noqa: E402
from outrider.sidecar.inbound.callers import Presented, build_caller_verifier  # noqa: E402
from outrider.sidecar.runtime import Runtime  # noqa: E402
from outrider.sidecar.telemetry.observer import NullObserver, Principal  # noqa: E402
from tests.idp.dpop_client import DpopKey  # noqa: E402
from tests.idp.standins.entra import AppRegistration, EntraStandIn, EntraUser  # noqa: E402
from tests.idp.standins.okta import OktaStandIn, ServiceApp  # noqa: E402

SIDECAR_ID = "spiffe://example.org/ns/bench/sa/mcp"
RESOURCE = "https://mcp.example.com/mcp"
MIDDLE = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
DOWNSTREAM = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d"
SECRET = "bench-client-secret-0123456789"
HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-06-18",
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def body(i: int) -> bytes:
    call = {
        "jsonrpc": "2.0",
        "id": i,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}},
    }
    return json.dumps(call).encode()


async def measure(
    session: aiohttp.ClientSession, url: str, headers_for: Callable[[int], dict[str, str]], calls: int
) -> dict[str, float]:
    """Sequential calls (one in flight: latency, not queueing); headers are made before the clock starts."""
    prepared = [headers_for(i) for i in range(calls)]
    latencies: list[float] = []
    for i, extra in enumerate(prepared):
        started = time.perf_counter()
        async with session.post(url, data=body(i), headers={**HEADERS, **extra}) as response:
            payload = await response.read()
        if response.status != 200 or b'"result"' not in payload:
            raise RuntimeError(f"call {i} failed: HTTP {response.status} {payload[:200]!r}")
        latencies.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "calls": float(calls)}


@asynccontextmanager
async def sidecar(
    api: DevWorkloadApi, mcp_port: int, inbound: dict[str, Any], exchange: dict[str, Any] | None
) -> AsyncIterator[str]:
    port = free_port()
    raw: dict[str, Any] = {
        "identity": {"socket": api.target},
        "inbound": {"host": "127.0.0.1", "port": port, "mcp_port": mcp_port, "resource": RESOURCE, **inbound},
    }
    if exchange:
        raw["exchange"] = exchange
    runtime = Runtime(config=parse(raw), observer=NullObserver())
    async with identity_component.component(runtime), inbound_component.serve(runtime):
        for _ in range(500):
            if all(ok for ok, _ in (check() for check in runtime.readiness.values())):
                break
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}/mcp"


async def run(calls: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="outrider-bench-idp-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # a client secret file: never left behind
    secret_file = tmp / "secret"
    secret_file.write_text(SECRET)
    results: dict[str, Any] = {"calls": calls}
    async with AsyncExitStack() as stack:
        mcp_port = free_port()
        app = subprocess.Popen(  # noqa: ASYNC220 - start-up, once
            [
                sys.executable,
                "-m",
                "outrider.sidecar.dev.mcp_server",
                "--port",
                str(mcp_port),
                "--mode",
                "stateless",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(lambda: (app.terminate(), app.wait(10)))
        api = await stack.enter_async_context(DevWorkloadApi(tmp / "agent.sock", spiffe_id=SIDECAR_ID))
        devidp = await stack.enter_async_context(
            DevIdP(
                clients=[
                    ClientRegistration(
                        "bench", spiffe_ids=(SIDECAR_ID,), audiences=("https://api.example.com",)
                    )
                ],
                spiffe_bundles=StaticJwtBundles({api.trust_domain: api.jwks()}),
                token_ttl=3600,
            )
        )
        entra = await stack.enter_async_context(
            EntraStandIn(
                apps=[
                    AppRegistration(
                        MIDDLE,
                        "api://weather-mcp",
                        secret=SECRET,
                        permissions={"api://downstream": ("Data.Read",)},
                    ),
                    AppRegistration(DOWNSTREAM, "api://downstream"),
                ],
                users=[EntraUser(f"user{i}", f"oid-{i}") for i in range(calls + 1)],
            )
        )
        okta = await stack.enter_async_context(
            OktaStandIn(
                apps=[
                    ServiceApp("0oa-bench", secret=SECRET, grants={"api://downstream": ("downstream.read",)})
                ]
            )
        )
        session = await stack.enter_async_context(aiohttp.ClientSession())
        async with aiohttp.ClientSession() as probe:
            for _ in range(300):
                try:
                    async with probe.get(f"http://127.0.0.1:{mcp_port}/mcp") as response:
                        if response.status < 500:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)

        def bearer(token: str) -> Callable[[int], dict[str, str]]:
            return lambda i: {"Authorization": f"Bearer {token}"}

        def each(tokens: list[str]) -> Callable[[int], dict[str, str]]:
            return lambda i: {"Authorization": f"Bearer {tokens[i]}"}

        # -- exchange per profile: off / hit / miss ----------------------------------------------------
        profiles: dict[str, Any] = {}
        dev_in = {"issuer": devidp.issuer}
        dev_ex = {
            "token_endpoint": devidp.token_endpoint,
            "issuer": devidp.issuer,
            "audience": "https://api.example.com",
        }
        entra_in = {"issuers": [{"issuer": entra.issuer, "audience": MIDDLE}]}
        entra_ex = {
            "profile": "entra-obo",
            "token_endpoint": entra.token_endpoint,
            "client_id": MIDDLE,
            "scope": "api://downstream/.default",
            "auth": "client-secret",
            "client_secret_file": str(secret_file),
            "client_secret_method": "post",
        }
        okta_in = {"issuers": [{"issuer": okta.issuer, "audience": "api://weather-mcp"}]}
        okta_ex = {
            "profile": "okta",
            "token_endpoint": okta.token_endpoint,
            "client_id": "0oa-bench",
            "audience": "api://downstream",
            "scope": "downstream.read",
            "auth": "client-secret",
            "client_secret_file": str(secret_file),
        }

        def with_exchange(
            inbound: dict[str, Any], exchange: dict[str, Any]
        ) -> tuple[dict[str, Any], dict[str, Any] | None]:
            if "issuers" in inbound:  # an entry of inbound.issuers carries its own exchange
                entry = {**inbound["issuers"][0], "exchange": exchange}
                return {"issuers": [entry]}, None
            return inbound, exchange

        cases = {
            "rfc8693": (dev_in, dev_ex, lambda i: devidp.mint(f"user{i}", audience=RESOURCE)),
            "entra-obo": (entra_in, entra_ex, lambda i: entra.sign_in(f"user{i}", client_id=MIDDLE)),
            "okta": (okta_in, okta_ex, lambda i: okta.sign_in(f"user{i}", audience="api://weather-mcp")),
        }
        for name, (inbound, exchange, mint) in cases.items():
            tokens = [mint(i) for i in range(calls)]
            async with sidecar(api, mcp_port, inbound, None) as url:
                await measure(session, url, bearer(tokens[0]), 20)  # warm-up
                off = await measure(session, url, bearer(tokens[0]), calls)
            ex_inbound, ex_section = with_exchange(inbound, exchange)
            async with sidecar(api, mcp_port, ex_inbound, ex_section) as url:
                await measure(session, url, bearer(mint(calls)), 20)  # warm-up, fills the cache for hits
                hit = await measure(session, url, bearer(mint(calls)), calls)
                miss = await measure(session, url, each(tokens), calls)
            profiles[name] = {"off": off, "hit": hit, "miss": miss}
        results["exchange"] = profiles

        # -- introspection: local JWT check / introspection miss / hit ---------------------------------
        introspect_in = {
            "issuers": [
                {
                    "issuer": okta.issuer,
                    "audience": "api://weather-mcp",
                    "introspection": {
                        "endpoint": okta.endpoint("introspect"),
                        "auth": "client-secret",
                        "client_id": "0oa-bench",
                        "client_secret_file": str(secret_file),
                        "cache_ttl_s": 300,
                    },
                    "jwks_uri": okta.endpoint("keys"),
                }
            ]
        }
        opaque = [okta.opaque(f"user{i}", audience="api://weather-mcp") for i in range(calls)]
        one = okta.opaque("warm", audience="api://weather-mcp")
        jwt_token = okta.sign_in("alice", audience="api://weather-mcp")
        async with sidecar(api, mcp_port, introspect_in, None) as url:
            await measure(session, url, bearer(jwt_token), 20)
            local = await measure(session, url, bearer(jwt_token), calls)
            await measure(session, url, bearer(one), 5)
            hit = await measure(session, url, bearer(one), calls)
            miss = await measure(session, url, each(opaque), calls)
        results["introspection"] = {"jwt_local": local, "hit": hit, "miss": miss}

        # -- DPoP: bound token + proof per call vs unbound bearer, same sidecar ------------------------
        key = DpopKey()
        bound = devidp.mint("erin", audience=RESOURCE, extra={"cnf": {"jkt": key.jkt}})
        plain = devidp.mint("erin", audience=RESOURCE)
        async with sidecar(
            api, mcp_port, {"issuer": devidp.issuer, "public_url": "https://mcp.example.com"}, None
        ) as url:

            def proofs(i: int) -> dict[str, str]:
                return {"Authorization": f"DPoP {bound}", "DPoP": key.proof("POST", RESOURCE, bound)}

            await measure(session, url, bearer(plain), 20)
            await measure(session, url, proofs, 20)
            rounds: list[tuple[dict[str, float], dict[str, float]]] = []
            for _ in range(3):  # interleaved, so drift on a busy machine hits both alike
                rounds.append(
                    (
                        await measure(session, url, bearer(plain), calls),
                        await measure(session, url, proofs, calls),
                    )
                )
        best_plain = min((r[0] for r in rounds), key=lambda m: m["p50_ms"])
        best_dpop = min((r[1] for r in rounds), key=lambda m: m["p50_ms"])
        results["dpop"] = {
            "bearer": best_plain,
            "dpop": best_dpop,
            "p50_added_ms": best_dpop["p50_ms"] - best_plain["p50_ms"],
            "rounds_p50_added_ms": [d["p50_ms"] - b["p50_ms"] for b, d in rounds],
        }
        results["dpop_validation"] = await dpop_validation(devidp, calls * 10)
    return results


async def dpop_validation(devidp: DevIdP, calls: int) -> dict[str, float]:
    """The sidecar's own cost of checking a proof: `CallerVerifier.authenticate` for a bound token with
    a proof against an unbound bearer token, same verifier, no HTTP (steady on a busy machine)."""
    config = parse(
        {"inbound": {"issuer": devidp.issuer, "resource": RESOURCE, "public_url": "https://mcp.example.com"}}
    ).inbound
    key = DpopKey()
    bound = devidp.mint("erin", audience=RESOURCE, extra={"cnf": {"jkt": key.jkt}})
    plain = devidp.mint("erin", audience=RESOURCE)
    async with aiohttp.ClientSession() as http:
        verifier = build_caller_verifier(config, http, None)
        for jwks in verifier.jwks_caches:
            await jwks.refresh(force=True)
        proofs = [key.proof("POST", RESOURCE, bound) for _ in range(calls + 1)]
        assert isinstance(
            await verifier.authenticate(Presented("dpop", bound, (proofs[-1],), "POST", "/mcp")), Principal
        )

        async def timed(presented: list[Presented]) -> list[float]:
            out = []
            for item in presented:
                started = time.perf_counter()
                result = await verifier.authenticate(item)
                out.append((time.perf_counter() - started) * 1000)
                assert isinstance(result, Principal), result
            return out

        plain_ms = await timed([Presented("bearer", plain, (), "POST", "/mcp")] * calls)
        dpop_ms = await timed([Presented("dpop", bound, (p,), "POST", "/mcp") for p in proofs[:calls]])
    return {
        "bearer_p50_ms": pct(plain_ms, 50),
        "dpop_p50_ms": pct(dpop_ms, 50),
        "p50_added_ms": pct(dpop_ms, 50) - pct(plain_ms, 50),
        "dpop_p99_ms": pct(dpop_ms, 99),
    }


def render(r: dict[str, Any]) -> str:
    lines = [
        f"== identity-provider features through the sidecar ({r['calls']} sequential calls per phase) =="
    ]
    for name, phases in r["exchange"].items():
        off = phases["off"]["p50_ms"]
        lines.append(
            f"exchange {name:10s} off p50 {off:.3f} ms | hit p50 {phases['hit']['p50_ms']:.3f} ms "
            f"(+{phases['hit']['p50_ms'] - off:.3f}) | miss p50 {phases['miss']['p50_ms']:.3f} ms "
            f"(+{phases['miss']['p50_ms'] - off:.3f}) p99 {phases['miss']['p99_ms']:.3f} ms"
        )
    i = r["introspection"]
    base = i["jwt_local"]["p50_ms"]
    hit, miss = i["hit"]["p50_ms"], i["miss"]["p50_ms"]
    lines.append(
        f"introspection     JWT local p50 {base:.3f} ms | hit p50 {hit:.3f} ms (+{hit - base:.3f}) "
        f"| miss p50 {miss:.3f} ms (+{miss - base:.3f})"
    )
    d = r["dpop"]
    bearer, dpop = d["bearer"]["p50_ms"], d["dpop"]["p50_ms"]
    lines.append(
        f"DPoP via sidecar  bearer p50 {bearer:.3f} ms | DPoP p50 {dpop:.3f} ms (+{d['p50_added_ms']:.3f} ms)"
    )
    v = r["dpop_validation"]
    verdict = "met" if v["p50_added_ms"] <= 0.3 else "NOT met"
    lines.append(
        f"DPoP validation   authenticate() bearer p50 {v['bearer_p50_ms']:.4f} ms | bound + proof p50 "
        f"{v['dpop_p50_ms']:.4f} ms (+{v['p50_added_ms']:.4f} ms per call, target <= 0.3 ms: {verdict})"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.calls))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
