"""The self-managed certificate state kept in one Secret and the pure rotation state machine.

stable -> trusting (next CA added to the caBundle) -> rolling (new cert served, old CA kept)
-> stable (old CA dropped once every live replica reports the new CA). Any replica may advance it.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from outrider.webhook.cluster import pki

STABLE, TRUSTING, ROLLING = "stable", "trusting", "rolling"
PHASE_ANNOTATION = "outrider.dev/cert-phase"
SINCE_ANNOTATION = "outrider.dev/cert-phase-since"
# an operator (or a test) forces a rotation by setting this to any new value
ROTATE_ANNOTATION = "outrider.dev/rotate"
ROTATED_ANNOTATION = "outrider.dev/rotated-for"


@dataclass(frozen=True)
class Settings:
    names: tuple[str, ...]
    validity: datetime.timedelta
    renew_before: datetime.timedelta
    settle: datetime.timedelta


@dataclass(frozen=True)
class CertState:
    ca: pki.KeyPair
    serving: pki.KeyPair
    phase: str = STABLE
    since: datetime.datetime | None = None
    next_ca: pki.KeyPair | None = None
    previous_ca_pem: bytes | None = None
    rotate_requested: str = ""
    rotated_for: str = ""

    def bundle(self) -> bytes:
        """Every CA the apiserver must trust right now (current first)."""
        parts = [self.ca.cert_pem]
        if self.next_ca is not None:
            parts.append(self.next_ca.cert_pem)
        if self.previous_ca_pem:
            parts.append(self.previous_ca_pem)
        return b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts)

    @property
    def ca_fingerprint(self) -> str:
        return pki.fingerprint(self.ca.cert_pem)


def initial_state(settings: Settings, now: datetime.datetime) -> CertState:
    ca = pki.new_ca(now, settings.validity)
    return CertState(ca=ca, serving=pki.issue_serving(ca, settings.names, now, settings.validity), since=now)


# --- Secret encoding -------------------------------------------------------------------------------

_KEYS = {
    "ca.crt": ("ca", "cert_pem"),
    "ca.key": ("ca", "key_pem"),
    "tls.crt": ("serving", "cert_pem"),
    "tls.key": ("serving", "key_pem"),
}


def to_secret(state: CertState) -> tuple[dict[str, str], dict[str, str]]:
    """(data, annotations) for the Secret; data values are base64 as the API wants them."""
    raw: dict[str, bytes] = {
        "ca.crt": state.ca.cert_pem,
        "ca.key": state.ca.key_pem,
        "tls.crt": state.serving.cert_pem,
        "tls.key": state.serving.key_pem,
        "ca-bundle.crt": state.bundle(),
    }
    if state.next_ca is not None:
        raw["next-ca.crt"] = state.next_ca.cert_pem
        raw["next-ca.key"] = state.next_ca.key_pem
    if state.previous_ca_pem:
        raw["previous-ca.crt"] = state.previous_ca_pem
    annotations = {PHASE_ANNOTATION: state.phase, ROTATED_ANNOTATION: state.rotated_for}
    if state.since is not None:
        annotations[SINCE_ANNOTATION] = state.since.isoformat()
    return {k: base64.b64encode(v).decode() for k, v in raw.items()}, annotations


class StateError(ValueError):
    pass


def from_secret(data: Mapping[str, str] | None, annotations: Mapping[str, str] | None) -> CertState:
    data = data or {}
    ann = annotations or {}
    try:
        raw = {k: base64.b64decode(v) for k, v in data.items()}
        ca = pki.KeyPair(raw["ca.crt"], raw["ca.key"])
        serving = pki.KeyPair(raw["tls.crt"], raw["tls.key"])
    except (KeyError, ValueError) as exc:
        raise StateError(f"certificate Secret is missing or has a malformed key: {exc}") from None
    next_ca = None
    if "next-ca.crt" in raw and "next-ca.key" in raw:
        next_ca = pki.KeyPair(raw["next-ca.crt"], raw["next-ca.key"])
    since_raw = ann.get(SINCE_ANNOTATION)
    since = datetime.datetime.fromisoformat(since_raw) if since_raw else None
    phase = ann.get(PHASE_ANNOTATION, STABLE)
    if phase not in (STABLE, TRUSTING, ROLLING):
        phase = STABLE
    return CertState(
        ca=ca,
        serving=serving,
        phase=phase,
        since=since,
        next_ca=next_ca,
        previous_ca_pem=raw.get("previous-ca.crt") or None,
        rotate_requested=ann.get(ROTATE_ANNOTATION, ""),
        rotated_for=ann.get(ROTATED_ANNOTATION, ""),
    )


# --- decisions -------------------------------------------------------------------------------------


def needs_rotation(state: CertState, settings: Settings, now: datetime.datetime) -> bool:
    if state.rotate_requested and state.rotate_requested != state.rotated_for:
        return True
    expiry = min(pki.not_after(state.serving.cert_pem), pki.not_after(state.ca.cert_pem))
    return expiry - now <= settings.renew_before


def advance(
    state: CertState, settings: Settings, now: datetime.datetime, served: Iterable[str]
) -> CertState | None:
    """The next state, or None when nothing is due. `served`: CA fingerprints of live replicas."""
    if state.phase == STABLE:
        if not needs_rotation(state, settings, now):
            return None
        return replace(state, phase=TRUSTING, since=now, next_ca=pki.new_ca(now, settings.validity))
    if state.phase == TRUSTING:
        if state.next_ca is None:  # damaged by hand: start over
            return replace(state, phase=STABLE, since=now)
        if state.since is not None and now - state.since < settings.settle:
            return None
        return CertState(
            ca=state.next_ca,
            serving=pki.issue_serving(state.next_ca, settings.names, now, settings.validity),
            phase=ROLLING,
            since=now,
            next_ca=None,
            previous_ca_pem=state.ca.cert_pem,
            rotate_requested=state.rotate_requested,
            rotated_for=state.rotate_requested,
        )
    # ROLLING: the old CA leaves the bundle only when no live replica still serves under it
    fingerprints = set(served)
    if not fingerprints or fingerprints != {state.ca_fingerprint}:
        return None
    if state.since is not None and now - state.since < settings.settle:
        return None
    return replace(state, phase=STABLE, since=now, previous_ca_pem=None)
