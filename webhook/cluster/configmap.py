"""Hot reload of the webhook configuration from its ConfigMap (watched by name).

`parse_configmap` is the pure part; `ConfigMapWatch` applies good versions to the `ConfigHolder`
and reports bad ones (log, a Warning Event on the ConfigMap, a metric) while keeping the last good.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import Counter, Gauge

from outrider.webhook.config import ConfigError, ConfigHolder, WebhookConfig, parse_config

log = logging.getLogger("outrider.webhook.config")

CONFIG_KEY = "config.yaml"
NAMESPACE_EGRESS_KEY = "namespace-egress.yaml"

RELOADS = Counter(
    "outrider_webhook_config_reloads", "ConfigMap versions seen by the webhook, by outcome", ["result"]
)
CONFIG_VALID = Gauge(
    "outrider_webhook_config_valid", "1 when the latest ConfigMap version was applied, 0 when it was rejected"
)


@dataclass(frozen=True)
class ClusterConfig:
    webhook: WebhookConfig
    namespace_egress: Mapping[str, Mapping[str, Any]]


def parse_configmap(data: Mapping[str, str] | None) -> ClusterConfig:
    data = data or {}
    unknown = sorted(set(data) - {CONFIG_KEY, NAMESPACE_EGRESS_KEY})
    if unknown:
        raise ConfigError(
            f"ConfigMap: unknown key(s) {unknown}; allowed: [{CONFIG_KEY!r}, {NAMESPACE_EGRESS_KEY!r}]"
        )
    try:
        config_doc = yaml.safe_load(data.get(CONFIG_KEY) or "") or {}
        egress_doc = yaml.safe_load(data.get(NAMESPACE_EGRESS_KEY) or "") or {}
    except yaml.YAMLError as exc:
        from outrider.sidecar.config import yaml_problem

        raise ConfigError(f"ConfigMap: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(config_doc, Mapping):
        raise ConfigError(f"ConfigMap {CONFIG_KEY}: must be a mapping")
    if not isinstance(egress_doc, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping) for k, v in egress_doc.items()
    ):
        raise ConfigError(f"ConfigMap {NAMESPACE_EGRESS_KEY}: must map namespace names to policy mappings")
    webhook = parse_config(config_doc)
    return ClusterConfig(
        webhook=webhook, namespace_egress=MappingProxyType({k: dict(v) for k, v in egress_doc.items()})
    )


@dataclass
class ConfigMapWatch:
    api: client.ApiClient
    namespace: str
    name: str
    holder: ConfigHolder
    component: str = "outrider-webhook"
    pod_name: str = ""
    namespace_egress: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    last_error: str | None = None
    _applied_version: str = ""

    async def load_once(self) -> None:
        try:
            cm = await client.CoreV1Api(self.api).read_namespaced_config_map(self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                log.warning("ConfigMap %s/%s not found; using the built-in config", self.namespace, self.name)
                return
            raise
        await self.apply(cm)

    async def apply(self, cm: Any) -> None:
        version = str(cm.metadata.resource_version)
        if version == self._applied_version:
            return
        self._applied_version = version
        try:
            parsed = parse_configmap(cm.data)
        except ConfigError as exc:
            self.last_error = str(exc)
            RELOADS.labels(result="rejected").inc()
            CONFIG_VALID.set(0)
            log.error(
                "ConfigMap %s/%s version %s rejected, keeping the last good config (hash %s): %s",
                self.namespace, self.name, version, self.holder.current.hash, exc,
            )  # fmt: skip
            await self._event(cm, str(exc))
            return
        self.holder.replace(parsed.webhook)
        self.namespace_egress = parsed.namespace_egress
        self.last_error = None
        RELOADS.labels(result="applied").inc()
        CONFIG_VALID.set(1)
        log.info(
            "ConfigMap %s/%s version %s applied (config hash %s)",
            self.namespace,
            self.name,
            version,
            parsed.webhook.hash,
        )

    async def _event(self, cm: Any, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{self.name}.", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": self.name,
                "namespace": self.namespace,
                "uid": cm.metadata.uid,
                "resourceVersion": str(cm.metadata.resource_version),
            },
            "reason": "InvalidConfig",
            "message": f"rejected, keeping the last good config: {message}"[:1024],
            "type": "Warning",
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.pod_name or self.component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await client.CoreV1Api(self.api).create_namespaced_event(self.namespace, body)
        except ApiException as exc:
            log.warning("could not record an Event for the rejected ConfigMap: %s", exc.status)

    async def run(self) -> None:
        v1 = client.CoreV1Api(self.api)
        selector = f"metadata.name={self.name}"
        backoff = 0.5
        while True:
            try:
                listing = await v1.list_namespaced_config_map(self.namespace, field_selector=selector)
                for cm in listing.items:
                    await self.apply(cm)
                async with watch.Watch().stream(
                    v1.list_namespaced_config_map,
                    self.namespace,
                    field_selector=selector,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=300,
                ) as stream:
                    async for event in stream:
                        if event["type"] in ("ADDED", "MODIFIED"):
                            await self.apply(event["object"])
                        elif event["type"] == "DELETED":
                            log.warning(
                                "ConfigMap %s/%s deleted; keeping the last good config",
                                self.namespace,
                                self.name,
                            )
                backoff = 0.5
            except ApiException as exc:
                if exc.status != 410:
                    log.warning("ConfigMap watch failed (%s); retrying in %.1fs", exc.status, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30)
            except (TimeoutError, OSError) as exc:
                log.warning("ConfigMap watch interrupted (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
