"""The 15001 listener: judges every outbound connection against the allowlist and relays the allowed ones.

Captured connections (iptables REDIRECT) carry their original destination (`SO_ORIGINAL_DST`); a
connection without one is an explicit-proxy client (CONNECT or absolute-URI HTTP). Both paths use
the same policy and the same rule: an allowed *name* is reached at its own DNS resolution, never at
whatever IP the client chose, so a forged SNI or Host cannot carry traffic to another address.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from outrider.sidecar.egress import http1, http1_response, sniff
from outrider.sidecar.egress.config import EgressConfig
from outrider.sidecar.egress.policy import (
    Destination,
    IPAddress,
    Verdict,
    address_allowed,
    connection_allowed,
    decide,
    destination_for,
    name_addresses,
    normalize_name,
    unmapped,
)
from outrider.sidecar.egress.reload import PolicyHolder
from outrider.sidecar.telemetry.observer import EgressDecision, Observer

log = logging.getLogger("outrider.egress")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


def original_destination(sock: socket.socket) -> tuple[IPAddress, int] | None:
    """Where a REDIRECTed connection was going, or None when it was not redirected (a proxy client)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            v6 = ipaddress.IPv6Address(raw[8:24])
            address: IPAddress = v6.ipv4_mapped or v6
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack_from("!H", raw, 2)[0]
            address = ipaddress.IPv4Address(raw[4:8])
    except OSError:
        return None
    local = sock.getsockname()
    if str(address) == local[0].split("%")[0] and port == local[1]:
        return None
    return address, port


