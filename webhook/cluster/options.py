"""The settings of the in-cluster services, read once from the CLI namespace and the environment.

Flags owned by `outrider webhook` come from `args`; tuning knobs that only tests and operators with
unusual needs touch come from `OUTRIDER_*` environment variables (documented in docs/install.md).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_NAMESPACE = "outrider-system"
DEFAULT_WEBHOOK_CONFIG = "outrider"
DEFAULT_SERVICE = "outrider-webhook"
DEFAULT_SECRET = "outrider-webhook-certs"  # noqa: S105 - a Secret name, not a secret


@dataclass(frozen=True)
class ClusterOptions:
    kubeconfig: str | None = None
    in_cluster: bool = False
    namespace: str = DEFAULT_NAMESPACE
    webhook_config_name: str = DEFAULT_WEBHOOK_CONFIG
    cert_mode: str = "self-managed"  # "files": certs come from --tls-cert/--tls-key (cert-manager)
    config_map: str | None = None
    service_name: str = DEFAULT_SERVICE
    cert_secret: str = DEFAULT_SECRET
    pod_name: str = "outrider-webhook"
    # POD_UID (downward API): the replica's Lease names its pod as owner, so the garbage collector
    # removes it with the pod even when the replica cannot (RBAC already gone at `helm uninstall`)
    pod_uid: str = ""
    # serving cert and its CA live this long; rotation starts `renew_before` ahead of expiry
    cert_validity_seconds: float = 90 * 86400
    cert_renew_before_seconds: float = 30 * 86400
    # how often each replica re-reads the Secret, renews its Lease and checks the caBundle
    sync_seconds: float = 10.0
    # time for every apiserver to see a caBundle change before a cert it must trust is served
    ca_settle_seconds: float = 5.0
    extra_sans: tuple[str, ...] = ()

    @property
    def lease_seconds(self) -> float:
        return max(3 * self.sync_seconds, 5.0)

    @classmethod
    def from_args(cls, args: Any, environ: Mapping[str, str] | None = None) -> ClusterOptions:
        env = os.environ if environ is None else environ

        def num(name: str, default: float) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} must be a number of seconds") from None
            if value <= 0:
                raise ValueError(f"{name}={raw!r} must be positive")
            return value

        defaults = cls()
        validity = num("OUTRIDER_CERT_VALIDITY_SECONDS", defaults.cert_validity_seconds)
        renew = num(
            "OUTRIDER_CERT_RENEW_BEFORE_SECONDS", min(defaults.cert_renew_before_seconds, validity / 3)
        )
        if renew >= validity:
            raise ValueError("OUTRIDER_CERT_RENEW_BEFORE_SECONDS must be shorter than the validity")
        mode = getattr(args, "cert_mode", None) or defaults.cert_mode
        if mode not in ("files", "self-managed"):
            raise ValueError(f"--cert-mode {mode!r}: allowed values are 'files' and 'self-managed'")
        sans = tuple(s.strip() for s in env.get("OUTRIDER_CERT_EXTRA_SANS", "").split(",") if s.strip())
        return cls(
            kubeconfig=getattr(args, "kubeconfig", None),
            in_cluster=bool(getattr(args, "in_cluster", False)),
            namespace=getattr(args, "namespace", None) or env.get("POD_NAMESPACE") or DEFAULT_NAMESPACE,
            webhook_config_name=getattr(args, "webhook_config_name", None) or DEFAULT_WEBHOOK_CONFIG,
            cert_mode=mode,
            config_map=getattr(args, "config_map", None),
            service_name=getattr(args, "service_name", None)
            or env.get("OUTRIDER_SERVICE_NAME")
            or DEFAULT_SERVICE,
            cert_secret=env.get("OUTRIDER_CERT_SECRET") or DEFAULT_SECRET,
            pod_name=env.get("POD_NAME") or socket.gethostname(),
            pod_uid=env.get("POD_UID", ""),
            cert_validity_seconds=validity,
            cert_renew_before_seconds=renew,
            sync_seconds=num("OUTRIDER_CLUSTER_SYNC_SECONDS", defaults.sync_seconds),
            ca_settle_seconds=num("OUTRIDER_CA_SETTLE_SECONDS", defaults.ca_settle_seconds),
            extra_sans=sans,
        )
