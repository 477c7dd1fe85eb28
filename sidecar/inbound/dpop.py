"""DPoP (RFC 9449) proof checks for sender-constrained tokens: the proof, its binding, replay, nonces.

`check_proof` is pure (the clock and the replay cache are passed in); `DpopGuard` holds the state.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlsplit, urlunsplit

import jwt

from outrider.sidecar.inbound.auth import AuthFailure
from outrider.sidecar.inbound.holders import HolderCounts
from outrider.sidecar.inbound.issuers import DpopConfig

# RFC 7638 §3.2: the required members of each key type, in the order the thumbprint hashes them.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_FAMILY = {"ES": "EC", "RS": "RSA", "PS": "RSA", "Ed": "OKP"}
MAX_PROOF_CHARS = 8192
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class DpopFailure(AuthFailure):
    """A refused DPoP proof: challenged with the `DPoP` scheme (RFC 9449 §7.1), maybe with a nonce."""

    nonce: str | None = None  # sent back as `DPoP-Nonce` (error `use_dpop_nonce`)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str | None:
    """RFC 7638 SHA-256 thumbprint of a public JWK (what `cnf.jkt` holds); None for odd keys."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or not all(isinstance(jwk.get(m), str) for m in members):
        return None
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def access_token_hash(token: str) -> str:
    """The `ath` claim: base64url(SHA-256(ASCII access token)) (RFC 9449 §4.2)."""
    return b64url(hashlib.sha256(token.encode()).digest())


