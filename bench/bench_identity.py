"""Identity hot-path figures: cached JWT-SVID and X.509 reads, context rebuild per rotation, and the
cost of the rotation-following server context (SNI callback) against a static one, same run."""

from __future__ import annotations

import asyncio
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.tls import RotatingServerContext, client_context, server_context
from outrider.sidecar.identity.workload import WorkloadApiIdentity

HANDSHAKES = 400


async def _handshakes(context: ssl.SSLContext, client: ssl.SSLContext, n: int) -> list[float]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    times: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        times.append(time.perf_counter() - start)
        writer.write(b"x")
        writer.close()
    server.close()
    await server.wait_closed()
    return times


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "agent.sock"
        async with (
            DevWorkloadApi(sock, spiffe_id="spiffe://example.org/bench") as _api,
            WorkloadApiIdentity(IdentityConfig(socket=f"unix://{sock}")) as identity,
        ):
            assert await identity.wait_ready(10)
            await identity.jwt_svid("aud")
            n = 100_000
            start = time.perf_counter()
            for _ in range(n):
                await identity.jwt_svid("aud")
            jwt_us = (time.perf_counter() - start) / n * 1e6
            start = time.perf_counter()
            for _ in range(n):
                identity.x509()
            x509_us = (time.perf_counter() - start) / n * 1e6
            material = identity.x509()
            start = time.perf_counter()
            for _ in range(50):
                server_context(material)
            build_ms = (time.perf_counter() - start) / 50 * 1e3

            client = client_context(material, trust="spiffe")
            static = server_context(material)
            rotating = RotatingServerContext(identity)
            await _handshakes(static, client, 20)  # warm-up
            base = await _handshakes(static, client, HANDSHAKES)
            rot = await _handshakes(rotating.context, client, HANDSHAKES)

    def p(values: list[float], q: float) -> float:
        return sorted(values)[int(q * (len(values) - 1))] * 1e3

    print(f"jwt_svid (cache hit)          {jwt_us:8.2f} us/call")
    print(f"x509() snapshot read          {x509_us:8.2f} us/call")
    print(f"server context build (memfd)  {build_ms:8.2f} ms (once per rotation)")
    print(f"mTLS handshake, static ctx    p50 {p(base, 0.5):.2f} ms  p99 {p(base, 0.99):.2f} ms")
    print(f"mTLS handshake, rotating ctx  p50 {p(rot, 0.5):.2f} ms  p99 {p(rot, 0.99):.2f} ms")
    print(f"ratio rotating/static (median) {statistics.median(rot) / statistics.median(base):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
