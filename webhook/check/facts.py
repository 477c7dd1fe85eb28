"""What `outrider check` learned from the cluster, as plain frozen data the evaluation reads.

Every field is filled by `gather`; a field that could not be read carries the reason in `*_error`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Names:
    """Where Outrider is (or will be) installed; the defaults are manifests/base."""

    namespace: str = "outrider-system"
    webhook_config: str = "outrider"
    service: str = "outrider-webhook"
    cert_secret: str = "outrider-webhook-certs"  # noqa: S105 - a Secret name, not a secret
    config_map: str = "outrider-webhook"


def names_from_webhook_config(names: Names, mwc: Mapping[str, Any] | None) -> Names:
    """Where the webhook really runs, read from our MutatingWebhookConfiguration's Service reference.

    The MutatingWebhookConfiguration has a fixed name whoever installed it, but its namespace is the
    installer's choice (`helm install -n NS`, a kustomize `namespace:`): `check` without `--namespace`
    follows the Service the webhooks call. Unchanged when there is no such reference, or when the
    webhooks name different Services (then the default or `--namespace` says which one to check).
    """
    if not mwc:
        return names
    services = set()
    for hook in mwc.get("webhooks") or ():
        client = hook.get("clientConfig") if isinstance(hook, Mapping) else None
        svc = client.get("service") if isinstance(client, Mapping) else None
        if isinstance(svc, Mapping) and svc.get("namespace") and svc.get("name"):
            services.add((str(svc["namespace"]), str(svc["name"])))
    if len(services) != 1:
        return names
    ((namespace, service),) = services
    return replace(names, namespace=namespace, service=service)


@dataclass(frozen=True)
class PodFacts:
    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    containers: tuple[str, ...]  # app containers and init containers, by name
    owner_kind: str = ""
    owner_name: str = ""
    phase: str = ""
    proxy_ready: bool | None = None  # None: no status for outrider-proxy (not started)
    readyz: str = ""  # the proxy's /readyz answer through the apiserver's pod proxy, or why not
    terminating: bool = False  # deleted, stopping: a draining proxy reports unready on purpose


@dataclass(frozen=True)
class DryRun:
    namespace: str = ""  # empty: no opted-in namespace to try in
    injected: bool = False
    error: str = ""


@dataclass(frozen=True)
class Access:
    verb: str
    group: str
    resource: str
    namespace: str
    allowed: bool
    reason: str = ""


@dataclass(frozen=True)
class Facts:
    names: Names = field(default_factory=Names)
    now_epoch: float = 0.0
    server_version: str = ""  # gitVersion, e.g. v1.34.4
    version_error: str = ""
    # MutatingWebhookConfigurations: ours (None: absent) and every other one, as plain dicts
    webhook_config: Mapping[str, Any] | None = None
    webhook_config_error: str = ""  # the list call failed (e.g. 403): presence unknown
    other_webhook_configs: tuple[Mapping[str, Any], ...] = ()
    cert_secret: Mapping[str, str] | None = None  # base64 data of the serving-cert Secret
    cert_secret_error: str = ""
    ready_endpoints: int = 0
    not_ready_endpoints: int = 0
    endpoints_error: str = ""
    dry_run: DryRun | None = None
    config_map: Mapping[str, str] | None = None
    config_map_error: str = ""
    csi_driver: bool = False
    csi_driver_error: str = ""
    cluster_spiffe_ids: tuple[Mapping[str, Any], ...] | None = None  # None: the CRD is absent
    cluster_spiffe_ids_error: str = ""
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # labelled ones
    pods: tuple[PodFacts, ...] = ()
    workloads_error: str = ""  # listing labelled namespaces or their pods failed
    access: tuple[Access, ...] = ()
