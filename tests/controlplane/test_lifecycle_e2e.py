"""In-cluster lifecycle with real `outrider webhook` replicas and the real apiserver calling them.

Self-managed certificates (two replicas agree on one CA; a rotation while admissions flow fails
none of them) and ConfigMap hot reload (next admission sees the change; a bad ConfigMap is reported
and the last good config stays).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from outrider.webhook.cluster import pki, rotation

from .harness import ControlPlane, free_port
from .kubeutil import (
    WebhookProcess,
    create_pod,
    eventually,
    is_injected,
    make_namespace,
    pod_body,
    register_webhook,
    serving_certs,
    unique,
    unregister_webhook,
)

pytestmark = pytest.mark.controlplane

MCP = {"outrider.dev/mcp-port": "8080"}
SECRET = "outrider-webhook-certs"


@contextlib.asynccontextmanager
async def round_robin(backends: list[int]) -> AsyncIterator[int]:
    """A Service stand-in: each TCP connection goes to the next replica (TLS passes through)."""
    turn = 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal turn
        port = backends[turn % len(backends)]
        turn += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


def _replica(cp: ControlPlane, workdir: Path, ns: str, mwc: str, name: str, sync: float) -> WebhookProcess:
    return WebhookProcess(
        args=[
            "--kubeconfig",
            str(cp.kubeconfig),
            "--host",
            "127.0.0.1",
            "--namespace",
            ns,
            "--webhook-config-name",
            mwc,
            "--cert-mode",
            "self-managed",
        ],
        port=free_port(),
        log=workdir / f"{name}.log",
        env={
            "POD_NAME": name,
            "OUTRIDER_CERT_EXTRA_SANS": "127.0.0.1",
            "OUTRIDER_CLUSTER_SYNC_SECONDS": str(sync),
            "OUTRIDER_CA_SETTLE_SECONDS": "2",
        },
    )


async def _served_cert(port: int, ca_pem: bytes) -> bytes:
    """Handshake with only `ca_pem` trusted (hostname 127.0.0.1 checked); the peer's certificate DER."""
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as fh:
        fh.write(ca_pem)
        fh.flush()
        ctx = ssl.create_default_context(cafile=fh.name)
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"), 10
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return bytes(der)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@dataclass
class Replicas:
    procs: list[WebhookProcess]
    namespace: str
    mwc: str

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log}\n{p.tail(25)}" for p in self.procs)


@contextlib.asynccontextmanager
async def replicas(
    api: client.ApiClient, cp: ControlPlane, workdir: Path, syncs: tuple[float, ...] = (0.3, 0.3)
) -> AsyncIterator[Replicas]:
    ns = await make_namespace(api, unique("outrider-sys"))
    mwc = unique("outrider-lifecycle")
    procs = [_replica(cp, workdir, ns, mwc, f"replica-{i}", sync) for i, sync in enumerate(syncs)]
    async with round_robin([p.port for p in procs]) as lb_port:
        # registered without a caBundle: the replicas patch it in
        await register_webhook(api, mwc, f"https://127.0.0.1:{lb_port}/mutate", None)
        group = Replicas(procs, ns, mwc)
        try:
            for p in procs:  # all start at once: they race to create the Secret
                p.start()
            await asyncio.gather(*(p.wait_serving() for p in procs))
            yield group
        finally:
            await unregister_webhook(api, mwc)
            group.stop()
            print(f"\n[lifecycle] replica logs:\n{group.logs()}")


async def _secret(api: client.ApiClient, ns: str) -> Any:
    return await client.CoreV1Api(api).read_namespaced_secret(SECRET, ns)


async def _bundle(api: client.ApiClient, mwc: str) -> bytes:
    hook = (await client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(mwc)).webhooks[0]
    return base64.b64decode(hook.client_config.ca_bundle or "")


