"""How the enforcer resolves an allowed name: straight from the pod's DNS servers, never /etc/hosts.

The pod's /etc/hosts is shared by every container and written from `spec.hostAliases` (app-team
owned) and by a root app at run time, so trusting it would let the app choose the IP of any allowed
name. The resolv.conf settings are read once, when the sidecar starts (before the app containers).
"""

from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncresolver
import dns.exception
import dns.resolver

from outrider.sidecar.egress.policy import IPAddress, unmapped

DEFAULT_RESOLV_CONF = "/etc/resolv.conf"


class DnsResolver:
    """A/AAAA lookups with the resolv.conf snapshot's servers, search list and ndots."""

    def __init__(self, resolv_conf: str = DEFAULT_RESOLV_CONF, timeout_s: float = 5.0) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        try:
            self._resolver.read_resolv_conf(resolv_conf)
        except (OSError, dns.resolver.NoResolverConfiguration) as exc:
            raise OSError(f"egress: cannot read the DNS servers from {resolv_conf}: {exc}") from None
        # A nameserver on loopback would be a process inside the pod, i.e. possibly the app (a root app
        # can rewrite the shared resolv.conf before a sidecar restart): never ask one.
        servers = [n for n in self._resolver.nameservers if not _is_loopback(str(n))]
        if not servers:
            raise OSError(f"egress: {resolv_conf} lists no DNS server outside loopback")
        self._resolver.nameservers = servers
        self._resolver.lifetime = timeout_s
        self._resolver.cache = None  # the enforcer has its own short cache

    @property
    def nameservers(self) -> list[str]:
        return [str(n) for n in self._resolver.nameservers]

    async def __call__(self, name: str, port: int) -> list[IPAddress]:
        answers = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        addresses: list[IPAddress] = []
        errors: list[str] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                errors.append(str(answer) or type(answer).__name__)
                continue
            for address in answer:
                if address not in addresses:
                    addresses.append(address)
        if not addresses:
            raise OSError(f"{name} does not resolve ({'; '.join(errors) or 'no addresses'})")
        return addresses

    async def _query(self, name: str, rdtype: str) -> list[IPAddress]:
        try:
            answer = await self._resolver.resolve(name, rdtype, search=True)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        except dns.exception.DNSException as exc:
            raise OSError(f"{rdtype} lookup failed: {exc}") from None
        return [unmapped(ipaddress.ip_address(record.address)) for record in answer]


def _is_loopback(server: str) -> bool:
    try:
        return unmapped(ipaddress.ip_address(server.split("%")[0])).is_loopback
    except ValueError:  # a DoH/DoT URL form: not from resolv.conf
        return False


async def unresolvable(name: str, port: int) -> list[IPAddress]:
    """The resolver when the pod's DNS servers are unusable: fail closed (never fall back to /etc/hosts)."""
    raise OSError("the egress resolver has no usable DNS server")