async def system_resolver(name: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = unmapped(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
        if address not in seen:
            seen.append(address)
    return seen


@dataclass
class Stats:
    active: int = 0
    refused_over_limit: int = 0
    idle_closed: int = 0
    accept_errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def prometheus(self) -> bytes:
        # Decision counts are telemetry's `outrider_egress_decisions_total` (from observer.egress);
        # repeating that family here would make /metrics invalid.
        lines = [
            "# HELP outrider_egress_tunnel_limit_refusals_total Connections refused at max_tunnels.",
            "# TYPE outrider_egress_tunnel_limit_refusals_total counter",
            f"outrider_egress_tunnel_limit_refusals_total {self.refused_over_limit}",
            "# HELP outrider_egress_idle_closed_total Tunnels closed after idle_timeout_s without traffic.",
            "# TYPE outrider_egress_idle_closed_total counter",
            f"outrider_egress_idle_closed_total {self.idle_closed}",
            "# HELP outrider_egress_accept_errors_total accept() failures (e.g. out of file descriptors).",
            "# TYPE outrider_egress_accept_errors_total counter",
            f"outrider_egress_accept_errors_total {self.accept_errors}",
            "# HELP outrider_egress_active_tunnels Relayed outbound connections open now.",
            "# TYPE outrider_egress_active_tunnels gauge",
            f"outrider_egress_active_tunnels {self.active}",
            "# HELP outrider_egress_bytes_total Bytes relayed for allowed outbound connections.",
            "# TYPE outrider_egress_bytes_total counter",
            f'outrider_egress_bytes_total{{direction="up"}} {self.bytes_up}',
            f'outrider_egress_bytes_total{{direction="down"}} {self.bytes_down}',
        ]
        return ("\n".join(lines) + "\n").encode()


@dataclass
class _Activity:
    last: float  # loop time of the last byte relayed in either direction


class _Relayed:
    """How many answers of a plaintext HTTP connection have been relayed to the client in full."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def update(self, count: int) -> None:
        if count != self.count:
            self.count = count
            self._changed.set()

    async def reach(self, count: int) -> None:
        while self.count < count:
            self._changed.clear()
            await self._changed.wait()


@dataclass(frozen=True)
class _HttpConn:
    """What a plaintext HTTP connection was allowed as: each later request is judged against it."""

    dest: Destination  # the judged name (or literal) and port; ip: the upstream peer once connected
    mode: str
    explicit: bool  # absolute-URI proxy requests (rewritten to origin form) rather than captured ones


@dataclass(frozen=True)
class _Next:
    action: str  # "forward" | "refuse" (answer `status`) | "close" (no answer: the client reconnects) | "eof"
    status: int
    reason: str


_FORWARD = _Next("forward", 0, "")


def _safe_name(host: str | None) -> str | None:
    if host is None:
        return None
    try:
        return normalize_name(host)
    except ValueError:
        return None


class _Denied(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Enforcer:
    def __init__(
        self,
        config: EgressConfig,
        holder: PolicyHolder,
        observer: Observer,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.config = config
        self.holder = holder
        self.observer = observer
        self.resolver = resolver
        self.stats = Stats()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dns_cache: dict[str, tuple[float, list[IPAddress]]] = {}
        # Relaying tunnels and what they were allowed as, to re-judge them when the policy narrows.
        self._open: dict[asyncio.Task[Any], tuple[Destination, str, str]] = {}

    # --- listening ----------------------------------------------------------------------------------

    async def serve(self, listeners: Sequence[socket.socket]) -> None:
        """Accept on every listener until cancelled; then close every open connection."""
        try:
            async with asyncio.TaskGroup() as group:
                for listener in listeners:
                    group.create_task(self._accept_loop(listener))
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS under a connection flood: an accept failure must not end the
                # listener (the TaskGroup would stop serving every app connection); back off briefly.
                self.stats.accept_errors += 1
                log.warning("egress: accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            client.setblocking(False)
            if self.stats.active >= self.config.max_tunnels:
                # Refuse at once rather than queue: a flood must not pin memory or file descriptors.
                self.stats.refused_over_limit += 1
                self._emit_limit(client)
                client.close()
                continue
            # Count the slot here, not in the handler: an accept that succeeds at once does not yield,
            # so a backlog burst would otherwise be accepted whole before any handler ran.
            self.stats.active += 1
            task = asyncio.create_task(self._handle(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _emit_limit(self, client: socket.socket) -> None:
        original = original_destination(client)
        self._emit(
            Verdict(False, None, None, f"tunnel limit reached ({self.config.max_tunnels})"),
            mode=self.config.mode if original else "explicit",
            protocol="tcp",
            dest=Destination(port=original[1] if original else 0, ip=original[0] if original else None),
        )

    # --- one connection -----------------------------------------------------------------------------

    async def _handle(self, client: socket.socket) -> None:
        try:
            original = original_destination(client)
            if original is None:
                await self._explicit(client)
            else:
                await self._transparent(client, *original)
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.debug("egress connection ended: %s", exc)
        finally:
            self.stats.active -= 1
            client.close()

    async def _read_until(self, client: socket.socket, done: Callable[[bytes], bool]) -> bytes:
        """Read (not consume: the bytes are replayed upstream) until `done`, the byte cap, EOF or timeout."""
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        deadline = loop.time() + self.config.hello_timeout_s
        while not done(bytes(buffer)) and len(buffer) < self.config.peek_bytes:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(
                    loop.sock_recv(client, self.config.peek_bytes - len(buffer)), remaining
                )
            except TimeoutError:
                break
            if not chunk:
                break
            buffer += chunk
        return bytes(buffer)

    async def _transparent(self, client: socket.socket, ip: IPAddress, port: int) -> None:
        mode = self.config.mode
        by_address = decide(self.holder.current, Destination(port=port, ip=ip))
        if by_address.allowed:
            # A CIDR rule allows the address itself: no need to wait for the client (server-first
            # protocols such as SSH or SMTP would otherwise stall on the peek).
            upstream = await self._connect_or_report(
                [ip], port, by_address, mode, "tcp", Destination(port, ip=ip)
            )
            if upstream is not None:
                await self._relay(client, upstream, b"", Destination(port, ip=ip), mode, "tcp")
            return
        head = await self._read_until(client, lambda data: sniff.sniff(data).kind != sniff.NEED_MORE)
        found = sniff.sniff(head)
        protocol = found.kind if found.kind in (sniff.TLS, sniff.HTTP) else "tcp"
        if found.name is None:
            why = found.detail or (
                "no bytes before the timeout" if not head else "no name in the first bytes"
            )
            self._emit(
                Verdict(False, None, by_address.source, f"{by_address.reason} ({why})"),
                mode=mode,
                protocol=protocol,
                dest=Destination(port=port, ip=ip),
            )
            await self._refuse(client, protocol, f"{ip}:{port}", by_address.reason)
            return
        dest = destination_for(found.name, port, ip)
        if dest.name is None and dest.ip != ip:
            # The client named an IP literal (Host: 1.2.3.4) other than where it connected: judge the
            # literal, and if it is allowed connect to it, never to the original address.
            dest = Destination(port=port, ip=dest.ip)
        verdict = decide(self.holder.current, dest)
        if not verdict.allowed:
            self._emit(verdict, mode=mode, protocol=protocol, dest=dest)
            await self._refuse(client, protocol, f"{dest.name or dest.ip}:{port}", verdict.reason)
            return
        targets = await self._targets(dest, verdict, mode, protocol, prefer=ip)
        if targets is None:
            await self._refuse(client, protocol, f"{dest.name}:{port}", "cannot resolve the name", status=502)
            return
        upstream = await self._connect_or_report(targets, port, verdict, mode, protocol, dest)
        if upstream is None:
            await self._refuse(client, protocol, f"{dest.name}:{port}", "upstream unreachable", status=502)
            return
        if protocol == sniff.HTTP:
            # Plaintext HTTP: every request on the connection is judged, not only the first.
            await self._relay_http(client, upstream, head, _HttpConn(dest, mode, explicit=False))
            return
        await self._relay(client, upstream, head, dest, mode, protocol)

    async def _explicit(self, client: socket.socket) -> None:
        head_bytes = await self._read_until(client, lambda data: b"\r\n\r\n" in data)
        try:
            head = sniff.parse_request_head(head_bytes)
        except ValueError:
            head = None
        if head is None:
            await self._answer(
                client, _http_response(400, "outrider egress proxy: expected an HTTP/1.x request")
            )
            return
        rest = head_bytes[head.size :]
        if head.method == "CONNECT":
            protocol, default_port = "connect", None
            authority = head.target
        elif head.target.lower().startswith("http://"):
            protocol, default_port = "http", 80
            authority = sniff.uri_authority(head.target)
        else:
            await self._answer(
                client,
                _http_response(400, "outrider egress proxy: expected CONNECT or an absolute http:// URI"),
            )
            return
        try:
            host, port = sniff.split_host_port(authority, default_port)
        except ValueError as exc:
            await self._answer(client, _http_response(400, f"outrider egress proxy: bad authority ({exc})"))
            return
        if port is None:
            await self._answer(client, _http_response(400, "outrider egress proxy: CONNECT needs host:port"))
            return
        dest = destination_for(host, port)
        verdict = decide(self.holder.current, dest) if (dest.name or dest.ip) else _bad_name(host)
        if not verdict.allowed:
            self._emit(verdict, mode="explicit", protocol=protocol, dest=dest)
            await self._answer(
                client, _http_response(403, f"outrider egress: denied {host}:{port}: {verdict.reason}")
            )
            return
        targets = await self._targets(dest, verdict, "explicit", protocol, prefer=None)
        if targets is None:
            await self._answer(client, _http_response(502, f"outrider egress: cannot resolve {host}"))
            return
        upstream = await self._connect_or_report(targets, port, verdict, "explicit", protocol, dest)
        if upstream is None:
            await self._answer(client, _http_response(502, f"outrider egress: {host}:{port} unreachable"))
            return
        if protocol == "connect":
            await self._send(client, b"HTTP/1.1 200 Connection Established\r\n\r\n")
            # A tunnel to a name carries TLS for an allowed name only, as a captured connection does:
            # the allowed name's front end (a CDN, a cloud load balancer) routes by SNI to its other
            # tenants. A literal was allowed by a CIDR rule: whatever it serves is allowed.
            judged = dest.name is not None
            await self._relay(client, upstream, rest, dest, "explicit", protocol, judge_sni=judged)
            return
        await self._relay_http(client, upstream, head_bytes, _HttpConn(dest, "explicit", explicit=True))

    # --- helpers ------------------------------------------------------------------------------------

    async def _targets(
        self, dest: Destination, verdict: Verdict, mode: str, protocol: str, prefer: IPAddress | None
    ) -> list[IPAddress] | None:
        """Where to connect: the name's own addresses (the original IP first when it is one of them).

        The client's own IP is kept only when every layer allows that *address* by a CIDR rule: when
        one layer matched by name and another by CIDR, the address must still be one of the name's
        (else a narrowing layer with a CIDR rule would widen a name-only layer to that whole range).
        """
        policy = self.holder.current
        if dest.name is None:
            assert dest.ip is not None
            return [dest.ip]
        if dest.ip is not None and address_allowed(policy, dest.ip, dest.port):
            return [dest.ip]
        try:
            addresses, cached = await self._resolve(dest.name, dest.port, fresh=False)
            if cached and prefer is not None and prefer not in addresses:
                # The app may hold a newer answer than our cache: ask again before overriding its IP.
                addresses, _ = await self._resolve(dest.name, dest.port, fresh=True)
        except (OSError, TimeoutError) as exc:
            self._emit(
                Verdict(False, verdict.rule, verdict.source, f"allowed name does not resolve ({exc})"),
                mode=mode,
                protocol=protocol,
                dest=dest,
            )
            return None
        usable = name_addresses(policy, dest.name, addresses, dest.port)
        if not usable:
            self._emit(
                Verdict(
                    False,
                    verdict.rule,
                    verdict.source,
                    f"default deny: no address of {dest.name} ({', '.join(map(str, addresses))}) is allowed "
                    "(loopback/link-local/unspecified/multicast need a CIDR rule; CIDR-only layers "
                    "judge the address dialled)",
                ),
                mode=mode,
                protocol=protocol,
                dest=dest,
            )
            return None
        addresses = usable
        if prefer is not None and prefer in addresses:
            return [prefer]
        if prefer is not None:
            same = [a for a in addresses if a.version == prefer.version]
            return same + [a for a in addresses if a.version != prefer.version]
        return addresses

    async def _resolve(self, name: str, port: int, *, fresh: bool) -> tuple[list[IPAddress], bool]:
        """The name's addresses, from a short cache (answers do not carry their TTL through getaddrinfo)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        hit = self._dns_cache.get(name)
        if hit is not None and hit[0] > now and not fresh:
            return hit[1], True
        async with asyncio.timeout(self.config.connect_timeout_s):
            addresses = await self.resolver(name, port)
        if self.config.dns_cache_s > 0 and addresses:
            if len(self._dns_cache) >= 4096:
                self._dns_cache.clear()
            self._dns_cache[name] = (now + self.config.dns_cache_s, addresses)
        return addresses, False

    async def _connect_or_report(
        self,
        targets: Sequence[IPAddress],
        port: int,
        verdict: Verdict,
        mode: str,
        protocol: str,
        dest: Destination,
    ) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        last: Exception | None = None
        for address in targets:
            this_host = address.is_unspecified or (address.version == 4 and address.packed[0] == 0)
            if this_host or (address.is_loopback and port == self.config.port):
                # 0.0.0.0 means "this host", and our own listener would loop every hop back to us.
                last = OSError(f"refusing to connect to {address}:{port} (the egress listener itself)")
                continue
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            upstream = socket.socket(family, socket.SOCK_STREAM)
            upstream.setblocking(False)
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    await loop.sock_connect(upstream, (str(address), port))
            except (OSError, TimeoutError) as exc:
                upstream.close()
                last = exc
                continue
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reason = verdict.reason
            if dest.ip is not None and dest.name is not None and dest.ip != address:
                reason += f"; {dest.ip} is not an address of {dest.name}, connected to {address} instead"
            self._emit(
                Verdict(True, verdict.rule, verdict.source, reason),
                mode=mode,
                protocol=protocol,
                dest=Destination(port=port, name=dest.name, ip=address),
            )
            return upstream
        self._emit(
            Verdict(False, verdict.rule, verdict.source, f"allowed but unreachable: {last}"),
            mode=mode,
            protocol=protocol,
            dest=dest,
        )
        return None

    async def _refuse(
        self, client: socket.socket, protocol: str, target: str, reason: str, status: int = 403
    ) -> None:
        if protocol == sniff.HTTP:
            await self._answer(client, _http_response(status, f"outrider egress: denied {target}: {reason}"))
        # TLS and raw TCP: close. A forged TLS alert would only confuse clients into retrying.

    async def _send(self, sock: socket.socket, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(loop.sock_sendall(sock, data), self.config.hello_timeout_s)

    async def _answer(self, sock: socket.socket, data: bytes) -> None:
        """Send a final answer, then drain a little unread input: closing with unread bytes sends a
        RST, and a RST can destroy the answer before the client has read it."""
        loop = asyncio.get_running_loop()
        await self._send(sock, data)
        with contextlib.suppress(OSError, TimeoutError):
            sock.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < self.config.peek_bytes * 4:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 0.25)
                if not chunk:
                    break
                drained += len(chunk)

    # --- plaintext HTTP, request by request ----------------------------------------------------------

    async def _judge_request(self, head: sniff.RequestHead, conn: _HttpConn) -> _Next:
        """Whether one request on an open HTTP connection may go to its upstream (docs/egress.md)."""
        port = conn.dest.port
        try:
            host, target_port = http1.request_authority(head, explicit=conn.explicit)
        except ValueError as exc:
            return self._refuse_request(conn, None, f"{exc}")
        if conn.explicit and (target_port or 80) != port:
            return self._refuse_request(
                conn, host, f"another port ({target_port}) on this proxy connection", 0
            )
        named = destination_for(host, port)
        if named.name is None:
            # An IP literal, or a name that is no host name: judged by address (CIDR rules only), as a
            # connection's first request is. It once went up unjudged whenever the connection's own
            # address stood in for it: `Host: <the allowed name's IP>`, `shared..test` or
            # `evil.test%00` reached a shared front end that routes by Host.
            address = named.ip if named.ip is not None else conn.dest.ip
            verdict = decide(self.holder.current, Destination(port=port, ip=address))
            if not verdict.allowed:
                if named.ip is None:
                    return self._refuse_request(conn, host, f"{host!r} is not a valid host name")
                self._emit(verdict, mode=conn.mode, protocol=sniff.HTTP, dest=named)
                return _Next("refuse", 403, f"denied {host}:{port}: {verdict.reason}")
            if address == conn.dest.ip:
                return _FORWARD
            return self._refuse_request(conn, host, f"{host} on a connection opened for another host", 0)
        dest = Destination(port=port, name=named.name, ip=conn.dest.ip)
        if dest.name == conn.dest.name:
            return _FORWARD
        verdict = decide(self.holder.current, dest)
        if not verdict.allowed:
            self._emit(verdict, mode=conn.mode, protocol=sniff.HTTP, dest=dest)
            return _Next("refuse", 403, f"denied {host}:{port}: {verdict.reason}")
        # Allowed, but this connection goes to another name's address: the client must reconnect
        # (the new connection is judged and dialled at the name's own addresses).
        return self._refuse_request(conn, host, f"{host} on a connection opened for another host", 0)

    def _refuse_request(self, conn: _HttpConn, host: str | None, reason: str, status: int = 403) -> _Next:
        dest = Destination(port=conn.dest.port, name=_safe_name(host), ip=conn.dest.ip)
        self._emit(Verdict(False, None, None, reason), mode=conn.mode, protocol=sniff.HTTP, dest=dest)
        if status == 0:
            return _Next("close", 0, reason)
        return _Next("refuse", status, reason)

    async def _relay_http(
        self, client: socket.socket, upstream: socket.socket, first: bytes, conn: _HttpConn
    ) -> None:
        """Relay a plaintext HTTP connection; client->server is parsed request by request, and the server's
        answers are framed (not changed) to count them. The first refused request is answered as soon as
        every earlier request's answer has been relayed, in order; then the connection closes."""
        loop = asyncio.get_running_loop()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        if task is not None:
            with contextlib.suppress(OSError, ValueError):
                peer = unmapped(ipaddress.ip_address(str(upstream.getpeername()[0]).split("%")[0]))
                conn = _HttpConn(Destination(conn.dest.port, conn.dest.name, peer), conn.mode, conn.explicit)
                self._open[task] = (conn.dest, conn.mode, sniff.HTTP)
        activity = _Activity(loop.time())
        framer = http1_response.ResponseFramer()
        relayed = _Relayed()
        down = asyncio.create_task(self._answers(upstream, client, framer, relayed, activity))
        up = asyncio.create_task(self._requests(client, upstream, first, conn, activity, framer))
        try:
            ended = await self._wait_idle({up, down}, activity)
            if up in ended and not up.cancelled() and up.exception() is None:
                outcome = up.result()
                if outcome.action == "eof":
                    # The client is done sending (the upstream is told so too, as a relay does).
                    with contextlib.suppress(OSError):
                        upstream.shutdown(socket.SHUT_WR)
                # Every earlier request's answer first, in order, then ours (or the close) at once: the
                # upstream need not close (a kept-alive one would only after its own idle timeout).
                waiter = asyncio.create_task(relayed.reach(framer.asked))
                try:
                    await self._wait_idle({waiter, down}, activity)
                finally:
                    waiter.cancel()
                if relayed.count >= framer.asked and framer.error is None:
                    down.cancel()
                    await asyncio.gather(down, return_exceptions=True)
                    if outcome.action == "refuse":
                        await self._answer(
                            client, _http_response(outcome.status, f"outrider egress: {outcome.reason}")
                        )
                        return
            if down.done() and framer.error is not None:
                await self._bad_answer(client, conn, framer)
                return
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)
        finally:
            for pump in (up, down):
                pump.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            if task is not None:
                self._open.pop(task, None)
            upstream.close()

    async def _bad_answer(
        self, client: socket.socket, conn: _HttpConn, framer: http1_response.ResponseFramer
    ) -> None:
        """The upstream's answers could not be framed: audit it, answer 502 when nothing of the bad answer
        reached the client and a request is waiting for it, else just close (the client sees the cut)."""
        reason = f"bad HTTP response framing from the upstream: {framer.error}"
        self._emit(Verdict(False, None, None, reason), mode=conn.mode, protocol=sniff.HTTP, dest=conn.dest)
        if framer.error_at_boundary and framer.unanswered:
            await self._answer(client, _http_response(502, f"outrider egress: {reason}"))
            return
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    async def _answers(
        self,
        upstream: socket.socket,
        client: socket.socket,
        framer: http1_response.ResponseFramer,
        relayed: _Relayed,
        activity: _Activity,
    ) -> None:
        """Server -> client, unchanged, counting the answers relayed; ends at EOF or a framing error. Large
        bodies of known length, and a close-delimited one, move in the kernel as a tunnel's bytes do."""
        loop = asyncio.get_running_loop()
        buffer = bytearray(min(self.config.buffer_bytes, _SPLICE_BODY_MIN))
        view = memoryview(buffer)
        total = 0
        try:
            while True:
                if _HAVE_SPLICE and (framer.until_eof or framer.body_pending >= _SPLICE_BODY_MIN):
                    if framer.until_eof:
                        total += await self._splice(upstream, client, activity)
                        framer.eof()
                        relayed.update(framer.answered)
                        return
                    moved = await self._splice_exact(upstream, client, framer.body_pending, activity)
                    total += moved
                    if moved == 0:
                        return
                    framer.skip_body(moved)
                    relayed.update(framer.answered)
                    continue
                n = await loop.sock_recv_into(upstream, buffer)
                if n == 0:
                    framer.eof()
                    relayed.update(framer.answered)
                    return
                activity.last = loop.time()
                out = framer.feed(view[:n])
                if out:
                    await loop.sock_sendall(client, out)
                    total += len(out)
                relayed.update(framer.answered)
                if framer.error is not None:
                    return
                if n >= _PARSE_YIELD_BYTES:
                    await asyncio.sleep(0)  # as on the way up: framing costs Python time per line
        finally:
            self.stats.bytes_down += total

    async def _wait_idle(self, tasks: set[asyncio.Task[Any]], activity: _Activity) -> set[asyncio.Task[Any]]:
        """Wait for the first of `tasks` to end, or for `idle_timeout_s` without a byte either way."""
        loop = asyncio.get_running_loop()
        idle = self.config.idle_timeout_s
        pending = {t for t in tasks if not t.done()}
        done = {t for t in tasks if t.done()}
        while pending and not done:
            timeout = activity.last + idle - loop.time() if idle > 0 else None
            if timeout is not None and timeout <= 0:
                self.stats.idle_closed += 1
                break
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return done

    async def _requests(
        self,
        client: socket.socket,
        upstream: socket.socket,
        first: bytes,
        conn: _HttpConn,
        activity: _Activity,
        framer: http1_response.ResponseFramer,
    ) -> _Next:
        """Client -> server, one judged request at a time (each announced to `framer` before its bytes
        go up, so its answer can never arrive unannounced); returns why it stopped."""
        loop = asyncio.get_running_loop()
        parser = http1.RequestParser(self.config.peek_bytes)
        # Reads of at most 64 KiB: all of a read is parsed in one go (larger bodies are spliced).
        buffer = bytearray(min(self.config.buffer_bytes, _SPLICE_BODY_MIN))
        data = first
        while True:
            if data:
                try:
                    items = parser.feed(data)
                except http1.FramingError as exc:
                    return self._refuse_request(conn, None, f"bad HTTP request framing: {exc}", 400)
                out: list[bytes] = []
                stop: _Next | None = None
                for item in items:
                    if isinstance(item, http1.Head):
                        verdict = await self._judge_request(item.request, conn)
                        if verdict.action != "forward":
                            stop = verdict
                            break
                        framer.expect(item.request.method)
                        out.append(_origin_form(item.request) if conn.explicit else item.raw)
                    else:
                        out.append(item)
                if out:
                    payload = b"".join(out)
                    await loop.sock_sendall(upstream, payload)
                    self.stats.bytes_up += len(payload)
                    activity.last = loop.time()
                if stop is not None:
                    return stop
                if len(data) >= _PARSE_YIELD_BYTES:
                    # Parsing costs Python time per line (a body of tiny chunks: ~1 us a byte), and a
                    # read that finds data waiting never suspends: let the other connections have a
                    # turn, as the splicing relays do.
                    await asyncio.sleep(0)
            if parser.body_pending >= _SPLICE_BODY_MIN and _HAVE_SPLICE:
                # A large body of a judged request: move it in the kernel, as the answers are.
                moved = await self._splice_exact(client, upstream, parser.body_pending, activity)
                if moved == 0:
                    return _Next("eof", 0, "")
                parser.skip_body(moved)
                self.stats.bytes_up += moved
                data = b""
                continue
            n = await loop.sock_recv_into(client, buffer)
            if n == 0:
                return _Next("eof", 0, "")
            activity.last = loop.time()
            data = bytes(buffer[:n])

    def revalidate(self) -> int:
        """Close the open tunnels the current policy no longer allows (after a narrowing reload);
        returns how many were closed. Each closure is audited."""
        policy = self.holder.current
        closed = 0
        for task, (dest, mode, protocol) in list(self._open.items()):
            assert dest.ip is not None
            if task.done() or connection_allowed(policy, dest.name, dest.ip, dest.port):
                continue
            task.cancel()
            closed += 1
            verdict = decide(policy, dest)
            reason = verdict.reason if not verdict.allowed else f"no longer an allowed address of {dest.name}"
            self._emit(
                Verdict(False, None, verdict.source, f"policy narrowed, open tunnel closed: {reason}"),
                mode=mode,
                protocol=protocol,
                dest=dest,
            )
        return closed

    async def _relay(
        self,
        client: socket.socket,
        upstream: socket.socket,
        first: bytes,
        dest: Destination,
        mode: str,
        protocol: str,
        *,
        judge_sni: bool = False,
    ) -> None:
        """Relay both ways; with `judge_sni`, the client's first bytes are held until a TLS
        ClientHello in them is judged (the server's bytes flow meanwhile: it may speak first), and
        plaintext HTTP is relayed request by request, each judged by its Host."""
        loop = asyncio.get_running_loop()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        if task is not None:
            with contextlib.suppress(OSError, ValueError):
                peer = unmapped(ipaddress.ip_address(str(upstream.getpeername()[0]).split("%")[0]))
                self._open[task] = (Destination(port=dest.port, name=dest.name, ip=peer), mode, protocol)
        try:
            activity = _Activity(loop.time())
            down = asyncio.create_task(self._pump(upstream, client, "down", activity))
            try:
                judged = await self._tunnel_hello(client, first, dest, mode) if judge_sni else first
                plaintext = judge_sni and judged is not None and sniff.sniff(judged).kind == sniff.HTTP
                if judged and not plaintext:
                    await loop.sock_sendall(upstream, judged)
                    self.stats.bytes_up += len(judged)
            except BaseException:
                down.cancel()
                await asyncio.gather(down, return_exceptions=True)
                raise
            if judged is None or plaintext:
                down.cancel()
                await asyncio.gather(down, return_exceptions=True)
            if judged is None:
                return
            if plaintext:
                # Plaintext HTTP in the tunnel: every request is judged by its Host, as on a captured
                # connection (a shared front end routes by Host). An HTTP server never speaks first,
                # so the pump just stopped had nothing to pass on.
                await self._relay_http(client, upstream, judged, _HttpConn(dest, mode, explicit=False))
                return
            up = asyncio.create_task(self._pump(client, upstream, "up", activity))
            idle = self.config.idle_timeout_s
            try:
                # Either side failing (reset) ends both; a clean EOF only half-closes its direction;
                # no byte either way for `idle_timeout_s` ends both.
                pending: set[asyncio.Task[None]] = {up, down}
                while pending:
                    timeout = activity.last + idle - loop.time() if idle > 0 else None
                    if timeout is not None and timeout <= 0:
                        self.stats.idle_closed += 1
                        log.debug("egress tunnel idle for %.1f s: closing", idle)
                        break
                    done, pending = await asyncio.wait(
                        pending, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
                    )
                    if any(not t.cancelled() and t.exception() is not None for t in done):
                        break
            finally:
                for pump in (up, down):
                    pump.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        finally:
            if task is not None:
                self._open.pop(task, None)
            upstream.close()

    async def _tunnel_hello(
        self, client: socket.socket, first: bytes, dest: Destination, mode: str
    ) -> bytes | None:
        """The client's first bytes in a CONNECT tunnel to `dest.name`, or None when they are a TLS
        ClientHello for a name the policy does not allow at this port (or one that cannot be judged).

        Bytes that are not TLS (a server-first protocol, SSH, plaintext) go on as before.
        """
        if sniff.sniff(first).kind == sniff.NEED_MORE:
            first += await self._read_until(
                client, lambda data: sniff.sniff(first + data).kind != sniff.NEED_MORE
            )
        found = sniff.sniff(first)
        if found.kind == sniff.NEED_MORE and first[:1] == b"\x16":
            reason = "the TLS ClientHello did not arrive complete before the timeout"
        elif found.kind != sniff.TLS or (found.name is None and not found.detail):
            return first  # not TLS, or TLS without SNI: nothing to route by but the tunnel's own IPs
        elif found.name is None:
            reason = found.detail
        else:
            named = destination_for(found.name, dest.port)
            if named.name is not None and named.name == dest.name:
                return first
            verdict = (
                decide(self.holder.current, named) if (named.name or named.ip) else _bad_name(found.name)
            )
            if verdict.allowed:
                return first
            self._emit(
                Verdict(
                    False,
                    None,
                    verdict.source,
                    f"TLS server name in a tunnel to {dest.name}: {verdict.reason}",
                ),
                mode=mode,
                protocol=sniff.TLS,
                dest=Destination(port=dest.port, name=_safe_name(found.name), ip=dest.ip),
            )
            return None
        self._emit(
            Verdict(False, None, None, f"tunnel to {dest.name}: {reason}"),
            mode=mode,
            protocol=sniff.TLS,
            dest=dest,
        )
        return None

    async def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        direction: str,
        activity: _Activity,
        *,
        half_close: bool = True,
    ) -> None:
        """Copy until EOF, then half-close the sink. Never reads more than one pipe (or buffer) ahead of
        what the sink accepted, so a slow peer slows the other side down (back-pressure)."""
        total = 0
        try:
            if _HAVE_SPLICE:
                total = await self._splice(source, sink, activity)
            else:  # pragma: no cover - Linux always has splice
                total = await self._copy(source, sink, activity)
            if half_close:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
        finally:
            if direction == "up":
                self.stats.bytes_up += total
            else:
                self.stats.bytes_down += total

    async def _splice(self, source: socket.socket, sink: socket.socket, activity: _Activity) -> int:
        # Zero-copy: socket -> pipe -> socket inside the kernel; Python only waits for readiness.
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        total = yielded = 0
        try:
            # Start with the default pipe (64 KiB); grow it only for a bulk transfer, which saves two
            # syscalls on the many short request/response tunnels.
            chunk = _DEFAULT_PIPE
            src = source.fileno()
            while True:
                try:
                    n = os.splice(src, write_end, chunk, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await _ready(loop, source, write=False)
                    continue
                if n == 0:
                    return total
                if n == chunk and chunk < self.config.buffer_bytes:
                    with contextlib.suppress(OSError):
                        chunk = fcntl.fcntl(write_end, _F_SETPIPE_SZ, self.config.buffer_bytes)
                total += await _drain_pipe(loop, read_end, sink, n, activity)
                if total - yielded >= _YIELD_BYTES:
                    yielded = total
                    await asyncio.sleep(0)  # let the other tunnels (and new connections) have a turn
        finally:
            os.close(read_end)
            os.close(write_end)

    async def _splice_exact(
        self, source: socket.socket, sink: socket.socket, limit: int, activity: _Activity
    ) -> int:
        """Move at most `limit` bytes source -> sink in the kernel; fewer only at EOF."""
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        total = yielded = 0
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_end, _F_SETPIPE_SZ, self.config.buffer_bytes)
            src = source.fileno()
            while total < limit:
                try:
                    n = os.splice(
                        src, write_end, min(limit - total, self.config.buffer_bytes), flags=_SPLICE_FLAGS
                    )
                except BlockingIOError:
                    await _ready(loop, source, write=False)
                    continue
                if n == 0:
                    return total
                total += await _drain_pipe(loop, read_end, sink, n, activity)
                if total - yielded >= _YIELD_BYTES:
                    yielded = total
                    await asyncio.sleep(0)
            return total
        finally:
            os.close(read_end)
            os.close(write_end)

    async def _copy(self, source: socket.socket, sink: socket.socket, activity: _Activity) -> int:
        loop = asyncio.get_running_loop()
        buffer = bytearray(self.config.buffer_bytes)
        view = memoryview(buffer)
        total = yielded = 0
        while True:
            n = await loop.sock_recv_into(source, buffer)
            if n == 0:
                return total
            await loop.sock_sendall(sink, view[:n])
            total += n
            activity.last = loop.time()
            if total - yielded >= _YIELD_BYTES:
                yielded = total
                await asyncio.sleep(0)

    def _emit(self, verdict: Verdict, *, mode: str, protocol: str, dest: Destination) -> None:
        decision = EgressDecision(
            allowed=verdict.allowed,
            mode=mode,
            protocol=protocol,
            destination_ip=str(dest.ip) if dest.ip is not None else None,
            destination_port=dest.port,
            name=dest.name,
            rule=verdict.rule,
            reason=verdict.reason,
            source=verdict.source,
        )
        log.debug("egress decision %s", decision)
        try:
            self.observer.egress(decision)
        except Exception:  # an observer bug must not take the data path down
            log.exception("egress observer failed")