def normalize_htu(url: str) -> str | None:
    """RFC 9449 §4.3: compare without query and fragment; scheme and host case-insensitively,
    default ports dropped (RFC 3986 §6.2.3)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path or "/", "", ""))


def expected_htu(public_url: str, request_path: str) -> str:
    """The `htu` a proof must carry for a request: the sidecar's public origin + the request path."""
    parts = urlsplit(public_url)
    return normalize_htu(urlunsplit((parts.scheme, parts.netloc, request_path or "/", "", ""))) or ""


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def parse_jws(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes] | None:
    """(header, claims, signing input, signature) of a compact JWS with JSON objects, else None.

    Parsed here rather than by PyJWT's `decode`: a proof is checked on every call and PyJWT's
    per-character segment validation costs more than the signature check.
    """
    parts = token.split(".")
    if len(parts) != 3 or not all(_SEGMENT.fullmatch(p) for p in parts):
        return None
    try:
        header = json.loads(_b64decode(parts[0]))
        claims = json.loads(_b64decode(parts[1]))
        signature = _b64decode(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims, f"{parts[0]}.{parts[1]}".encode(), signature


def _finite_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fail(description: str, *, error: str = "invalid_dpop_proof", nonce: str | None = None) -> DpopFailure:
    return DpopFailure(401, error, description, nonce=nonce)


class ReplayCache:
    """Proof `jti`s seen within the `iat` window, per proof key (`jkt`); bounded in total.

    Entries leave when their window passes. When the cache is full the key holding the most entries
    loses its oldest one (ties: the key that reached that count last), so a caller flooding with
    their own proofs only ever pushes out their own: never the entry that stops someone else's
    captured proof from being replayed. `evicted_total` counts entries dropped while still valid.
    """

    def __init__(self, max_size: int) -> None:
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # (jkt, jti) -> until, oldest first
        self._by_key: dict[str, OrderedDict[str, None]] = {}  # jkt -> its jtis, oldest first
        self._holders = HolderCounts()
        self._max = max_size
        self.evicted_total = 0

    def __len__(self) -> int:
        return len(self._seen)

    def first_use(self, jkt: str, jti: str, until: float, now: float) -> bool:
        """Record `jti` of key `jkt` until `until`; False when it was already used and is still remembered."""
        seen = self._seen
        while seen:
            oldest, oldest_until = next(iter(seen.items()))
            if oldest_until > now:
                break
            self._drop(oldest)
        entry = (jkt, jti)
        if entry in seen:
            return False
        seen[entry] = until
        held = self._by_key.get(jkt)
        if held is None:
            held = self._by_key[jkt] = OrderedDict()
        held[jti] = None
        self._holders.moved(jkt, len(held) - 1, len(held))
        if len(seen) > self._max:
            self._drop(self._victim(jkt))
            self.evicted_total += 1
        return True

    def _victim(self, newcomer: str) -> tuple[str, str]:
        """The oldest entry of the key holding the most, never the entry just recorded."""
        keys = reversed(self._holders.holding_most())
        jkt = next(keys)
        if jkt == newcomer and self._holders.most == 1:
            # Its only entry is the one just recorded: forgetting it would make that proof replayable.
            jkt = next(keys)  # (there is another: the cache holds more than one entry)
        return jkt, next(iter(self._by_key[jkt]))

    def _drop(self, entry: tuple[str, str]) -> None:
        del self._seen[entry]
        jkt, jti = entry
        held = self._by_key[jkt]
        del held[jti]
        self._holders.moved(jkt, len(held) + 1, len(held))
        if not held:
            del self._by_key[jkt]


class KeyCache:
    """Parsed public keys by thumbprint: a client signs every proof with the same key, and building
    the key object from its JWK costs more than the signature check itself."""

    def __init__(self, max_size: int = 4096) -> None:
        self._keys: OrderedDict[str, Any] = OrderedDict()
        self._max = max_size

    def get(self, thumbprint: str, alg: str, jwk: Mapping[str, Any]) -> Any:
        cache_key = f"{alg}:{thumbprint}"
        key = self._keys.get(cache_key)
        if key is None:
            key = jwt.get_algorithm_by_name(alg).from_jwk(dict(jwk))
            self._keys[cache_key] = key
            while len(self._keys) > self._max:
                self._keys.popitem(last=False)
        return key


class NonceSource:
    """Stateless server nonces: HMAC of the time slot, accepted for the current and previous slot."""

    def __init__(self, lifetime_s: float, key: bytes | None = None) -> None:
        self._lifetime = lifetime_s
        self._key = key or os.urandom(32)

    def _for_slot(self, slot: int) -> str:
        return b64url(hmac.new(self._key, str(slot).encode(), hashlib.sha256).digest()[:18])

    def current(self, now: float) -> str:
        return self._for_slot(int(now // self._lifetime))

    def valid(self, nonce: object, now: float) -> bool:
        if not isinstance(nonce, str):
            return False
        slot = int(now // self._lifetime)
        return any(hmac.compare_digest(nonce, self._for_slot(s)) for s in (slot, slot - 1))


@dataclass(frozen=True)
class ProofFacts:
    """What the request says: the DPoP header(s), method, and the URL the caller must have used."""

    proofs: tuple[str, ...]
    method: str
    htu: str  # already normalised with `expected_htu`


def check_proof(
    facts: ProofFacts,
    *,
    access_token: str,
    jkt: str,
    config: DpopConfig,
    now: float,
    replay: ReplayCache,
    nonces: NonceSource | None,
    keys: KeyCache | None = None,
) -> DpopFailure | None:
    """Every RFC 9449 §4.3 check of the proof for a bound token; None when the proof is good."""
    if not facts.proofs:
        return _fail("this access token is DPoP-bound: send a DPoP proof", error="invalid_token")
    if len(facts.proofs) > 1:
        return _fail("more than one DPoP header")
    proof = facts.proofs[0]
    if len(proof) > MAX_PROOF_CHARS:
        return _fail("the DPoP proof is too large")
    parsed = parse_jws(proof)
    if parsed is None:
        return _fail("the DPoP proof is not a JWT")
    header, claims, signing_input, signature = parsed
    if header.get("typ") != "dpop+jwt":
        return _fail("the DPoP proof's typ is not dpop+jwt")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in config.algorithms:
        return _fail("the DPoP proof's algorithm is not allowed")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict) or _PRIVATE_MEMBERS & set(jwk) or jwk.get("kty") != _FAMILY.get(alg[:2]):
        return _fail("the DPoP proof's jwk is missing, private or of the wrong key type")
    thumbprint = jwk_thumbprint(jwk)
    if thumbprint is None or not hmac.compare_digest(thumbprint, jkt):
        return _fail("the DPoP proof is signed by another key than the one the token is bound to")
    try:
        key = (keys or KeyCache(1)).get(thumbprint, alg, jwk)
        valid = jwt.get_algorithm_by_name(alg).verify(signing_input, key, signature)
    except (jwt.InvalidKeyError, jwt.PyJWKError, ValueError, TypeError, NotImplementedError):
        valid = False
    if not valid:
        return _fail("the DPoP proof's signature is invalid")
    exp = claims.get("exp")
    if exp is not None and (not _finite_number(exp) or exp <= now):
        return _fail("the DPoP proof has expired")
    jti, htm, htu, iat = claims.get("jti"), claims.get("htm"), claims.get("htu"), claims.get("iat")
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        return _fail("the DPoP proof has no jti")
    if htm != facts.method:
        return _fail("the DPoP proof was made for another HTTP method")
    if not isinstance(htu, str) or normalize_htu(htu) != facts.htu:
        return _fail("the DPoP proof was made for another URL")
    # Finite: `NaN` (which Python's json reads) compares false with everything, so a NaN `iat` would
    # pass the window and its replay-cache entry would never count: valid and replayable forever.
    if not _finite_number(iat) or abs(now - iat) > config.iat_window_s:
        return _fail("the DPoP proof's iat is missing or outside the accepted window")
    ath = claims.get("ath")
    if not isinstance(ath, str) or not hmac.compare_digest(ath, access_token_hash(access_token)):
        return _fail("the DPoP proof is not bound to this access token (ath)")
    if nonces is not None and not nonces.valid(claims.get("nonce"), now):
        return _fail("a fresh DPoP nonce is required", error="use_dpop_nonce", nonce=nonces.current(now))
    # Replay: the same jti for the same key within the window (checked last: only good proofs count).
    if not replay.first_use(jkt, jti, until=float(iat) + config.iat_window_s, now=now):
        return _fail("the DPoP proof was already used (replay)")
    return None


class DpopGuard:
    """The DPoP state of one sidecar: config, replay cache and nonce source."""

    def __init__(self, config: DpopConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.replay = ReplayCache(config.replay_cache_size)
        self.nonces = NonceSource(config.nonce_lifetime_s) if config.nonce else None
        self.keys = KeyCache()
        self._clock = clock
        self.checked = 0
        self.refused = 0

    def check(self, facts: ProofFacts, *, access_token: str, jkt: str) -> DpopFailure | None:
        self.checked += 1
        failure = check_proof(
            facts,
            access_token=access_token,
            jkt=jkt,
            config=self.config,
            now=self._clock(),
            replay=self.replay,
            nonces=self.nonces,
            keys=self.keys,
        )
        if failure is not None:
            self.refused += 1
        return failure

    def refuse(self, description: str) -> DpopFailure:
        """A refusal decided before any proof is looked at (wrong scheme for the token's binding)."""
        self.refused += 1
        return DpopFailure(401, "invalid_token", description)

    def current_nonce(self) -> str | None:
        return self.nonces.current(self._clock()) if self.nonces else None