async def test_two_replicas_starting_together_agree_on_one_ca(
    api: client.ApiClient, control_plane: ControlPlane, tmp_path: Path
) -> None:
    async with replicas(api, control_plane, tmp_path) as group:
        secret = await _secret(api, group.namespace)
        ca_pem = base64.b64decode(secret.data["ca.crt"])
        tls_der = x509.load_pem_x509_certificate(base64.b64decode(secret.data["tls.crt"])).public_bytes(
            Encoding.DER
        )
        # both replicas serve the one certificate from the Secret, verified against its CA
        for proc in group.procs:
            assert await _served_cert(proc.port, ca_pem) == tls_der
        assert await _bundle(api, group.mwc) == ca_pem
        enabled = await make_namespace(api, unique("lc-enabled"), {"outrider.dev/inject": "enabled"})

        async def injected() -> bool:
            with contextlib.suppress(ApiException):
                return is_injected(
                    await create_pod(api, enabled, pod_body("p", annotations=MCP), dry_run="All")
                )
            return False

        await eventually(injected, "the apiserver admitting through the self-managed certificate", within=60)


@dataclass
class Traffic:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    probes: int = 0


async def test_rotation_while_requests_flow_fails_none(
    api: client.ApiClient, control_plane: ControlPlane, tmp_path: Path
) -> None:
    # replica-1 follows the Secret only every 4 s: the old CA must stay trusted until it has caught up
    # (the settle time alone, 2 s, would not cover it)
    async with replicas(api, control_plane, tmp_path, syncs=(0.3, 4.0)) as group:
        enabled = await make_namespace(api, unique("lc-rotate"), {"outrider.dev/inject": "enabled"})

        async def admitted() -> bool:
            with contextlib.suppress(ApiException):
                return is_injected(
                    await create_pod(api, enabled, pod_body("p", annotations=MCP), dry_run="All")
                )
            return False

        await eventually(
            admitted, "first admission", within=60
        )  # the apiserver has seen the patched caBundle
        old_ca = base64.b64decode((await _secret(api, group.namespace)).data["ca.crt"])
        traffic = Traffic()
        stop = asyncio.Event()

        async def admissions(worker: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    pod = await create_pod(
                        api, enabled, pod_body(f"w{worker}-{n}", annotations=MCP), dry_run="All"
                    )
                    if not is_injected(pod):
                        traffic.failures.append(f"pod w{worker}-{n} admitted without the sidecar")
                    else:
                        traffic.ok += 1
                except ApiException as exc:
                    traffic.failures.append(f"pod w{worker}-{n}: {exc.status} {exc.body}")

        async def probes() -> None:
            # every replica must always serve a certificate that the current caBundle trusts
            while not stop.is_set():
                for proc in group.procs:
                    bundle = await _bundle(api, group.mwc)
                    try:
                        await _served_cert(proc.port, bundle)
                    except (ssl.SSLError, OSError):
                        # the bundle may have moved on since we read it: judge by a fresh one
                        try:
                            await _served_cert(proc.port, await _bundle(api, group.mwc))
                        except (ssl.SSLError, OSError) as exc:
                            traffic.failures.append(
                                f"{proc.log.name}: handshake with the caBundle failed: {exc}"
                            )
                    traffic.probes += 1
                await asyncio.sleep(0.05)

        workers = [asyncio.create_task(admissions(i)) for i in range(3)] + [asyncio.create_task(probes())]
        try:
            await asyncio.sleep(1)
            await client.CoreV1Api(api).patch_namespaced_secret(
                SECRET, group.namespace, {"metadata": {"annotations": {rotation.ROTATE_ANNOTATION: "e2e"}}}
            )
            phases: list[str] = []

            async def rotated() -> bool:
                ann = (await _secret(api, group.namespace)).metadata.annotations
                phase = ann.get(rotation.PHASE_ANNOTATION, "")
                if not phases or phases[-1] != phase:
                    phases.append(phase)
                return bool(ann.get(rotation.ROTATED_ANNOTATION) == "e2e" and phase == rotation.STABLE)

            await eventually(rotated, f"rotation to finish\n{group.logs()}", within=120)
            ok_at_rotation = traffic.ok

            async def more_admissions() -> bool:  # and admissions keep working under the new CA alone
                return traffic.ok >= ok_at_rotation + 20 or bool(traffic.failures)

            await eventually(more_admissions, "admissions after the rotation", within=60)
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)

        assert not traffic.failures, traffic.failures[:5]
        assert traffic.ok > ok_at_rotation > 0 and traffic.probes > 0
        assert rotation.ROLLING in phases, phases  # we watched it pass through the phases
        new_secret = await _secret(api, group.namespace)
        new_ca = base64.b64decode(new_secret.data["ca.crt"])
        assert new_ca != old_ca
        assert await _bundle(api, group.mwc) == new_ca  # the old CA left the bundle at the end
        for proc in group.procs:  # both replicas serve under the new CA only
            der = await _served_cert(proc.port, new_ca)
            assert pki.fingerprint(
                x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
            ) == pki.fingerprint(base64.b64decode(new_secret.data["tls.crt"]))
        print(f"\n[rotation] admissions ok={traffic.ok} probes={traffic.probes} phases={phases}")


