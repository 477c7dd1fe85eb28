"""Identity-provider profiles of the token exchange: one pure request builder + answer/error mapper each.

`exchange.profile` picks one (`rfc8693`, `entra-obo`, `okta`); the HTTP shell in
`outrider.sidecar.exchange.client` stays the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from outrider.sidecar.exchange import ExchangeError, IssuedToken
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.exchange.oauth import (
    ASSERTION_TYPE_JWT_SPIFFE,
    ClientCredential,
    TokenRequest,
    authenticated,
)

ASSERTION_TYPE_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


FormBuilder = Callable[..., dict[str, str]]
AnswerParser = Callable[..., IssuedToken]
ErrorMapper = Callable[[int, bytes, tuple[str, ...]], ExchangeError]


@dataclass(frozen=True)
class Profile:
    """What differs between providers; every function is pure (no I/O, the clock is passed in).

    - `assertion_type`: the `client_assertion_type` sent with a JWT-SVID (`auth: jwt-svid`);
    - `assertion_audience(config)`: the audience the JWT-SVID is minted for;
    - `form(config, subject_token, audience=, scope=, actor_token=)`: the request body before client
      authentication, which `build` adds the same way for every provider;
    - `parse(body, config=, audience=, now=, secrets=)`: a 200 answer into an `IssuedToken`;
    - `map_error(status, body, secrets)`: any other answer into a token-free `ExchangeError`.
    """

    name: str
    assertion_type: str
    assertion_audience: Callable[[ExchangeConfig], str]
    form: FormBuilder
    parse: AnswerParser
    map_error: ErrorMapper

    def build(
        self,
        config: ExchangeConfig,
        subject_token: str,
        *,
        audience: str | None,
        scope: str | None,
        credential: ClientCredential,
        actor_token: str | None = None,
    ) -> TokenRequest:
        """The token request: the provider's form plus the client credential."""
        form = self.form(config, subject_token, audience=audience, scope=scope, actor_token=actor_token)
        return authenticated(form, credential)


def profile_for(name: str) -> Profile:
    from outrider.sidecar.exchange.profiles import entra_obo, okta, rfc8693

    profiles = {p.name: p for p in (rfc8693.PROFILE, entra_obo.PROFILE, okta.PROFILE)}
    return profiles[name]


__all__ = [
    "ASSERTION_TYPE_JWT_BEARER",
    "ASSERTION_TYPE_JWT_SPIFFE",
    "ClientCredential",
    "Profile",
    "TokenRequest",
    "profile_for",
]
