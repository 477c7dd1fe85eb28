"""The pod's SPIFFE workload identity as the rest of the sidecar sees it.

`WorkloadIdentity` is the contract; `outrider.sidecar.identity.workload` implements it over the Workload API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class IdentityUnavailable(Exception):
    """No usable SVID right now (agent down, no registration entry, not fetched yet)."""


@dataclass(frozen=True)
class X509Material:
    """The current X.509-SVID as PEM, plus the trust bundles by trust domain."""

    spiffe_id: str
    cert_chain_pem: bytes
    private_key_pem: bytes = field(repr=False)  # never in a log line or traceback
    bundles_pem: dict[str, bytes]
    not_after: float  # unix seconds


class WorkloadIdentity(Protocol):
    @property
    def spiffe_id(self) -> str | None:
        """The pod's SPIFFE ID once the first X.509-SVID arrived."""

    @property
    def ready(self) -> bool:
        """True while a valid SVID is held and the Workload API stream is healthy."""

    @property
    def status(self) -> str:
        """One line for /readyz and logs: what is wrong and what to check, or 'ok'."""

    def x509(self) -> X509Material:
        """The current X.509-SVID; raises IdentityUnavailable when none is held."""

    async def jwt_svid(self, audience: str) -> str:
        """A JWT-SVID for `audience` (cached until about half its lifetime); raises IdentityUnavailable."""
