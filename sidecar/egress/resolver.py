"""How the enforcer resolves an allowed name: straight from the pod's DNS servers, never /etc/hosts.

The pod's /etc/hosts is shared by every container and written from `spec.hostAliases` (app-team
owned) and by a root app at run time, so trusting it would let the app choose the IP of any allowed
name. The resolv.conf settings are read once, when the sidecar starts (before the app containers).
dnspython (~4 MB of RSS) is loaded at the first lookup, so a pod that never reaches an allowed name
by name never pays for it.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

from outrider.sidecar.egress.policy import IPAddress, unmapped

if TYPE_CHECKING:
    import dns.asyncresolver

DEFAULT_RESOLV_CONF = "/etc/resolv.conf"


class DnsResolver:
    """A/AAAA lookups with the resolv.conf snapshot's servers, search list and ndots."""

    def __init__(self, resolv_conf: str = DEFAULT_RESOLV_CONF, timeout_s: float = 5.0) -> None:
        try:
            # The snapshot: what the file says now, before any app container runs.
            self._snapshot = Path(resolv_conf).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise OSError(f"egress: cannot read the DNS servers from {resolv_conf}: {exc}") from None
        listed = resolv_conf_nameservers(self._snapshot)
        if not listed:
            raise OSError(f"egress: cannot read the DNS servers from {resolv_conf}: no nameserver line")
        # A nameserver on loopback would be a process inside the pod, i.e. possibly the app (a root app
        # can rewrite the shared resolv.conf before a sidecar restart): never ask one.
        self._servers = [n for n in listed if not _is_loopback(n)]
        if not self._servers:
            raise OSError(f"egress: {resolv_conf} lists no DNS server outside loopback")
        self._timeout_s = timeout_s
        self._resolver: dns.asyncresolver.Resolver | None = None

    @property
    def nameservers(self) -> list[str]:
        return list(self._servers)

    def _dns(self) -> dns.asyncresolver.Resolver:
        """dnspython's resolver over the snapshot (search list, ndots), built at the first lookup."""
        if self._resolver is None:
            import dns.asyncresolver  # here, not at the top: see the module docstring

            resolver = dns.asyncresolver.Resolver(configure=False)
            try:
                resolver.read_resolv_conf(io.StringIO(self._snapshot))
                resolver.nameservers = list(self._servers)
            except Exception as exc:  # a line dnspython rejects: fail closed, with the reason
                raise OSError(f"egress: the DNS configuration is unusable: {exc}") from None
            resolver.lifetime = self._timeout_s
            resolver.cache = None  # the enforcer has its own short cache
            self._resolver = resolver
        return self._resolver

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
        import dns.exception
        import dns.resolver

        resolver = self._dns()
        try:
            answer = await resolver.resolve(name, rdtype, search=True)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        except dns.exception.DNSException as exc:
            raise OSError(f"{rdtype} lookup failed: {exc}") from None
        return [unmapped(ipaddress.ip_address(record.address)) for record in answer]


def resolv_conf_nameservers(text: str) -> list[str]:
    """The `nameserver` entries of resolv.conf text, read as dnspython reads them."""
    servers: list[str] = []
    for line in text.splitlines():
        if not line or line[0] in "#;":
            continue
        tokens = line.split()
        if len(tokens) >= 2 and tokens[0] == "nameserver":
            servers.append(tokens[1])
    return servers


def _is_loopback(server: str) -> bool:
    try:
        return unmapped(ipaddress.ip_address(server.split("%")[0])).is_loopback
    except ValueError:  # a DoH/DoT URL form: not from resolv.conf
        return False


async def unresolvable(name: str, port: int) -> list[IPAddress]:
    """The resolver when the pod's DNS servers are unusable: fail closed (never fall back to /etc/hosts)."""
    raise OSError("the egress resolver has no usable DNS server")
