"""Self-managed certificates against the API: the shared Secret, per-replica Leases, the caBundle.

Create-if-absent (409 -> re-read) makes replicas that start together agree on one CA; every
replica then runs `sync()` periodically, and whichever replica wins the Secret update advances rotation.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from outrider.webhook.cluster import pki, rotation
from outrider.webhook.cluster.options import ClusterOptions

log = logging.getLogger("outrider.webhook.certs")

SERVING_CA_ANNOTATION = "outrider.dev/serving-ca"
LEASE_LABEL = "outrider.dev/serving-cert"


class PemLoader(Protocol):
    def load_pem(self, cert_pem: bytes, key_pem: bytes) -> Any: ...


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def settings_for(options: ClusterOptions) -> rotation.Settings:
    return rotation.Settings(
        names=pki.service_names(options.service_name, options.namespace, options.extra_sans),
        validity=datetime.timedelta(seconds=options.cert_validity_seconds),
        renew_before=datetime.timedelta(seconds=options.cert_renew_before_seconds),
        settle=datetime.timedelta(seconds=options.ca_settle_seconds),
    )


@dataclass
class CertSync:
    api: client.ApiClient
    options: ClusterOptions
    store: PemLoader
    clock: Callable[[], datetime.datetime] = _now
    serving_fingerprint: str = ""  # sha256 of the serving cert currently loaded
    serving_ca: str = ""  # fingerprint of the CA that signed it

    @property
    def settings(self) -> rotation.Settings:
        return settings_for(self.options)

    @property
    def lease_name(self) -> str:
        return f"{self.options.service_name}-{self.options.pod_name}"[:253]

    # --- Secret ------------------------------------------------------------------------------------

    async def read(self) -> tuple[rotation.CertState, str]:
        """The state in the Secret and its resourceVersion, creating the Secret if it is absent."""
        v1 = client.CoreV1Api(self.api)
        for _ in range(5):
            try:
                secret = await v1.read_namespaced_secret(self.options.cert_secret, self.options.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            else:
                state = rotation.from_secret(secret.data, secret.metadata.annotations)
                return state, str(secret.metadata.resource_version)
            state = rotation.initial_state(self.settings, self.clock())
            data, annotations = rotation.to_secret(state)
            body: Any = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": self.options.cert_secret,
                    "namespace": self.options.namespace,
                    "labels": {
                        "app.kubernetes.io/name": "outrider-webhook",
                        "app.kubernetes.io/part-of": "outrider",
                    },
                    "annotations": annotations,
                },
                "data": data,
            }
            try:
                created = await v1.create_namespaced_secret(self.options.namespace, body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                log.info("certificate Secret created by another replica; using theirs")
                continue  # another replica won the race: read what it wrote
            log.info("created certificate Secret %s/%s", self.options.namespace, self.options.cert_secret)
            return state, str(created.metadata.resource_version)
        raise RuntimeError("could not read or create the certificate Secret after 5 attempts")

    async def write(self, state: rotation.CertState, resource_version: str) -> bool:
        """Optimistic update; False when another replica changed the Secret first."""
        v1 = client.CoreV1Api(self.api)
        data, annotations = rotation.to_secret(state)
        if state.rotate_requested:
            annotations[rotation.ROTATE_ANNOTATION] = state.rotate_requested
        body: Any = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": self.options.cert_secret,
                "namespace": self.options.namespace,
                "resourceVersion": resource_version,
                "labels": {
                    "app.kubernetes.io/name": "outrider-webhook",
                    "app.kubernetes.io/part-of": "outrider",
                },
                "annotations": annotations,
            },
            "data": data,
        }
        try:
            await v1.replace_namespaced_secret(self.options.cert_secret, self.options.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    # --- serving and Leases ------------------------------------------------------------------------

    def serve(self, state: rotation.CertState) -> bool:
        fp = pki.fingerprint(state.serving.cert_pem)
        if fp == self.serving_fingerprint:
            return False
        self.store.load_pem(state.serving.cert_pem, state.serving.key_pem)
        self.serving_fingerprint = fp
        self.serving_ca = state.ca_fingerprint
        log.info(
            "serving certificate loaded (phase %s, expires %s)",
            state.phase,
            pki.not_after(state.serving.cert_pem),
        )
        return True

    async def heartbeat(self) -> None:
        coord = client.CoordinationV1Api(self.api)
        now = self.clock()
        body: Any = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.lease_name,
                "namespace": self.options.namespace,
                "labels": {LEASE_LABEL: "true", "app.kubernetes.io/part-of": "outrider"},
                "annotations": {SERVING_CA_ANNOTATION: self.serving_ca},
                **self._owner(),
            },
            "spec": {
                "holderIdentity": self.options.pod_name,
                "leaseDurationSeconds": int(self.options.lease_seconds),
                "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        try:
            current = await coord.read_namespaced_lease(self.lease_name, self.options.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                await coord.create_namespaced_lease(self.options.namespace, body)
            except ApiException as create_exc:
                if create_exc.status != 409:
                    raise
            return
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        try:
            await coord.replace_namespaced_lease(self.lease_name, self.options.namespace, body)
        except ApiException as exc:
            if exc.status != 409:  # only this replica writes its Lease; a conflict heals next beat
                raise

    def _owner(self) -> dict[str, Any]:
        """The replica's own pod as the Lease's owner (no blockOwnerDeletion: no extra RBAC)."""
        if not self.options.pod_uid:
            return {}
        pod = {"apiVersion": "v1", "kind": "Pod", "name": self.options.pod_name, "uid": self.options.pod_uid}
        return {"ownerReferences": [pod]}

    async def served_cas(self) -> list[str]:
        """CA fingerprints of every replica whose Lease is still live (expired ones are deleted)."""
        coord = client.CoordinationV1Api(self.api)
        leases = await coord.list_namespaced_lease(
            self.options.namespace, label_selector=f"{LEASE_LABEL}=true"
        )
        now = self.clock()
        out: list[str] = []
        for lease in leases.items:
            renew = lease.spec.renew_time
            duration = lease.spec.lease_duration_seconds or 0
            if isinstance(renew, str):
                renew = datetime.datetime.fromisoformat(renew.replace("Z", "+00:00"))
            if renew is None or renew + datetime.timedelta(seconds=duration) < now:
                await self._delete_lease(lease.metadata.name)
                continue
            out.append((lease.metadata.annotations or {}).get(SERVING_CA_ANNOTATION, ""))
        return out

    async def _delete_lease(self, name: str) -> None:
        try:
            await client.CoordinationV1Api(self.api).delete_namespaced_lease(name, self.options.namespace)
            log.info("removed the expired serving Lease %s", name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def release(self) -> None:
        """On shutdown: this replica no longer serves, so rotation need not wait for it."""
        await self._delete_lease(self.lease_name)

    # --- caBundle ----------------------------------------------------------------------------------

    async def ensure_bundle(self, bundle: bytes) -> bool:
        adm = client.AdmissionregistrationV1Api(self.api)
        name = self.options.webhook_config_name
        try:
            mwc = await adm.read_mutating_webhook_configuration(name)
        except ApiException as exc:
            if exc.status == 404:
                log.warning("MutatingWebhookConfiguration %s not found; caBundle not patched yet", name)
                return False
            raise
        wanted = base64.b64encode(bundle).decode()
        ops: list[dict[str, Any]] = []
        for i, hook in enumerate(mwc.webhooks or []):
            if hook.client_config.ca_bundle == wanted:
                continue
            # `test` guards against the list changing between our read and our patch
            ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook.name})
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": wanted})
        if not ops:
            return False
        await adm.patch_mutating_webhook_configuration(name, ops)
        log.info(
            "patched caBundle of MutatingWebhookConfiguration %s (%d CA(s))", name, bundle.count(b"BEGIN")
        )
        return True

    # --- the loop ----------------------------------------------------------------------------------

    async def start(self) -> None:
        state, _ = await self.read()
        self.serve(state)
        await self.heartbeat()
        await self.ensure_bundle(state.bundle())

    async def sync(self) -> None:
        """One round: follow the Secret, publish what we serve, fix the bundle, advance rotation."""
        for _ in range(4):  # a successful advance is followed at once by the next round
            state, rv = await self.read()
            if self.serve(state):
                await self.heartbeat()
            await self.ensure_bundle(state.bundle())
            nxt = rotation.advance(state, self.settings, self.clock(), await self.served_cas())
            if nxt is None or not await self.write(nxt, rv):
                return
            log.info("certificate rotation: %s -> %s", state.phase, nxt.phase)

    async def run(self, on_error: Callable[[Exception], Awaitable[None]] | None = None) -> None:
        while True:
            await asyncio.sleep(self.options.sync_seconds)
            try:
                await self.heartbeat()
                await self.sync()
            except (ApiException, OSError, rotation.StateError, ValueError) as exc:
                # keep serving what we have; the next round retries
                log.warning("certificate sync failed: %s", exc)
                if on_error is not None:
                    await on_error(exc)
