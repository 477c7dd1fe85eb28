"""The checks themselves: pure functions from `Facts` to one `Result` per line of the report.

Groups and their order follow `linkerd check`: the platform first, then the install, then workloads.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from outrider.webhook import annotations as ann
from outrider.webhook.check.facts import Facts, PodFacts
from outrider.webhook.config import ConfigError
from outrider.webhook.egress import POD_SECURITY_ENFORCE, choose_mode

PASS, WARN, FAIL = "pass", "warn", "fail"
# Native sidecars (restartPolicy: Always init containers): beta and on by default from 1.29, GA in 1.33.
NATIVE_SIDECAR_MINOR = 29
MIN_MINOR = 27
PROXY = "outrider-proxy"
CSI_DRIVER = "csi.spiffe.io"
EXPIRY_WARN = datetime.timedelta(days=14)
OPTED_IN = (ann.NAMESPACE_ENABLED, ann.NAMESPACE_STRICT)


@dataclass(frozen=True)
class Result:
    group: str
    name: str
    status: str  # pass | warn | fail
    message: str
    hint: str = ""
    details: tuple[str, ...] = ()

    def to_mapping(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "status": self.status,
            "message": self.message,
            "hint": self.hint,
            "details": list(self.details),
        }


def _minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"^v?(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


# --- kubernetes platform ------------------------------------------------------------------------


def check_version(f: Facts) -> Iterable[Result]:
    g = "kubernetes-version"
    parsed = _minor(f.server_version)
    if parsed is None:
        yield Result(
            g,
            "can query the Kubernetes API",
            FAIL,
            f"no server version: {f.version_error or '?'}",
            "check --kubeconfig/--context and that the API server is reachable",
        )
        return
    yield Result(g, "can query the Kubernetes API", PASS, f"server {f.server_version}")
    major, minor = parsed
    if (major, minor) < (1, MIN_MINOR):
        yield Result(
            g,
            "is running the minimum Kubernetes version",
            FAIL,
            f"{f.server_version} is older than 1.{MIN_MINOR}",
            "upgrade the cluster",
        )
    else:
        yield Result(g, "is running the minimum Kubernetes version", PASS, f"1.{MIN_MINOR}+")
    if (major, minor) >= (1, NATIVE_SIDECAR_MINOR):
        yield Result(g, "supports native sidecars", PASS, "restartPolicy: Always init containers")
    else:
        yield Result(
            g,
            "supports native sidecars",
            WARN,
            f"{f.server_version} has no native sidecars on by default (1.{NATIVE_SIDECAR_MINOR}+)",
            "set native_sidecar: false in the webhook ConfigMap, or upgrade the cluster",
        )


def check_spiffe(f: Facts) -> Iterable[Result]:
    g = "spiffe"
    if f.csi_driver:
        yield Result(g, "SPIFFE CSI driver is registered", PASS, f"CSIDriver {CSI_DRIVER}")
    else:
        yield Result(
            g,
            "SPIFFE CSI driver is registered",
            FAIL,
            f"no CSIDriver {CSI_DRIVER}{': ' + f.csi_driver_error if f.csi_driver_error else ''}",
            "install the SPIFFE CSI driver (spiffe-csi) with SPIRE; injected pods cannot start without it",
        )


def check_registration(f: Facts) -> Iterable[Result]:
    g = "spiffe"
    name = f"a ClusterSPIFFEID selects {PROXY}"
    if f.cluster_spiffe_ids_error:
        yield Result(
            g,
            name,
            WARN,
            f"cannot list ClusterSPIFFEIDs: {f.cluster_spiffe_ids_error}",
            "run check with rights to list clusterspiffeids.spire.spiffe.io",
        )
        return
    if f.cluster_spiffe_ids is None:
        yield Result(
            g,
            name,
            WARN,
            "the ClusterSPIFFEID CRD is not installed",
            "install spire-controller-manager, or register outrider-proxy with SPIRE another way",
        )
        return
    selecting = [
        str((c.get("metadata") or {}).get("name", "?"))
        for c in f.cluster_spiffe_ids
        if f"k8s:container-name:{PROXY}" in ((c.get("spec") or {}).get("workloadSelectorTemplates") or [])
    ]
    if selecting:
        yield Result(g, name, PASS, ", ".join(sorted(selecting)))
    else:
        yield Result(
            g,
            name,
            FAIL,
            f"no ClusterSPIFFEID has workloadSelectorTemplates k8s:container-name:{PROXY}",
            "kubectl apply -f manifests/examples/spire-clusterspiffeid.yaml",
        )


# --- the install --------------------------------------------------------------------------------


def _pems(blob: bytes) -> list[bytes]:
    return [
        m.group(0)
        for m in re.finditer(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", blob, re.S)
    ]


def _b64(value: str | None) -> bytes:
    try:
        return base64.b64decode(value or "", validate=True)
    except (binascii.Error, ValueError):
        return b""


def _signed_by(cert: x509.Certificate, ca_pem: bytes) -> bool:
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except Exception:  # any failure means "not this CA"
        return False
    return True


def check_webhook(f: Facts) -> Iterable[Result]:
    g = "outrider-webhook"
    n = f.names
    mwc = f.webhook_config
    if f.webhook_config_error:
        yield Result(
            g,
            f"MutatingWebhookConfiguration {n.webhook_config} exists",
            FAIL,
            f"cannot list MutatingWebhookConfigurations: {f.webhook_config_error}",
            "run check as a user who may read cluster-scoped admission objects",
        )
        return
    if mwc is None:
        yield Result(
            g,
            f"MutatingWebhookConfiguration {n.webhook_config} exists",
            FAIL,
            "not found",
            "install Outrider: kubectl apply -k manifests/base",
        )
        return
    yield Result(
        g,
        f"MutatingWebhookConfiguration {n.webhook_config} exists",
        PASS,
        f"{len(mwc.get('webhooks') or [])} webhook(s)",
    )
    hooks = list(mwc.get("webhooks") or [])
    # the serving certificate
    tls: x509.Certificate | None = None
    if f.cert_secret is None:
        yield Result(
            g,
            "serving certificate Secret exists",
            FAIL,
            f"Secret {n.namespace}/{n.cert_secret}: {f.cert_secret_error or 'not found'}",
            f"the webhook creates it at start: kubectl -n {n.namespace} logs deploy/{n.service}",
        )
    else:
        try:
            tls = x509.load_pem_x509_certificate(_b64(f.cert_secret.get("tls.crt")))
        except ValueError:
            yield Result(
                g,
                "serving certificate Secret exists",
                FAIL,
                f"Secret {n.namespace}/{n.cert_secret} has no valid tls.crt",
                f"delete the Secret and restart the webhook: kubectl -n {n.namespace} rollout restart "
                f"deploy/{n.service}",
            )
        else:
            yield Result(g, "serving certificate Secret exists", PASS, f"{n.namespace}/{n.cert_secret}")
    if tls is not None:
        now = datetime.datetime.fromtimestamp(f.now_epoch, datetime.UTC)
        left = tls.not_valid_after_utc - now
        expiry = tls.not_valid_after_utc.isoformat()
        restart = (
            f"kubectl -n {n.namespace} annotate secret {n.cert_secret} "
            "outrider.dev/rotate=$(date +%s) --overwrite"
        )
        if tls.not_valid_before_utc > now:
            yield Result(
                g,
                "serving certificate is valid now",
                FAIL,
                f"not valid before {tls.not_valid_before_utc}",
                "check the clocks of the nodes",
            )
        elif left <= datetime.timedelta(0):
            yield Result(
                g,
                "serving certificate is valid now",
                FAIL,
                f"expired at {expiry}",
                f"request a rotation: {restart}",
            )
        elif left < EXPIRY_WARN:
            yield Result(
                g,
                "serving certificate is valid now",
                WARN,
                f"expires at {expiry} ({left.days} days)",
                f"rotation should have started; check the webhook logs or request one: {restart}",
            )
        else:
            yield Result(g, "serving certificate is valid now", PASS, f"expires at {expiry}")
        bad = [
            str(h.get("name"))
            for h in hooks
            if not any(
                _signed_by(tls, ca) for ca in _pems(_b64((h.get("clientConfig") or {}).get("caBundle")))
            )
        ]
        if bad:
            yield Result(
                g,
                "caBundle trusts the serving certificate",
                FAIL,
                f"the caBundle of {', '.join(bad)} does not hold the CA that signed the serving certificate",
                "the webhook patches it within seconds when running; otherwise restart it: "
                f"kubectl -n {n.namespace} rollout restart deploy/{n.service}",
            )
        else:
            yield Result(g, "caBundle trusts the serving certificate", PASS, f"{len(hooks)} webhook(s)")
    if f.endpoints_error:
        yield Result(
            g,
            f"Service {n.service} has ready endpoints",
            FAIL,
            f.endpoints_error,
            f"kubectl -n {n.namespace} get endpointslices -l kubernetes.io/service-name={n.service}",
        )
    elif f.ready_endpoints == 0:
        yield Result(
            g,
            f"Service {n.service} has ready endpoints",
            FAIL,
            f"0 ready, {f.not_ready_endpoints} not ready: every admission in an opted-in namespace fails",
            f"kubectl -n {n.namespace} get deploy,pods -l app.kubernetes.io/name={n.service}; "
            f"scale up: kubectl -n {n.namespace} scale deploy/{n.service} --replicas=2",
        )
    elif f.ready_endpoints == 1:
        yield Result(
            g,
            f"Service {n.service} has ready endpoints",
            WARN,
            "1 ready: no redundancy",
            f"kubectl -n {n.namespace} scale deploy/{n.service} --replicas=2",
        )
    else:
        yield Result(g, f"Service {n.service} has ready endpoints", PASS, f"{f.ready_endpoints} ready")
    d = f.dry_run
    name = "a dry-run pod in an opted-in namespace is injected"
    if d is None:
        pass
    elif not d.namespace:
        yield Result(
            g,
            name,
            WARN,
            "no namespace is labelled outrider.dev/inject",
            "kubectl label namespace NAME outrider.dev/inject=enabled",
        )
    elif d.error:
        yield Result(
            g,
            name,
            FAIL,
            f"in {d.namespace}: {d.error}",
            "the apiserver cannot call the webhook: see the checks above and the webhook logs",
        )
    elif not d.injected:
        yield Result(
            g,
            name,
            FAIL,
            f"in {d.namespace}: admitted without {PROXY}",
            f"check the namespaceSelector/objectSelector of {n.webhook_config}",
        )
    else:
        yield Result(g, name, PASS, f"in {d.namespace}")


def check_config(f: Facts) -> tuple[list[Result], str | None]:
    """The ConfigMap result and the current config hash (None when it does not parse)."""
    from outrider.webhook.cluster.configmap import parse_configmap  # the webhook's own parser

    g = "outrider-config"
    n = f.names
    name = f"ConfigMap {n.config_map} parses"
    if f.config_map is None:
        return [
            Result(
                g,
                name,
                FAIL,
                f"{n.namespace}/{n.config_map}: {f.config_map_error or 'not found'}",
                "install Outrider: kubectl apply -k manifests/base",
            )
        ], None
    try:
        parsed = parse_configmap(f.config_map)
    except ConfigError as exc:
        return [
            Result(
                g,
                name,
                FAIL,
                str(exc),
                f"fix it: kubectl -n {n.namespace} edit configmap {n.config_map} (the webhook keeps "
                "its last good config meanwhile)",
            )
        ], None
    return [Result(g, name, PASS, f"config hash {parsed.webhook.hash}")], parsed.webhook.hash


def check_namespaces(f: Facts) -> Iterable[Result]:
    g = "namespaces"
    if f.workloads_error:
        yield Result(
            g,
            "can list labelled namespaces and their pods",
            FAIL,
            f.workloads_error,
            "run check as a user who may list namespaces and pods",
        )
    for ns, labels in sorted(f.namespaces.items()):
        value = labels.get(ann.NAMESPACE_INJECT, "")
        level = labels.get(POD_SECURITY_ENFORCE, "privileged")
        if value not in OPTED_IN:
            yield Result(
                g,
                f"namespace {ns}",
                WARN,
                f"{ann.NAMESPACE_INJECT}={value!r} is not enabled or strict",
                f"kubectl label namespace {ns} {ann.NAMESPACE_INJECT}=enabled --overwrite",
            )
            continue
        mode, warnings = choose_mode(labels)
        msg = f"{value}; Pod Security {level}; egress mode {mode}"
        if warnings:
            yield Result(
                g,
                f"namespace {ns}",
                WARN,
                f"{msg}: {'; '.join(warnings)}",
                f"remove or fix the label: kubectl label namespace {ns} {ann.EGRESS_MODE_LABEL}-",
            )
        else:
            yield Result(g, f"namespace {ns}", PASS, msg)


def _status(pod: PodFacts) -> Mapping[str, Any] | None:
    raw = pod.annotations.get(ann.STATUS)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, Mapping) else {}


def _restart(pod: PodFacts) -> str:
    kind, name = pod.owner_kind, pod.owner_name
    if kind == "ReplicaSet":
        template = pod.labels.get("pod-template-hash", "")
        if template and name.endswith(f"-{template}"):
            return f"kubectl -n {pod.namespace} rollout restart deployment/{name[: -len(template) - 1]}"
    if kind in ("StatefulSet", "DaemonSet"):
        return f"kubectl -n {pod.namespace} rollout restart {kind.lower()}/{name}"
    return f"kubectl -n {pod.namespace} delete pod {pod.name}  # no controller restarts it for you"


def check_pods(f: Facts, current_hash: str | None) -> Iterable[Result]:
    g = "workloads"
    opted = {ns for ns, labels in f.namespaces.items() if labels.get(ann.NAMESPACE_INJECT) in OPTED_IN}
    # a pod being deleted is on its way out (its proxy drains and reports unready on purpose): a
    # rollout in progress is not a fault, and its replacement is judged instead
    pods = [p for p in f.pods if p.namespace in opted and not p.terminating]
    stale: list[PodFacts] = []
    escaped: list[PodFacts] = []
    not_ready: list[PodFacts] = []
    for pod in pods:
        status = _status(pod)
        opted_out = "false" in (pod.labels.get(ann.POD_INJECT), pod.annotations.get(ann.POD_INJECT))
        if status is None or PROXY not in pod.containers:
            if not opted_out or f.namespaces[pod.namespace].get(ann.NAMESPACE_INJECT) == ann.NAMESPACE_STRICT:
                escaped.append(pod)
            continue
        if current_hash is not None and status.get("configHash") != current_hash:
            stale.append(pod)
        if pod.phase == "Running" and pod.proxy_ready is not True:
            not_ready.append(pod)
    if current_hash is None:
        yield Result(
            g,
            "pods run the current configuration",
            WARN,
            "unknown: the ConfigMap does not parse",
            "fix the ConfigMap first",
        )
    elif stale:
        commands = sorted({_restart(p) for p in stale})
        yield Result(
            g,
            "pods run the current configuration",
            WARN,
            f"{len(stale)} pod(s) injected with an older config than {current_hash}",
            "restart them to pick up the current config:",
            tuple(f"{p.namespace}/{p.name}" for p in stale) + tuple(commands),
        )
    else:
        yield Result(
            g, "pods run the current configuration", PASS, f"{len(pods) - len(escaped)} injected pod(s)"
        )
    if escaped:
        commands = sorted({_restart(p) for p in escaped})
        yield Result(
            g,
            "pods in opted-in namespaces are injected",
            WARN,
            f"{len(escaped)} pod(s) without {PROXY} (created before the label or while the webhook was down)",
            "recreate them so the webhook sees them:",
            tuple(f"{p.namespace}/{p.name}" for p in escaped) + tuple(commands),
        )
    else:
        yield Result(g, "pods in opted-in namespaces are injected", PASS, f"{len(opted)} namespace(s)")
    if not_ready:
        yield Result(
            g,
            f"{PROXY} containers are ready",
            FAIL,
            f"{len(not_ready)} pod(s) with {PROXY} not Ready",
            f"kubectl -n NAMESPACE logs POD -c {PROXY}; see README troubleshooting",
            tuple(f"{p.namespace}/{p.name}: /readyz {p.readyz or 'not reachable'}" for p in not_ready),
        )
    else:
        yield Result(g, f"{PROXY} containers are ready", PASS, "all running pods")


# --- install prerequisites (--pre) --------------------------------------------------------------


def check_conflicts(f: Facts) -> Iterable[Result]:
    g = "pre-install"
    name = f"no MutatingWebhookConfiguration {f.names.webhook_config} is in the way"
    mwc = f.webhook_config
    if f.webhook_config_error:
        yield Result(
            g,
            name,
            WARN,
            f"cannot list MutatingWebhookConfigurations: {f.webhook_config_error}",
            "install needs that right anyway; see the permission check below",
        )
        return
    if mwc is None:
        yield Result(g, name, PASS, "none")
        return
    labels = (mwc.get("metadata") or {}).get("labels") or {}
    if labels.get("app.kubernetes.io/part-of") == "outrider":
        yield Result(
            g,
            name,
            WARN,
            "Outrider is already installed; install will update it",
            "run `outrider check` (without --pre) to see its health",
        )
    else:
        yield Result(
            g,
            name,
            FAIL,
            f"{f.names.webhook_config} exists and is not Outrider's",
            f"inspect it: kubectl get mutatingwebhookconfiguration {f.names.webhook_config} -o yaml",
        )


def check_access(f: Facts) -> Iterable[Result]:
    g = "pre-install"
    denied = [a for a in f.access if not a.allowed]
    if denied:
        yield Result(
            g,
            "can create the install's objects",
            FAIL,
            f"{len(denied)} of {len(f.access)} denied",
            "ask a cluster admin to install, or grant these verbs",
            tuple(
                f"{a.verb} {a.resource}{'.' + a.group if a.group else ''}"
                f"{' in ' + a.namespace if a.namespace else ''}"
                for a in denied
            ),
        )
    else:
        yield Result(g, "can create the install's objects", PASS, f"{len(f.access)} permissions")


# --- entry points -------------------------------------------------------------------------------


def evaluate(f: Facts) -> list[Result]:
    out: list[Result] = [*check_version(f), *check_spiffe(f), *check_registration(f), *check_webhook(f)]
    config_results, current = check_config(f)
    out += config_results
    out += [*check_namespaces(f), *check_pods(f, current)]
    return out


def evaluate_pre(f: Facts) -> list[Result]:
    return [*check_version(f), *check_spiffe(f), *check_conflicts(f), *check_access(f)]


def failed(results: Iterable[Result]) -> bool:
    return any(r.status == FAIL for r in results)
