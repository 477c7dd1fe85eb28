"""Pure parts of the identity: config, SVID message parsing, JWT lifetimes, backoff, classification."""

from __future__ import annotations

import base64
import json
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from outrider.sidecar.config import ConfigError
from outrider.sidecar.dev.workload_api import DevCA
from outrider.sidecar.identity import svid as core
from outrider.sidecar.identity.config import DEFAULT_SOCKET, IdentityConfig


def test_config_defaults_follow_the_csi_mount() -> None:
    assert IdentityConfig.from_mapping({}, env={}).socket == DEFAULT_SOCKET
    assert IdentityConfig.from_mapping({}, env={}).socket_path == "/spiffe-workload-api/spire-agent.sock"


def test_config_reads_the_spiffe_endpoint_socket_env_and_normalises() -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:/run/agent.sock"}
    assert IdentityConfig.from_mapping({}, env=env).socket == "unix:///run/agent.sock"
    assert IdentityConfig.from_mapping({"socket": "/x/y.sock"}, env=env).socket == "unix:///x/y.sock"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"socket": "tcp://127.0.0.1:8081"}, "identity.socket"),
        ({"socket": "unix://relative.sock"}, "identity.socket"),
        ({"backoff_min_s": "soon"}, "identity.backoff_min_s"),
        ({"backoff_min_s": 5, "backoff_max_s": 1}, "identity.backoff_max_s"),
        ({"jwt_refresh_fraction": 1.5}, "identity.jwt_refresh_fraction"),
        ({"sockett": "unix:///a"}, "unknown key"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        IdentityConfig.from_mapping(data, env={})


def test_material_from_a_workload_api_message() -> None:
    ca = DevCA()
    ca.rotate_x509_root()  # two roots in the bundle, as after a CA rotation
    chain, key, not_after = ca.issue_x509("spiffe://example.org/app", 600)
    material = core.material_from_response(
        "spiffe://example.org/app",
        chain,
        key,
        ca.bundle_der,
        {"spiffe://other.org": ca.roots[0].cert.public_bytes(Encoding.DER)},
    )
    assert material.spiffe_id == "spiffe://example.org/app"
    assert material.not_after == int(not_after.timestamp())
    assert b"BEGIN PRIVATE KEY" in material.private_key_pem
    assert sorted(material.bundles_pem) == ["example.org", "other.org"]
    assert len(x509.load_pem_x509_certificates(material.bundles_pem["example.org"])) == 2


def test_material_refuses_a_leaf_with_another_spiffe_id() -> None:
    ca = DevCA()
    chain, key, _ = ca.issue_x509("spiffe://example.org/other", 600)
    with pytest.raises(core.SvidFormatError, match="does not carry"):
        core.material_from_response("spiffe://example.org/app", chain, key, ca.bundle_der, {})


def test_split_der_rejects_garbage_and_truncation() -> None:
    ca = DevCA()
    der = ca.bundle_der
    assert core.split_der(der + der) == [der, der]
    with pytest.raises(ValueError):
        core.split_der(der[:-1])
    with pytest.raises(ValueError):
        core.split_der(b"\x04\x01a")


def _jwt(claims: dict[str, object]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"e30.{body}.sig"


def test_jwt_refresh_at_half_lifetime() -> None:
    times = core.jwt_times(_jwt({"iat": 1000, "exp": 1300}), now=5)
    assert core.jwt_refresh_at(times, 0.5) == 1150
    no_iat = core.jwt_times(_jwt({"exp": 1300}), now=1100)
    assert core.jwt_refresh_at(no_iat, 0.5) == 1200
    with pytest.raises(core.SvidFormatError):
        core.jwt_times("not-a-jwt", now=0)


def test_backoff_grows_within_bounds_with_jitter() -> None:
    rng = random.Random(7)
    delays = [core.backoff_delay(n, 0.5, 15, rng) for n in range(12)]
    assert all(0.25 <= d <= 15 for d in delays)
    assert delays[0] <= 0.5
    assert min(delays[8:]) >= 7.5  # capped step 15 s, at least half of it
    assert len(set(delays)) == len(delays)  # jittered


def test_classification_says_what_to_check() -> None:
    state, detail = core.classify("UNAVAILABLE", "", socket_path="/s.sock", socket_exists=False)
    assert state == core.SOCKET_MISSING and "csi.spiffe.io" in detail
    state, detail = core.classify(
        "PERMISSION_DENIED", "no identity issued", socket_path="/s", socket_exists=True
    )
    assert state == core.NO_ENTRY and "registration entry" in detail and "PermissionDenied" in detail
    state, _ = core.classify("UNAVAILABLE", "connection refused", socket_path="/s", socket_exists=True)
    assert state == core.AGENT_UNAVAILABLE
