"""DPoP (RFC 9449) proof checks as a pure function: every rule of §4.3 refuses what it should."""

from __future__ import annotations

import time

import pytest

from outrider.sidecar.inbound.dpop import (
    DpopGuard,
    NonceSource,
    ProofFacts,
    ReplayCache,
    check_proof,
    expected_htu,
    jwk_thumbprint,
    normalize_htu,
)
from outrider.sidecar.inbound.issuers import DpopConfig

from .dpop_client import DpopKey

URL = "https://mcp.example.com/mcp"
TOKEN = "the-access-token-bound-to-the-key"


def _check(proofs: tuple[str, ...], key: DpopKey, *, method: str = "POST", token: str = TOKEN, **kw):  # type: ignore[no-untyped-def]
    config = kw.pop("config", DpopConfig())
    replay = kw.pop("replay", ReplayCache(1000))
    return check_proof(
        ProofFacts(proofs, method, expected_htu("https://MCP.example.com:443/ignored", "/mcp")),
        access_token=token,
        jkt=kw.pop("jkt", key.jkt),
        config=config,
        now=kw.pop("now", time.time()),
        replay=replay,
        nonces=kw.pop("nonces", None),
    )


def test_thumbprint_matches_rfc7638_example() -> None:
    # RFC 7638 §3.1 example key and its thumbprint.
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1"
            "L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4"
            "QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbO"
            "pbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csF"
            "Cur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_htu_normalisation() -> None:
    assert normalize_htu("HTTPS://MCP.Example.com:443/mcp?x=1#f") == "https://mcp.example.com/mcp"
    assert normalize_htu("http://h:8080/a") == "http://h:8080/a"
    assert normalize_htu("ftp://h/a") is None and normalize_htu("https://h:99999/") is None


def test_a_good_proof_passes_and_cannot_be_replayed() -> None:
    key = DpopKey()
    replay = ReplayCache(1000)
    proof = key.proof("POST", URL, TOKEN)
    assert _check((proof,), key, replay=replay) is None
    again = _check((proof,), key, replay=replay)
    assert again is not None and again.status == 401 and "replay" in again.description


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda k, o: (), "send a DPoP proof"),
        (lambda k, o: (k.proof("POST", URL, TOKEN), k.proof("POST", URL, TOKEN)), "more than one"),
        (lambda k, o: (o.proof("POST", URL, TOKEN),), "another key"),
        (lambda k, o: (k.proof("GET", URL, TOKEN),), "another HTTP method"),
        (lambda k, o: (k.proof("POST", "https://evil.example.com/mcp", TOKEN),), "another URL"),
        (lambda k, o: (k.proof("POST", URL + "/other", TOKEN),), "another URL"),
        (lambda k, o: (k.proof("POST", URL, "some-other-token"),), "ath"),
        (lambda k, o: (k.proof("POST", URL, None),), "ath"),
        (lambda k, o: (k.proof("POST", URL, TOKEN, iat=time.time() - 600),), "iat"),
        (lambda k, o: (k.proof("POST", URL, TOKEN, iat=time.time() + 600),), "iat"),
        (lambda k, o: (k.proof("POST", URL, TOKEN, typ="JWT"),), "typ"),
        (lambda k, o: (k.proof("POST", URL, TOKEN, jwk={**k.jwk, "d": "AAAA"}),), "private"),
        (lambda k, o: (k.proof("POST", URL, TOKEN, jwk=o.jwk),), "another key"),
        (lambda k, o: ("not-a-jwt",), "not a JWT"),
        (lambda k, o: (k.proof("POST", URL, TOKEN)[:-6] + "AAAAAA",), "signature"),
    ],
)
def test_bad_proofs_are_refused(make, why) -> None:  # type: ignore[no-untyped-def]
    key, other = DpopKey(), DpopKey()
    failure = _check(make(key, other), key)
    assert failure is not None and failure.status == 401 and why in failure.description


@pytest.mark.parametrize("iat", [float("nan"), float("inf"), float("-inf"), "1700000000", True, None])
def test_a_proof_whose_iat_is_not_a_finite_number_is_refused_every_time(iat: object) -> None:
    """`"iat": NaN` (Python's json reads it) compared false with the window, so the proof passed, and
    its replay-cache entry (kept until NaN) was dropped at the next check: valid and replayable forever."""
    key = DpopKey()
    replay = ReplayCache(1000)
    proof = key.proof("POST", URL, TOKEN, claims_override={"iat": iat})
    for _ in range(3):
        failure = _check((proof,), key, replay=replay)
        assert failure is not None and "iat" in failure.description