_HAVE_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_DEFAULT_PIPE = 65536
_SPLICE_BODY_MIN = 65536  # request bodies at least this large go client -> server by splice
_PARSE_YIELD_BYTES = 16384  # a parsed read at least this large yields to the loop once
# A relay that always finds data waiting and room to write never awaits anything that suspends: it
# would hold the event loop for as long as the transfer lasts (every other tunnel stalls, and new
# connections wait a whole round of every tunnel per step). Each relay yields after moving this much:
# a new connection under N bulk tunnels waits about N x this per step of its set-up.
_YIELD_BYTES = 256 << 10


async def _drain_pipe(
    loop: asyncio.AbstractEventLoop, read_end: int, sink: socket.socket, n: int, activity: _Activity
) -> int:
    """Splice the `n` bytes waiting in the pipe into `sink`, waiting while it is full; returns `n`."""
    dst = sink.fileno()
    left = n
    while left:
        try:
            moved = os.splice(read_end, dst, left, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            await _ready(loop, sink, write=True)
            continue
        left -= moved
        activity.last = loop.time()
    return n


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    """Wait until `sock` is readable (or writable)."""
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    fd = sock.fileno()
    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await future
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _bad_name(host: str) -> Verdict:
    return Verdict(False, None, None, f"default deny: {host!r} is not a valid host name")


def _origin_form(head: sniff.RequestHead) -> bytes:
    """Rewrite an absolute-URI proxy request for the origin server: origin-form target, `Host` from the
    URI (RFC 9110 §7.2: a proxy replaces a received Host; a disagreeing one was already refused), no
    hop-by-hop proxy headers, and the client's own wish to close the connection kept."""
    after_scheme = head.target.split("/", 3)
    path = "/" + after_scheme[3] if len(after_scheme) > 3 else "/"
    lines = [f"{head.method} {path} {head.version}", f"Host: {sniff.uri_authority(head.target)}"]
    close = head.version == "HTTP/1.0"
    for name, value in head.headers:
        lname = name.lower()
        if lname in ("connection", "proxy-connection"):
            tokens = {t.strip().lower() for t in value.split(",")}
            close = (close and "keep-alive" not in tokens) or "close" in tokens
            continue
        if lname in ("proxy-authorization", "keep-alive", "host"):
            continue
        lines.append(f"{name}: {value}")
    lines.append("Connection: close" if close else "Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _http_response(status: int, reason_line: str) -> bytes:
    phrase = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
    body = (reason_line.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8", errors="replace")
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def listen_sockets(addresses: Sequence[str], port: int) -> list[socket.socket]:
    """Bind the loopback listeners; an address family the pod lacks (no ::1) is skipped."""
    sockets: list[socket.socket] = []
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            log.warning("egress: cannot listen on [%s]:%d (%s); skipping", address, port, exc.strerror)
            continue
        sock.setblocking(False)
        sockets.append(sock)
    if not sockets:
        raise OSError(f"egress: could not listen on any of {list(addresses)} port {port}")
    return sockets
