"""The demo's stand-in for the internet: one HTTP server answering for several host names, and the
DNS server (UDP and TCP, dnspython) that resolves those names, as a cluster's DNS would.

Run inside the demo's "internet" network namespace:
`python -m outrider.sidecar.demo.internet --port 80 --dns-name allowed.demo.test=10.0.0.1 ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import struct
from collections.abc import Mapping
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from aiohttp import web


async def _hello(request: web.Request) -> web.Response:
    # The Host header names what the client asked for (with the port when it is not 80).
    return web.Response(text=f"hello from {request.host} (the demo's stand-in internet)\n")


def answer(query_wire: bytes, records: Mapping[str, str]) -> bytes | None:
    """Pure: the DNS response to one query: A records for the known names, NXDOMAIN for others,
    an empty answer for other types of a known name. None for a packet that is not a DNS query."""
    try:
        query = dns.message.from_wire(query_wire)
    except Exception:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    for question in query.question:
        name = question.name.to_text(omit_final_dot=True).lower()
        address = records.get(name)
        if address is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A and ipaddress.ip_address(address).version == 4:
            response.answer.append(dns.rrset.from_text(question.name, 5, "IN", "A", address))
    return bytes(response.to_wire())


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, records: Mapping[str, str]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = answer(data, self.records)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _tcp(
    records: Mapping[str, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = answer(await reader.readexactly(length), records)
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    writer.close()


async def _serve(host: str, ports: list[int], records: Mapping[str, str]) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", _hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, host, port).start()
    servers: list[asyncio.Server] = []
    if records:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: _Udp(records), local_addr=(host, 53))
        servers.append(await asyncio.start_server(lambda r, w: _tcp(records, r, w), host, 53))
    try:
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, action="append", help="HTTP port (repeatable; default 80)")
    parser.add_argument(
        "--dns-name", action="append", default=[], metavar="NAME=IP", help="serve DNS on port 53 for NAME"
    )
    args = parser.parse_args()
    records = {}
    for item in args.dns_name:
        name, _, address = item.partition("=")
        records[name.lower().rstrip(".")] = str(ipaddress.ip_address(address))
    asyncio.run(_serve(args.host, args.port or [80], records))


if __name__ == "__main__":
    main()