async def test_configmap_hot_reload_through_the_running_webhook(
    api: client.ApiClient, control_plane: ControlPlane, tmp_path: Path
) -> None:
    system_ns = await make_namespace(api, unique("outrider-cfg"))
    v1 = client.CoreV1Api(api)
    await v1.create_namespaced_config_map(
        system_ns,
        {
            "metadata": {"name": "outrider-webhook"},
            "data": {"config.yaml": "sidecar_image: registry.example/outrider:a\n"},
        },
    )
    certs = serving_certs(tmp_path / "tls")
    mwc = unique("outrider-cfg")
    proc = WebhookProcess(
        args=[
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--host",
            "127.0.0.1",
            "--namespace",
            system_ns,
            "--webhook-config-name",
            mwc,
            "--config-map",
            "outrider-webhook",
            "--tls-cert",
            str(certs.cert_file),
            "--tls-key",
            str(certs.key_file),
        ],
        port=free_port(),
        log=tmp_path / "webhook.log",
    )
    enabled = await make_namespace(api, unique("lc-cfg"), {"outrider.dev/inject": "enabled"})
    proc.start()
    try:
        await proc.wait_serving()
        await register_webhook(api, mwc, proc.url, certs.ca_pem)

        async def proxy_image() -> str | None:
            try:
                pod = await create_pod(api, enabled, pod_body("p", annotations=MCP), dry_run="All")
            except ApiException:
                return None
            spec = pod["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                if c["name"] == "outrider-proxy":
                    return str(c["image"])
            return None

        async def image_is(tag: str) -> Any:
            async def check() -> bool:
                return await proxy_image() == f"registry.example/outrider:{tag}"

            return check

        await eventually(await image_is("a"), "the ConfigMap's first version in use", within=60)
        await v1.patch_namespaced_config_map(
            "outrider-webhook",
            system_ns,
            {"data": {"config.yaml": "sidecar_image: registry.example/outrider:b\n"}},
        )
        await eventually(await image_is("b"), "the changed ConfigMap applied without a restart", within=60)
        await v1.patch_namespaced_config_map(
            "outrider-webhook",
            system_ns,
            {
                "data": {
                    "config.yaml": (
                        "sidecar_image: registry.example/outrider:c\nimage_pull_policy: Sometimes\n"
                    )
                }
            },
        )

        async def event() -> Any:
            events = await v1.list_namespaced_event(
                system_ns, field_selector="involvedObject.name=outrider-webhook"
            )
            return [e for e in events.items if e.reason == "InvalidConfig"]

        found = await eventually(event, "an InvalidConfig Event for the bad ConfigMap", within=60)
        assert "image_pull_policy" in found[0].message and "Sometimes" in found[0].message
        assert await proxy_image() == "registry.example/outrider:b"  # last good config still serves
        log_text = proc.log.read_text()
        assert "rejected" in log_text and "image_pull_policy" in log_text
        metrics = await _metrics(proc.port)
        assert "outrider_webhook_config_valid 0.0" in metrics
        assert 'outrider_webhook_config_reloads_total{result="rejected"} 1.0' in metrics
        assert 'outrider_webhook_config_reloads_total{result="applied"} 2.0' in metrics
        assert proc.proc is not None and proc.proc.poll() is None  # no restart happened
    finally:
        await unregister_webhook(api, mwc)
        proc.stop()


async def _metrics(port: int) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{port}/metrics", ssl=ctx) as resp,
    ):
        return await resp.text()
