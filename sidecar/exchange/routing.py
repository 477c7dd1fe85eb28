"""One exchanger per trusted issuer: a caller's token is exchanged at its own issuer's IdP only.

`IssuerExchangers.for_issuer` is the only way the proxy picks an exchanger when several issuers
are trusted; an issuer without an exchange gets None (the call is forwarded with no downstream token).
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.exchange import ExchangeError, IssuedToken, TokenExchanger


class IssuerExchangers:
    def __init__(self, by_issuer: Mapping[str, TokenExchanger | None]) -> None:
        self._by_issuer = dict(by_issuer)

    def for_issuer(self, issuer: str | None) -> TokenExchanger | None:
        if issuer is None or issuer not in self._by_issuer:
            return _Refuse()
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
    ) -> IssuedToken:
        exchanger = self.for_issuer(issuer)
        if exchanger is None:
            raise ExchangeError(
                "no token exchange is configured for the caller's issuer",
                outcome="idp_error",
                http_status=502,
            )
        return await exchanger.exchange(subject_token, audience=audience, scope=scope, issuer=issuer)


class _Refuse:
    """For a principal whose issuer is not in the table (never another issuer's exchanger)."""

    async def exchange(
        self,
        subject_token: str,
        *,
        audience: str | None = None,
        scope: str | None = None,
        issuer: str | None = None,
    ) -> IssuedToken:
        raise ExchangeError(
            "the caller's issuer has no token exchange in this sidecar", outcome="idp_error", http_status=502
        )
