"""The rotation state machine without a cluster: phases, bundle contents, and when the old CA may go."""

from __future__ import annotations

import datetime

from outrider.webhook.cluster import pki, rotation

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
SETTINGS = rotation.Settings(
    names=pki.service_names("outrider-webhook", "outrider-system", ("127.0.0.1",)),
    validity=datetime.timedelta(hours=10),
    renew_before=datetime.timedelta(hours=3),
    settle=datetime.timedelta(seconds=5),
)


def _cas(bundle: bytes) -> int:
    return bundle.count(b"BEGIN CERTIFICATE")


def test_fresh_state_is_stable_and_valid_for_the_service_names() -> None:
    state = rotation.initial_state(SETTINGS, T0)
    assert state.phase == rotation.STABLE
    assert pki.issuer_matches(state.serving.cert_pem, state.ca.cert_pem)
    assert rotation.advance(state, SETTINGS, T0 + datetime.timedelta(hours=6), []) is None
    assert _cas(state.bundle()) == 1


def test_full_rotation_keeps_old_ca_until_every_replica_serves_the_new_one() -> None:
    s0 = rotation.initial_state(SETTINGS, T0)
    old_fp = s0.ca_fingerprint
    t = T0 + datetime.timedelta(hours=7, minutes=1)  # inside renew_before
    s1 = rotation.advance(s0, SETTINGS, t, [old_fp, old_fp])
    assert s1 is not None and s1.phase == rotation.TRUSTING
    assert _cas(s1.bundle()) == 2 and s1.serving == s0.serving  # trust first, serve later
    assert rotation.advance(s1, SETTINGS, t + datetime.timedelta(seconds=1), [old_fp]) is None  # settling
    s2 = rotation.advance(s1, SETTINGS, t + datetime.timedelta(seconds=6), [old_fp, old_fp])
    assert s2 is not None and s2.phase == rotation.ROLLING
    assert s2.ca == s1.next_ca and pki.issuer_matches(s2.serving.cert_pem, s2.ca.cert_pem)
    assert s2.previous_ca_pem == s0.ca.cert_pem and _cas(s2.bundle()) == 2
    later = t + datetime.timedelta(seconds=20)
    # one replica still serves under the old CA: the old CA stays in the bundle
    assert rotation.advance(s2, SETTINGS, later, [s2.ca_fingerprint, old_fp]) is None
    assert rotation.advance(s2, SETTINGS, later, []) is None
    s3 = rotation.advance(s2, SETTINGS, later, [s2.ca_fingerprint, s2.ca_fingerprint])
    assert s3 is not None and s3.phase == rotation.STABLE and _cas(s3.bundle()) == 1
    assert s3.bundle() == s2.ca.cert_pem


def test_rotate_annotation_forces_exactly_one_rotation() -> None:
    s0 = rotation.initial_state(SETTINGS, T0)
    asked = rotation.CertState(**{**s0.__dict__, "rotate_requested": "r1"})
    s1 = rotation.advance(asked, SETTINGS, T0, [])
    assert s1 is not None and s1.phase == rotation.TRUSTING
    s2 = rotation.advance(s1, SETTINGS, T0 + datetime.timedelta(seconds=10), [])
    assert s2 is not None and s2.rotated_for == "r1"
    s3 = rotation.advance(s2, SETTINGS, T0 + datetime.timedelta(seconds=20), [s2.ca_fingerprint])
    assert s3 is not None and not rotation.needs_rotation(s3, SETTINGS, T0 + datetime.timedelta(seconds=30))


def test_secret_round_trip() -> None:
    s0 = rotation.initial_state(SETTINGS, T0)
    s1 = rotation.advance(s0, SETTINGS, T0 + datetime.timedelta(hours=8), [])
    assert s1 is not None
    data, annotations = rotation.to_secret(s1)
    back = rotation.from_secret(data, annotations)
    assert back == s1
