"""The demo's stand-in for the internet: one HTTP server answering for several host names.

Run inside the demo's "internet" network namespace: `python -m sidecar.demo.internet --port 80`.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


async def _hello(request: web.Request) -> web.Response:
    # The Host header names what the client asked for (with the port when it is not 80).
    return web.Response(text=f"hello from {request.host} (the demo's stand-in internet)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, action="append", help="port to serve on (repeatable; default 80)")
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port or [80]))


async def _serve(host: str, ports: list[int]) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", _hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, host, port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
