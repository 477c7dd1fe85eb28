"""Namespace labels (and the few annotations the engine reads) from the API: a list+watch cache,
with a direct read for namespaces not seen yet.

Implements `outrider.webhook.namespaces.NamespaceFacts`; per-namespace egress policy comes from the
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

from outrider.webhook.meshes import NAMESPACE_ANNOTATIONS

log = logging.getLogger("outrider.webhook.namespaces")


@dataclass
class NamespaceCache:
    api: client.ApiClient
    policies: Callable[[], Mapping[str, Mapping[str, Any]]] = dict
    _labels: dict[str, dict[str, str]] = field(default_factory=dict)
    _annotations: dict[str, dict[str, str]] = field(default_factory=dict)
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
        self._remember(ns)
        return self._labels[namespace]

    async def annotations(self, namespace: str) -> Mapping[str, str]:
        if namespace not in self._labels:
            await self.labels(namespace)
        return self._annotations.get(namespace, {})

    def _remember(self, ns: Any) -> None:
        name = ns.metadata.name
        self._labels[name] = dict(ns.metadata.labels or {})
        # only the annotations the engine reads: others (last-applied-configuration) can be large
        annotations = ns.metadata.annotations or {}
        wanted = {k: v for k, v in annotations.items() if k in NAMESPACE_ANNOTATIONS}
        if wanted:
            self._annotations[name] = wanted
        else:
            self._annotations.pop(name, None)

    async def egress_policy(self, namespace: str) -> Mapping[str, Any] | None:
        return self.policies().get(namespace)

    async def _relist(self) -> str:
        listing = await client.CoreV1Api(self.api).list_namespace()
        self._labels, self._annotations = {}, {}
        for ns in listing.items:
            self._remember(ns)
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
                            self._annotations.pop(name, None)
                        else:
                            self._remember(obj)
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
