"""The "internet" of the egress tests: DNS, TLS, plain HTTP, TCP echo and UDP echo servers.

Runs inside the internet network namespace: `python internet.py CONFIG.json`. Every accepted TCP
connection and UDP datagram is appended to a JSON-lines log so tests can prove an address was
never reached. Prints `{"ready": true}` once every socket listens.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import struct
import sys
import time
from pathlib import Path
from typing import Any


class Log:
    def __init__(self, path: str) -> None:
        self.file = Path(path).open("a", buffering=1)  # noqa: SIM115 - open for the process lifetime

    def hit(self, **fields: Any) -> None:
        self.file.write(json.dumps({"t": time.time(), **fields}) + "\n")


# --- DNS ------------------------------------------------------------------------------------------


_REBIND_TURNS: dict[str, int] = {}


def dns_answer(query: bytes, zone: dict[str, dict[str, list[str]]]) -> bytes | None:
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    if qdcount != 1:
        return None
    pos, labels = 12, []
    while True:
        length = query[pos]
        if length == 0:
            pos += 1
            break
        labels.append(query[pos + 1 : pos + 1 + length].decode("ascii", "replace").lower())
        pos += 1 + length
    qtype, _qclass = struct.unpack("!HH", query[pos : pos + 4])
    question = query[12 : pos + 4]
    name = ".".join(labels)
    records = zone.get(name)
    answers = b""
    count = 0
    if records is not None:
        chosen = records.get("A" if qtype == 1 else "AAAA" if qtype == 28 else "-", [])
        if qtype == 1 and "rebind" in records:
            # DNS rebinding: each A query gets the next address of the list (TTL 0 in spirit).
            turn = _REBIND_TURNS.get(name, 0)
            _REBIND_TURNS[name] = turn + 1
            chosen = [records["rebind"][turn % len(records["rebind"])]]
        for address in chosen:
            rdata = ipaddress.ip_address(address).packed
            answers += struct.pack("!HHHIH", 0xC00C, qtype, 1, 5, len(rdata)) + rdata
            count += 1
    rcode = 0 if records is not None else 3
    header = struct.pack("!HHHHHH", ident, 0x8180 | rcode | (flags & 0x0100), 1, count, 0, 0)
    return header + question + answers


class DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: dict[str, dict[str, list[str]]], log: Log, address: str) -> None:
        self.zone, self.log, self.address = zone, log, address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.log.hit(kind="dns", ip=self.address, port=53, peer=addr[0])
        answer = dns_answer(data, self.zone)
        if answer is not None:
            self.transport.sendto(answer, addr)  # type: ignore[attr-defined]


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, log: Log, address: str, port: int) -> None:
        self.log, self.address, self.port = log, address, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.log.hit(kind="udp", ip=self.address, port=self.port, peer=addr[0])
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


# --- TCP ------------------------------------------------------------------------------------------


async def read_head(reader: asyncio.StreamReader) -> dict[str, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {"_line": lines[0]}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return headers


def http_reply(body: str) -> bytes:
    data = body.encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (
            len(data),
            data,
        )
    )


def serve_http(log: Log, address: str, port: int, tls: bool):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sni = None
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            sni = getattr(ssl_object, "outrider_sni", None)
        log.hit(
            kind="https" if tls else "http", ip=address, port=port, peer=writer.get_extra_info("peername")[0]
        )
        try:
            headers = await read_head(reader)
            body = json.dumps({"served_by": address, "port": port, "sni": sni, "host": headers.get("host")})
            writer.write(http_reply(body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    return handle


def serve_http_keepalive(log: Log, address: str, port: int):  # type: ignore[no-untyped-def]
    """A keep-alive HTTP/1.1 server for every name on this address (virtual hosts sharing one IP): reads
    Content-Length and chunked bodies, answers `Expect: 100-continue`, logs every request it serves."""

    async def body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return data
                data += await reader.readexactly(size)
                await reader.readexactly(2)
        return await reader.readexactly(int(headers.get("content-length", "0")))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                headers = await read_head(reader)
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                payload = await body(reader, headers)
                method, target = headers["_line"].split(" ")[:2]
                log.hit(
                    kind="http-request",
                    ip=address,
                    port=port,
                    peer=peer[0],
                    peer_port=peer[1],
                    host=headers.get("host"),
                    method=method,
                    target=target,
                    body=payload.decode("latin-1") if len(payload) <= 4096 else f"<{len(payload)} bytes>",
                )
                answer = json.dumps(
                    {"served_by": address, "host": headers.get("host"), "target": target}
                ).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    return handle


def serve_echo(log: Log, address: str, port: int):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log.hit(kind="tcp", ip=address, port=port, peer=writer.get_extra_info("peername")[0])
        try:
            writer.write(f"hello from {address}:{port}\n".encode())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return handle


_SINK_CHUNK = b"\0" * (1 << 20)


def serve_sink(log: Log, address: str, port: int):  # type: ignore[no-untyped-def]
    """Benchmark source: on `SEND n\\n` send n bytes as fast as possible, then close."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            line = await reader.readline()
            if line.startswith(b"PING"):
                writer.write(b"PONG\n")
                await writer.drain()
                return
            total = int(line.split()[1])
            chunk = _SINK_CHUNK  # one buffer for every connection: 1,000 tunnels must not hold 1 GB
            loop = asyncio.get_running_loop()
            raw = sock.dup()
            raw.setblocking(False)
            try:
                view = memoryview(chunk)
                while total > 0:
                    n = min(total, len(chunk))
                    await loop.sock_sendall(raw, view[:n])
                    total -= n
                    # sock_sendall returns without suspending while the socket has room: yield, or
                    # one fast reader would keep every other connection (and accept) waiting.
                    await asyncio.sleep(0)
            finally:
                raw.close()
        except (ConnectionError, ValueError, IndexError):
            pass
        finally:
            writer.close()

    return handle


async def main(config: dict[str, Any]) -> None:
    log = Log(config["log"])
    zone = config["zone"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config["cert"], config["key"])

    def remember_sni(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.outrider_sni = name  # type: ignore[attr-defined]

    context.sni_callback = remember_sni  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    servers: list[Any] = []
    for address in config["dns"]:
        transport, _ = await loop.create_datagram_endpoint(
            lambda a=address: DnsProtocol(zone, log, a), local_addr=(address, 53)
        )
        servers.append(transport)
    for address, port in config["udp_echo"]:
        transport, _ = await loop.create_datagram_endpoint(
            lambda a=address, p=port: UdpEcho(log, a, p), local_addr=(address, port)
        )
        servers.append(transport)
    for address, port, kind in config["tcp"]:
        if kind == "https":
            server = await asyncio.start_server(
                serve_http(log, address, port, True), address, port, ssl=context
            )
        elif kind == "http":
            server = await asyncio.start_server(serve_http(log, address, port, False), address, port)
        elif kind == "http-keepalive":
            server = await asyncio.start_server(serve_http_keepalive(log, address, port), address, port)
        elif kind == "sink":
            server = await asyncio.start_server(serve_sink(log, address, port), address, port)
        else:
            server = await asyncio.start_server(serve_echo(log, address, port), address, port)
        servers.append(server)
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
