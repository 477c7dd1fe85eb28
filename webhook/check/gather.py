"""The thin adapter of `outrider check`: asks the Kubernetes API and returns `Facts`.

Read-only except one server-side dry-run pod create (nothing is persisted). Every API error becomes
a message in the facts, never an exception out of `gather`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from outrider.webhook import annotations as ann
from outrider.webhook.check.evaluate import CSI_DRIVER, OPTED_IN, PROXY
from outrider.webhook.check.facts import (
    Access,
    DryRun,
    Facts,
    Names,
    PodFacts,
    names_from_webhook_config,
)

# What `kubectl apply -k manifests/base` creates: (verb, group, resource, namespaced)
INSTALL_ACCESS: tuple[tuple[str, str, str, bool], ...] = (
    ("create", "", "namespaces", False),
    ("create", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", False),
    ("create", "rbac.authorization.k8s.io", "clusterroles", False),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", False),
    ("create", "rbac.authorization.k8s.io", "roles", True),
    ("create", "rbac.authorization.k8s.io", "rolebindings", True),
    ("create", "", "serviceaccounts", True),
    ("create", "", "configmaps", True),
    ("create", "", "services", True),
    ("create", "apps", "deployments", True),
    ("create", "policy", "poddisruptionbudgets", True),
)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _plain(api: client.ApiClient, obj: Any) -> dict[str, Any]:
    return dict(api.sanitize_for_serialization(obj))


async def _version(api: client.ApiClient) -> tuple[str, str]:
    try:
        info = await client.VersionApi(api).get_code()
    except (TimeoutError, ApiException, OSError) as exc:
        return "", _reason(exc)
    return str(info.git_version), ""


async def _webhook_configs(
    api: client.ApiClient, name: str
) -> tuple[dict[str, Any] | None, tuple[dict[str, Any], ...], str]:
    try:
        items = (await client.AdmissionregistrationV1Api(api).list_mutating_webhook_configuration()).items
    except ApiException as exc:
        return None, (), _reason(exc)
    ours = next((_plain(api, m) for m in items if m.metadata.name == name), None)
    return ours, tuple(_plain(api, m) for m in items if m.metadata.name != name), ""


async def _secret(api: client.ApiClient, names: Names) -> tuple[dict[str, str] | None, str]:
    try:
        secret = await client.CoreV1Api(api).read_namespaced_secret(names.cert_secret, names.namespace)
    except ApiException as exc:
        return None, "not found" if exc.status == 404 else _reason(exc)
    # only the public parts: private keys are never read into the facts
    data = secret.data or {}
    return {k: v for k, v in data.items() if k.endswith(".crt")}, ""


async def _endpoints(api: client.ApiClient, names: Names) -> tuple[int, int, str]:
    try:
        slices = await client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
            names.namespace, label_selector=f"kubernetes.io/service-name={names.service}"
        )
    except ApiException as exc:
        return 0, 0, _reason(exc)
    ready = not_ready = 0
    for s in slices.items:
        for ep in s.endpoints or []:
            if ep.conditions is not None and ep.conditions.ready is not False:
                ready += 1
            else:
                not_ready += 1
    return ready, not_ready, ""


async def _config_map(api: client.ApiClient, names: Names) -> tuple[dict[str, str] | None, str]:
    try:
        cm = await client.CoreV1Api(api).read_namespaced_config_map(names.config_map, names.namespace)
    except ApiException as exc:
        return None, "not found" if exc.status == 404 else _reason(exc)
    return dict(cm.data or {}), ""


async def _csi(api: client.ApiClient) -> tuple[bool, str]:
    try:
        await client.StorageV1Api(api).read_csi_driver(CSI_DRIVER)
    except ApiException as exc:
        return False, "" if exc.status == 404 else _reason(exc)
    return True, ""


async def _cluster_spiffe_ids(api: client.ApiClient) -> tuple[tuple[dict[str, Any], ...] | None, str]:
    try:
        out = await client.CustomObjectsApi(api).list_cluster_custom_object(
            "spire.spiffe.io", "v1alpha1", "clusterspiffeids"
        )
    except ApiException as exc:
        return None, "" if exc.status == 404 else _reason(exc)
    return tuple(out.get("items") or []), ""


async def _namespaces(api: client.ApiClient) -> tuple[dict[str, dict[str, str]], str]:
    try:
        items = (await client.CoreV1Api(api).list_namespace(label_selector=ann.NAMESPACE_INJECT)).items
    except ApiException as exc:
        return {}, _reason(exc)
    return {ns.metadata.name: dict(ns.metadata.labels or {}) for ns in items}, ""


async def _readyz(api: client.ApiClient, namespace: str, pod: str) -> str:
    try:
        text = await asyncio.wait_for(
            client.CoreV1Api(api).connect_get_namespaced_pod_proxy_with_path(
                f"{pod}:15020", namespace, "readyz"
            ),
            5,
        )
    except ApiException as exc:
        body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body or "")
        if exc.status == 503 and body.strip() and not body.lstrip().startswith("{"):
            # the proxy answered through the pod proxy: 503 is /readyz saying what is not ready (the
            # apiserver's own proxy errors are JSON Status objects)
            return body.strip()[:500]
        return f"not reachable ({exc.status}: {(body or str(exc.reason))[:200]})"
    except (TimeoutError, OSError) as exc:
        return f"not reachable ({_reason(exc)})"
    return str(text)[:500]


def _pod_facts(pod: Any) -> PodFacts:
    spec, meta, status = pod.spec, pod.metadata, pod.status
    names = tuple(c.name for c in (spec.init_containers or [])) + tuple(c.name for c in spec.containers or [])
    statuses = [*(status.init_container_statuses or []), *(status.container_statuses or [])] if status else []
    proxy = next((s for s in statuses if s.name == PROXY), None)
    owner = next((o for o in meta.owner_references or [] if o.controller), None)
    return PodFacts(
        namespace=meta.namespace,
        name=meta.name,
        labels=dict(meta.labels or {}),
        annotations=dict(meta.annotations or {}),
        containers=names,
        owner_kind=owner.kind if owner else "",
        owner_name=owner.name if owner else "",
        phase=(status.phase or "") if status else "",
        proxy_ready=None if proxy is None else bool(proxy.ready),
        terminating=meta.deletion_timestamp is not None,
    )


async def _pods(
    api: client.ApiClient, namespaces: Mapping[str, Mapping[str, str]]
) -> tuple[tuple[PodFacts, ...], str]:
    out: list[PodFacts] = []
    for ns, labels in sorted(namespaces.items()):
        if labels.get(ann.NAMESPACE_INJECT) not in OPTED_IN:
            continue
        try:
            pods = (await client.CoreV1Api(api).list_namespaced_pod(ns)).items
        except ApiException as exc:
            return tuple(out), f"pods in {ns}: {_reason(exc)}"
        for pod in pods:
            facts = _pod_facts(pod)
            if (
                facts.phase == "Running"
                and not facts.terminating
                and PROXY in facts.containers
                and facts.proxy_ready is not True
            ):
                facts = PodFacts(**{**facts.__dict__, "readyz": await _readyz(api, ns, facts.name)})
            out.append(facts)
    return tuple(out), ""


def _probe_pod(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "outrider-check-",
            "namespace": namespace,
            "labels": {"app": "outrider-check"},
        },
        "spec": {
            "containers": [
                {"name": "app", "image": "outrider-check.invalid/pause:1", "ports": [{"containerPort": 8080}]}
            ]
        },
    }


async def _dry_run(api: client.ApiClient, namespaces: Mapping[str, Mapping[str, str]]) -> DryRun:
    opted = sorted(ns for ns, labels in namespaces.items() if labels.get(ann.NAMESPACE_INJECT) in OPTED_IN)
    if not opted:
        return DryRun()
    ns = opted[0]
    body: Any = _probe_pod(ns)
    try:
        pod = await client.CoreV1Api(api).create_namespaced_pod(ns, body, dry_run="All")
    except ApiException as exc:
        return DryRun(ns, False, f"HTTP {exc.status}: {_api_message(exc)}")
    return DryRun(ns, PROXY in _pod_facts(pod).containers)


def _api_message(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body or "").get("message", exc.reason))[:400]
    except (TypeError, ValueError):
        return str(exc.reason)


async def _access(api: client.ApiClient, names: Names) -> tuple[Access, ...]:
    authz = client.AuthorizationV1Api(api)
    out = []
    for verb, group, resource, namespaced in INSTALL_ACCESS:
        ns = names.namespace if namespaced else ""
        attrs: dict[str, Any] = {"verb": verb, "group": group, "resource": resource}
        if ns:
            attrs["namespace"] = ns
        body: Any = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs},
        }
        try:
            review = await authz.create_self_subject_access_review(body)
        except ApiException as exc:
            out.append(Access(verb, group, resource, ns, False, _reason(exc)))
            continue
        out.append(Access(verb, group, resource, ns, bool(review.status.allowed), review.status.reason or ""))
    return tuple(out)


async def gather(api: client.ApiClient, names: Names, *, pre: bool = False, discover: bool = False) -> Facts:
    """What check needs from the cluster; `discover`: take the webhook's namespace from its configuration."""
    version, version_error = await _version(api)
    if version_error:  # nothing else will answer either
        return Facts(names=names, now_epoch=time.time(), version_error=version_error)
    csi, csi_error = await _csi(api)
    mwc, others, mwc_error = await _webhook_configs(api, names.webhook_config)
    if discover:
        names = names_from_webhook_config(names, mwc)
    if pre:
        return Facts(
            names=names,
            now_epoch=time.time(),
            server_version=version,
            csi_driver=csi,
            csi_driver_error=csi_error,
            webhook_config=mwc,
            webhook_config_error=mwc_error,
            other_webhook_configs=others,
            access=await _access(api, names),
        )
    secret, secret_error = await _secret(api, names)
    ready, not_ready, ep_error = await _endpoints(api, names)
    cm, cm_error = await _config_map(api, names)
    namespaces, namespaces_error = await _namespaces(api)
    spiffe_ids, spiffe_ids_error = await _cluster_spiffe_ids(api)
    pods, pods_error = await _pods(api, namespaces)
    return Facts(
        names=names,
        now_epoch=time.time(),
        server_version=version,
        webhook_config=mwc,
        webhook_config_error=mwc_error,
        other_webhook_configs=others,
        cert_secret=secret,
        cert_secret_error=secret_error,
        ready_endpoints=ready,
        not_ready_endpoints=not_ready,
        endpoints_error=ep_error,
        dry_run=await _dry_run(api, namespaces) if mwc is not None else None,
        config_map=cm,
        config_map_error=cm_error,
        csi_driver=csi,
        csi_driver_error=csi_error,
        cluster_spiffe_ids=spiffe_ids,
        cluster_spiffe_ids_error=spiffe_ids_error,
        namespaces=namespaces,
        pods=pods,
        workloads_error=namespaces_error or pods_error,
    )
