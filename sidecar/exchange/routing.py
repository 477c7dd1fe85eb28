"""One exchanger per trusted issuer: a caller's token is exchanged at its own issuer's IdP only.

`IssuerExchangers.for_issuer` is the only way the proxy picks an exchanger when several issuers
are trusted; an issuer without an exchange gets None (the call is forwarded with no downstream token).
"""

from __future__ import annotations

from collections.abc import Mapping

from outrider.sidecar.exchange import IssuedToken, RefusingExchanger, TokenExchanger

_NO_EXCHANGE = RefusingExchanger("no token exchange is configured for the caller's issuer")
_UNKNOWN_ISSUER = RefusingExchanger("the caller's issuer has no token exchange in this sidecar")


class IssuerExchangers:
    def __init__(self, by_issuer: Mapping[str, TokenExchanger | None]) -> None:
        self._by_issuer = dict(by_issuer)

    def for_issuer(self, issuer: str | None) -> TokenExchanger | None:
        """None for an issuer without an exchange; a refusal (never another issuer's) for an unknown one."""
        if issuer is None or issuer not in self._by_issuer:
            return _UNKNOWN_ISSUER
        return self._by_issuer[issuer]

    def exchangers(self) -> list[TokenExchanger]:
        return [e for e in self._by_issuer.values() if e is not None]

    async def exchange(
        self,
        subject_token: str,
        *,
        audience: str | None = None,
        scope: str | None = None,
        issuer: str | None = None,
        subject_hash: str | None = None,
    ) -> IssuedToken:
        exchanger = self.for_issuer(issuer) or _NO_EXCHANGE
        return await exchanger.exchange(
            subject_token, audience=audience, scope=scope, issuer=issuer, subject_hash=subject_hash
        )
