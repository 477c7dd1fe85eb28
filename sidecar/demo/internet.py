"""The demo's stand-in for the internet: one HTTP server answering for several host names.

Run inside the demo's "internet" network namespace: `python -m sidecar.demo.internet --port 80`.
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def _hello(request: web.Request) -> web.Response:
    host = request.host.split(":")[0]
    return web.Response(text=f"hello from {host} (the demo's internet namespace)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/{tail:.*}", _hello)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
