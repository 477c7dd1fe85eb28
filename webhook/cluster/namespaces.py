"""Namespace labels from the API: a list+watch cache, with a direct read for namespaces not seen yet.

Implements `webhook.namespaces.NamespaceFacts`; per-namespace egress policy comes from the
operator's ConfigMap (`namespace-egress.yaml`), never from labels app teams could set themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("outrider.webhook.namespaces")


@dataclass
class NamespaceCache:
    api: client.ApiClient
    policies: Callable[[], Mapping[str, Mapping[str, Any]]] = dict
    _labels: dict[str, dict[str, str]] = field(default_factory=dict)
    synced: asyncio.Event = field(default_factory=asyncio.Event)

    async def labels(self, namespace: str) -> Mapping[str, str]:
        cached = self._labels.get(namespace)
        if cached is not None:
            return cached
        # created a moment ago and the watch event is still on its way: ask once
        try:
            ns = await client.CoreV1Api(self.api).read_namespace(namespace)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        labels = dict(ns.metadata.labels or {})
        self._labels[namespace] = labels
        return labels

    async def egress_policy(self, namespace: str) -> Mapping[str, Any] | None:
        return self.policies().get(namespace)

    async def _relist(self) -> str:
        listing = await client.CoreV1Api(self.api).list_namespace()
        self._labels = {ns.metadata.name: dict(ns.metadata.labels or {}) for ns in listing.items}
        self.synced.set()
        return str(listing.metadata.resource_version)

    async def run(self) -> None:
        v1 = client.CoreV1Api(self.api)
        backoff = 0.5
        while True:
            try:
                rv = await self._relist()
                w = watch.Watch()
                async with w.stream(
                    v1.list_namespace, resource_version=rv, timeout_seconds=300, allow_watch_bookmarks=True
                ) as stream:
                    async for event in stream:
                        obj = event["object"]
                        if event["type"] == "BOOKMARK":
                            continue
                        name = obj.metadata.name
                        if event["type"] == "DELETED":
                            self._labels.pop(name, None)
                        else:
                            self._labels[name] = dict(obj.metadata.labels or {})
                backoff = 0.5
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: our resourceVersion is too old, relist at once
                    log.warning("namespace watch failed (%s); retrying in %.1fs", exc.status, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30)
            except (TimeoutError, OSError) as exc:
                log.warning("namespace watch interrupted (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
