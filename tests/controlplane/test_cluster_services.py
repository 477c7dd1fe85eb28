"""webhook/cluster against the real apiserver, in-process: CA agreement, caBundle, ConfigMap reload.

(Rotation under traffic with real `outrider webhook` processes is in test_lifecycle_e2e.py.)
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field

import pytest
from kubernetes_asyncio import client
from prometheus_client import REGISTRY

from outrider.webhook.cluster import pki, rotation
from outrider.webhook.cluster.certsync import CertSync
from outrider.webhook.cluster.configmap import ConfigMapWatch
from outrider.webhook.cluster.namespaces import NamespaceCache
from outrider.webhook.cluster.options import ClusterOptions
from outrider.webhook.config import ConfigHolder

from .harness import ControlPlane
from .kubeutil import eventually, make_namespace, register_webhook, unique, unregister_webhook

pytestmark = pytest.mark.controlplane


@dataclass
class RecordingStore:
    loaded: list[bytes] = field(default_factory=list)

    def load_pem(self, cert_pem: bytes, key_pem: bytes) -> None:
        assert b"PRIVATE KEY" in key_pem
        self.loaded.append(cert_pem)


async def test_replicas_starting_together_agree_on_one_ca(
    api: client.ApiClient, control_plane: ControlPlane
) -> None:
    ns = await make_namespace(api, unique("certs"))
    mwc = unique("outrider-agree")
    await register_webhook(api, mwc, "https://127.0.0.1:1/mutate", None)
    try:
        stores = [RecordingStore() for _ in range(4)]
        syncs = [
            CertSync(
                api, ClusterOptions(namespace=ns, webhook_config_name=mwc, pod_name=f"replica-{i}"), store
            )
            for i, store in enumerate(stores)
        ]
        await asyncio.gather(*(s.start() for s in syncs))
        secret = await client.CoreV1Api(api).read_namespaced_secret("outrider-webhook-certs", ns)
        ca_pem = base64.b64decode(secret.data["ca.crt"])
        assert {s.serving_ca for s in syncs} == {pki.fingerprint(ca_pem)}
        assert {store.loaded[-1] for store in stores} == {base64.b64decode(secret.data["tls.crt"])}
        hooks = (
            await client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(mwc)
        ).webhooks
        assert base64.b64decode(hooks[0].client_config.ca_bundle) == ca_pem
        # every replica published what it serves
        assert sorted(await syncs[0].served_cas()) == [pki.fingerprint(ca_pem)] * 4
        leaf = base64.b64decode(secret.data["tls.crt"])
        assert pki.issuer_matches(leaf, ca_pem)
    finally:
        await unregister_webhook(api, mwc)


async def test_rotation_rounds_against_the_api(api: client.ApiClient) -> None:
    ns = await make_namespace(api, unique("rotate"))
    mwc = unique("outrider-rotate")
    await register_webhook(api, mwc, "https://127.0.0.1:1/mutate", None)
    adm = client.AdmissionregistrationV1Api(api)
    try:
        opts = [
            ClusterOptions(namespace=ns, webhook_config_name=mwc, pod_name=f"r{i}", ca_settle_seconds=0.2)
            for i in range(2)
        ]
        a, b = (CertSync(api, o, RecordingStore()) for o in opts)
        await a.start()
        await b.start()
        old_ca = a.serving_ca
        await client.CoreV1Api(api).patch_namespaced_secret(
            "outrider-webhook-certs", ns, {"metadata": {"annotations": {rotation.ROTATE_ANNOTATION: "now"}}}
        )

        async def bundle_cas() -> int:
            hook = (await adm.read_mutating_webhook_configuration(mwc)).webhooks[0]
            return base64.b64decode(hook.client_config.ca_bundle).count(b"BEGIN CERTIFICATE")

        await a.sync()  # stable -> trusting (and settles for 0.2 s)
        assert await bundle_cas() == 2 and a.serving_ca == old_ca
        await asyncio.sleep(0.3)
        await a.sync()  # trusting -> rolling: a serves the new cert, b still the old one
        assert a.serving_ca != old_ca and b.serving_ca == old_ca
        await asyncio.sleep(0.3)
        await a.sync()
        assert await bundle_cas() == 2, "old CA dropped while replica b still serves under it"
        await b.sync()  # b follows; the old CA may go after the settle time
        await asyncio.sleep(0.3)
        await b.sync()
        assert b.serving_ca == a.serving_ca and await bundle_cas() == 1
        secret = await client.CoreV1Api(api).read_namespaced_secret("outrider-webhook-certs", ns)
        assert secret.metadata.annotations[rotation.PHASE_ANNOTATION] == rotation.STABLE
        assert secret.metadata.annotations[rotation.ROTATED_ANNOTATION] == "now"
    finally:
        await unregister_webhook(api, mwc)


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    value = REGISTRY.get_sample_value(name, labels or {})
    return float(value or 0.0)


async def test_configmap_hot_reload_keeps_last_good(api: client.ApiClient) -> None:
    ns = await make_namespace(api, unique("cfg"))
    v1 = client.CoreV1Api(api)
    await v1.create_namespaced_config_map(
        ns,
        {
            "metadata": {"name": "outrider-webhook"},
            "data": {"config.yaml": "sidecar_image: registry.example/outrider:a\n"},
        },
    )
    holder = ConfigHolder()
    watch = ConfigMapWatch(api, ns, "outrider-webhook", holder)
    await watch.load_once()
    assert holder.current.sidecar_image == "registry.example/outrider:a"
    task = asyncio.create_task(watch.run())
    try:
        await v1.patch_namespaced_config_map(
            "outrider-webhook",
            ns,
            {
                "data": {
                    "config.yaml": "sidecar_image: registry.example/outrider:b\n",
                    "namespace-egress.yaml": "team-a: {allow: [api.example.com]}\n",
                }
            },
        )

        async def is_b() -> bool:
            return holder.current.sidecar_image == "registry.example/outrider:b"

        await eventually(is_b, "config b applied")
        assert watch.namespace_egress["team-a"] == {"allow": ["api.example.com"]}
        rejected_before = _metric("outrider_webhook_config_reloads_total", {"result": "rejected"})
        await v1.patch_namespaced_config_map(
            "outrider-webhook", ns, {"data": {"config.yaml": "image_pull_policy: Sometimes\n"}}
        )

        async def rejected() -> bool:
            return watch.last_error is not None

        await eventually(rejected, "bad ConfigMap rejected")
        assert "image_pull_policy" in (watch.last_error or "")
        assert holder.current.sidecar_image == "registry.example/outrider:b"  # last good kept
        assert _metric("outrider_webhook_config_reloads_total", {"result": "rejected"}) == rejected_before + 1
        assert _metric("outrider_webhook_config_valid") == 0.0

        async def event() -> object:
            events = await v1.list_namespaced_event(ns, field_selector="involvedObject.name=outrider-webhook")
            return [e for e in events.items if e.reason == "InvalidConfig"]

        found = await eventually(event, "InvalidConfig Event")
        assert "image_pull_policy" in found[0].message and found[0].type == "Warning"
    finally:
        task.cancel()


async def test_namespace_cache_follows_label_changes(api: client.ApiClient) -> None:
    cache = NamespaceCache(api)
    task = asyncio.create_task(cache.run())
    try:
        await asyncio.wait_for(cache.synced.wait(), 30)
        ns = await make_namespace(api, unique("labels"), {"outrider.dev/inject": "enabled"})
        assert (await cache.labels(ns))["outrider.dev/inject"] == "enabled"  # direct read on a miss
        await client.CoreV1Api(api).patch_namespace(
            ns, {"metadata": {"labels": {"outrider.dev/inject": "strict"}}}
        )

        async def strict() -> bool:
            return (await cache.labels(ns)).get("outrider.dev/inject") == "strict"

        await eventually(strict, "label change seen by the watch")
        assert await cache.labels("does-not-exist") == {}
    finally:
        task.cancel()


async def test_a_replicas_lease_names_its_pod_as_owner(api: client.ApiClient) -> None:
    """With POD_UID the garbage collector removes a replica's Lease with its pod (helm uninstall deletes
    the Role before a stopping replica can delete its own Lease); without it, no owner is claimed."""
    ns = await make_namespace(api, unique("lease"))
    coord = client.CoordinationV1Api(api)
    uid = "0f5b8f3e-2a1c-4c8e-9d5e-5b0c6a7f1e21"
    owned = CertSync(api, ClusterOptions(namespace=ns, pod_name="replica-a", pod_uid=uid), RecordingStore())
    plain = CertSync(api, ClusterOptions(namespace=ns, pod_name="replica-b"), RecordingStore())
    for sync in (owned, plain, owned):  # the second beat replaces the Lease and must keep the owner
        await sync.heartbeat()
    (ref,) = (await coord.read_namespaced_lease(owned.lease_name, ns)).metadata.owner_references
    assert (ref.api_version, ref.kind, ref.name, ref.uid) == ("v1", "Pod", "replica-a", uid)
    assert not ref.block_owner_deletion and not ref.controller
    assert not (await coord.read_namespaced_lease(plain.lease_name, ns)).metadata.owner_references