def test_a_proof_whose_exp_is_nan_is_refused() -> None:
    key = DpopKey()
    failure = _check((key.proof("POST", URL, TOKEN, claims_override={"exp": float("nan")}),), key)
    assert failure is not None and "expired" in failure.description


def test_proof_signed_with_the_right_key_but_token_bound_elsewhere() -> None:
    key, other = DpopKey(), DpopKey()
    failure = _check((key.proof("POST", URL, TOKEN),), key, jkt=other.jkt)
    assert failure is not None and "another key" in failure.description


def test_nonce_is_demanded_then_accepted() -> None:
    key = DpopKey()
    nonces = NonceSource(300)
    now = time.time()
    first = _check((key.proof("POST", URL, TOKEN),), key, nonces=nonces, now=now)
    assert first is not None and first.error == "use_dpop_nonce" and first.nonce
    ok = _check((key.proof("POST", URL, TOKEN, nonce=first.nonce),), key, nonces=nonces, now=now)
    assert ok is None
    later = now + 900
    proof = key.proof("POST", URL, TOKEN, nonce=first.nonce, iat=later)
    stale = _check((proof,), key, nonces=nonces, now=later)
    assert stale is not None and stale.error == "use_dpop_nonce"


def test_replay_cache_is_bounded_and_forgets_expired_entries() -> None:
    cache = ReplayCache(1000)
    for i in range(5000):
        assert cache.first_use(f"key{i % 7}", f"k{i}", until=100.0, now=50.0)
    assert len(cache) <= 1000 and cache.evicted_total == 4000
    assert cache.first_use("key0", "late", until=300.0, now=200.0) and len(cache) == 1


def test_one_keys_flood_of_its_own_proofs_cannot_push_out_another_keys_proof() -> None:
    """A caller with a valid token and key sends proof after proof to make the cache forget the
    `jti` of someone else's captured proof, then replays that proof: still refused."""
    victim, flooder = DpopKey(), DpopKey()
    config = DpopConfig(replay_cache_size=1000)
    guard = DpopGuard(config)
    url = expected_htu(URL, "/mcp")
    captured = ProofFacts((victim.proof("POST", URL, TOKEN),), "POST", url)
    assert guard.check(captured, access_token=TOKEN, jkt=victim.jkt) is None  # the victim's own call
    for _ in range(config.replay_cache_size + 200):
        flood = ProofFacts((flooder.proof("POST", URL, TOKEN),), "POST", url)
        assert guard.check(flood, access_token=TOKEN, jkt=flooder.jkt) is None
    replayed = guard.check(captured, access_token=TOKEN, jkt=victim.jkt)
    assert replayed is not None and "already used" in replayed.description
    assert len(guard.replay) == config.replay_cache_size and guard.replay.evicted_total == 201


def test_a_flood_from_many_keys_evicts_the_newest_of_them_never_the_older_entry() -> None:
    cache = ReplayCache(1000)
    assert cache.first_use("victim", "captured", until=100.0, now=0.0)
    for i in range(3000):  # one proof each from fresh keys (each a token the IdP bound to a new key)
        assert cache.first_use(f"attacker{i}", "j", until=100.0, now=1.0)
        assert not cache.first_use(f"attacker{i}", "j", until=100.0, now=1.0)  # the new one is kept
    assert len(cache) == 1000
    assert not cache.first_use("victim", "captured", until=100.0, now=2.0)


def test_the_key_holding_the_most_loses_its_oldest_entry() -> None:
    cache = ReplayCache(1000)
    for i in range(400):
        assert cache.first_use("busy", f"b{i}", until=100.0, now=0.0)
        assert cache.first_use(f"quiet{i % 300}", f"q{i}", until=100.0, now=0.0)
    for i in range(300):
        assert cache.first_use("flood", f"f{i}", until=100.0, now=0.0)
    # Full at 1000: `busy` (400) lost its oldest first, then the two biggest lose in turn.
    assert len(cache) == 1000
    assert cache.first_use("busy", "b0", until=100.0, now=0.0)  # forgotten: the oldest went first
    assert not cache.first_use("busy", "b399", until=100.0, now=0.0)
    assert all(not cache.first_use(f"quiet{i % 300}", f"q{i}", until=100.0, now=0.0) for i in range(400))


def test_guard_counts() -> None:
    key = DpopKey()
    guard = DpopGuard(DpopConfig())
    facts = ProofFacts((key.proof("POST", URL, TOKEN),), "POST", expected_htu(URL, "/mcp"))
    assert guard.check(facts, access_token=TOKEN, jkt=key.jkt) is None
    assert guard.check(facts, access_token=TOKEN, jkt=key.jkt) is not None
    assert (guard.checked, guard.refused) == (2, 1)
