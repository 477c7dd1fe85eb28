"""The webhook's HTTPS server: `POST /mutate` (AdmissionReview v1), `/healthz`, `/readyz`, `/metrics`.

A thin aiohttp shell around `outrider.webhook.admission` and `outrider.webhook.engine`; bad input gets
a 4xx with a one-line reason (or an in-protocol denial once the uid is known), never a 5xx or a stack
trace.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from outrider.webhook import admission, strict
from outrider.webhook import annotations as ann
from outrider.webhook.config import ConfigHolder
from outrider.webhook.engine import inject
from outrider.webhook.namespaces import NamespaceFacts
from outrider.webhook.tls import CertStore

log = logging.getLogger("outrider.webhook")

DEFAULT_MAX_BODY = 2 * 1024 * 1024  # a big pod is ~100 KiB; etcd's own object limit is 1.5 MiB
OUTCOMES = ("injected", "skipped", "denied", "ignored", "invalid", "error")
ENABLED_LABELS = {ann.NAMESPACE_INJECT: ann.NAMESPACE_ENABLED}
SCOPE = "outrider.webhook"
ADMISSIONS_METRIC = "outrider.webhook.admissions"
DURATION_METRIC = "outrider.webhook.admission.duration"
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Telemetry:
    """OpenTelemetry instruments for admissions (API only: the SDK is wired by `outrider webhook`).

    Attribute dicts are built once per outcome, so recording adds no allocation on `/mutate`.
    """

    def __init__(
        self,
        meter_provider: otel_metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        meter = (meter_provider or otel_metrics.get_meter_provider()).get_meter(SCOPE)
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(SCOPE)
        self.admissions = meter.create_counter(
            ADMISSIONS_METRIC, unit="{admission}", description="AdmissionReview requests by outcome"
        )
        self.duration = meter.create_histogram(
            DURATION_METRIC,
            unit="s",
            description="Time to answer one AdmissionReview",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self.attributes = {name: {"outcome": name} for name in OUTCOMES}

    def record(self, outcome: str, seconds: float, review: admission.Review | None, start_ns: int) -> None:
        attributes = self.attributes[outcome]
        self.admissions.add(1, attributes)
        self.duration.record(seconds, attributes)
        # A SERVER span per admission: what was asked and how it ended, never the object itself.
        if review is not None:
            name = f"admission {review.operation} {review.kind.get('kind', '')}".rstrip()
            span_attributes: dict[str, str] = {
                "outrider.admission.outcome": outcome,
                "outrider.admission.uid": review.uid,
                "outrider.admission.operation": review.operation,
            }
            if review.namespace:
                span_attributes["k8s.namespace.name"] = review.namespace
        else:
            name = "admission"
            span_attributes = {"outrider.admission.outcome": outcome}
        span = self.tracer.start_span(
            name, kind=trace.SpanKind.SERVER, attributes=span_attributes, start_time=start_ns
        )
        if outcome in ("error", "invalid"):
            span.set_attribute("error.type", outcome)
            span.set_status(trace.StatusCode.ERROR)
        span.end()


@dataclass
class Metrics:
    registry: CollectorRegistry
    admissions: Counter
    latency: Histogram
    # label children resolved once: `labels()` takes a lock and builds a key on every call
    by_outcome: dict[str, Any]

    @classmethod
    def create(cls) -> Metrics:
        # One registry per app: several servers in one process (tests, bench) must not share counters.
        registry = CollectorRegistry()
        admissions = Counter(
            "outrider_webhook_admissions",
            "AdmissionReview requests by outcome",
            ["outcome"],
            registry=registry,
        )
        by_outcome = {name: admissions.labels(name) for name in OUTCOMES}
        latency = Histogram(
            "outrider_webhook_admission_duration_seconds",
            "Time to answer one AdmissionReview",
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        return cls(registry, admissions, latency, by_outcome)


class AnswerCache:
    """Answers by (config, namespace facts, pod object): the engine is pure, so reuse is exact.

    A ReplicaSet, Job or StatefulSet scale-up sends the same pod object many times in a row.
    """

    # A body up to this size is kept whole in its key: exact (no digest to collide) and ~3x cheaper
    # than SHA-256 over it (Python's bytes hash, then one memcmp on a hit); 256 entries hold at most
    # 8 MiB of such keys. A larger body is keyed by its SHA-256 digest.
    EXACT_BODY_LIMIT = 32 * 1024

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._answers: OrderedDict[Hashable, tuple[str, bytes]] = OrderedDict()

    @staticmethod
    def key(
        config_hash: str,
        namespace: str,
        labels: Mapping[str, str],
        policy: Any,
        obj: Any,
        body: bytes,
        uid: str,
        namespace_annotations: Mapping[str, str] | None = None,
    ) -> Hashable:
        facts = _facts(config_hash, namespace, labels, namespace_annotations, policy)
        # Cheap path: the body minus its per-request uid stands for the object (and more, which only
        # makes the key stricter). Sound only when that uid text occurs exactly once (as `bytes.count`
        # counts: non-overlapping, from the left), i.e. nowhere inside the object; otherwise the
        # decoded object itself is hashed.
        marker = b'"uid":' + _quoted(uid)
        at = body.find(marker)
        end = at + len(marker)
        if at >= 0 and body.find(marker, end) < 0:
            if len(body) <= AnswerCache.EXACT_BODY_LIMIT:
                return (facts, body[:at] + body[end:])
            # sha256, not blake2b: OpenSSL's is ~2x faster here (SHA extensions)
            digest = hashlib.sha256(facts)
            view = memoryview(body)
            digest.update(b"\0body\0")
            digest.update(view[:at])
            digest.update(view[end:])
            return digest.digest()
        digest = hashlib.sha256(facts)
        digest.update(b"\0object\0" + admission.dumps(obj))
        return digest.digest()

    def get(self, key: Hashable) -> tuple[str, bytes] | None:
        found = self._answers.get(key)
        if found is not None:
            self._answers.move_to_end(key)
        return found

    def put(self, key: Hashable, answer: tuple[str, bytes]) -> None:
        if self.size <= 0:
            return
        self._answers[key] = answer
        if len(self._answers) > self.size:
            self._answers.popitem(last=False)


def _facts(
    config_hash: str,
    namespace: str,
    labels: Mapping[str, str],
    namespace_annotations: Mapping[str, str] | None,
    policy: Any,
) -> bytes:
    """The answer's inputs besides the pod, as bytes that differ whenever they differ.

    One orjson call with sorted keys (a JSON text is its value's only spelling here); what orjson
    refuses (a non-string key, an int beyond 64 bits, a Mapping that is not a dict) takes the
    slower standard-library spelling, which starts with another byte, so the two never meet.
    """
    try:
        return orjson.dumps(
            [config_hash, namespace, labels, namespace_annotations or {}, policy], option=orjson.OPT_SORT_KEYS
        )
    except TypeError:

        def pairs(mapping: Mapping[Any, Any] | None) -> list[tuple[str, str]]:
            return sorted((repr(k), repr(v)) for k, v in (mapping or {}).items())

        facts = (config_hash, namespace, pairs(labels), pairs(namespace_annotations))
        try:
            spelt = json.dumps(policy, sort_keys=True, separators=(",", ":"), default=str)
        except TypeError:  # keys of mixed types cannot be sorted
            spelt = repr(policy)
        return b"repr\0" + repr(facts).encode() + b"\0" + spelt.encode()


def _quoted(uid: str) -> bytes:
    """`uid` as the JSON string `json.dumps` writes (what the body shortcut looks for); orjson spells
    printable ASCII the same way, ~20x faster, and a Kubernetes uid is a printable ASCII UUID."""
    if uid.isascii() and uid.isprintable():
        return orjson.dumps(uid)
    return json.dumps(uid).encode()


CONFIG = web.AppKey("config", ConfigHolder)
ANSWERS = web.AppKey("answers", AnswerCache)
CERTS = web.AppKey("certs", CertStore)
NAMESPACES = web.AppKey("namespaces", object)  # NamespaceFacts | None (Protocols are not AppKey types)
METRICS = web.AppKey("metrics", Metrics)
TELEMETRY = web.AppKey("telemetry", Telemetry)
READY_CHECKS = web.AppKey("ready_checks", list[Callable[[], bool]])


def _json(document: object) -> web.Response:
    return web.Response(body=admission.dumps(document), content_type="application/json")


async def mutate(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    start_ns = time.time_ns()
    started = time.perf_counter()
    outcome = "error"
    review: admission.Review | None = None
    try:
        body = await request.read()
        try:
            review = admission.decode(body)
        except admission.BadReview as exc:
            outcome = "invalid"
            if exc.uid is None:
                raise web.HTTPBadRequest(text=f"bad AdmissionReview: {exc}\n") from None
            return _json(admission.deny(exc.uid, f"bad AdmissionReview: {exc}", code=400))
        if review.is_pod_update:
            outcome = "ignored"
            try:
                denial = await _strict_update(request, review)
            except Exception:
                outcome = "error"
                log.exception("strict update check failed for request %s", review.uid)
                return _json(
                    admission.deny(review.uid, "internal error in the Outrider webhook; see its log", 500)
                )
            if denial is not None:
                outcome = "denied"
                return _json(admission.deny(review.uid, denial))
            return _json(admission.allow(review.uid))
        if not review.is_pod_create:
            outcome = "ignored"
            return _json(admission.allow(review.uid))
        try:
            namespace = review.namespace or ""
            facts: NamespaceFacts | None = request.app[NAMESPACES]  # type: ignore[assignment]
            labels = await facts.labels(namespace) if facts else ENABLED_LABELS
            ns_annotations = await facts.annotations(namespace) if facts else {}
            policy = await facts.egress_policy(namespace) if facts else None
            config = request.app[CONFIG].current
            cache = request.app[ANSWERS]
            key = cache.key(
                config.hash, namespace, labels, policy, review.object, body, review.uid, ns_annotations
            )
            cached = cache.get(key)
            if cached is None:
                result = inject(review.object, labels, config, policy, namespace or None, ns_annotations)
                if not result.allowed:
                    log.info("refused pod in namespace %s: %s", review.namespace, result.message)
                cached = (admission.outcome(result), admission.encode_result(result))
                cache.put(key, cached)
        except Exception:
            # A bug must not leak a stack trace to the API server; answer in-protocol and log it here.
            log.exception("injection failed for request %s", review.uid)
            return _json(
                admission.deny(review.uid, "internal error in the Outrider webhook; see its log", 500)
            )
        outcome = cached[0]
        return web.Response(body=admission.with_uid(review.uid, cached[1]), content_type="application/json")
    finally:
        elapsed = time.perf_counter() - started
        metrics.by_outcome[outcome].inc()
        metrics.latency.observe(elapsed)
        request.app[TELEMETRY].record(outcome, elapsed, review, start_ns)


async def _strict_update(request: web.Request, review: admission.Review) -> str | None:
    """Why a pod UPDATE in a strict namespace is refused (new ephemeral containers, swapped sidecar)."""
    facts: NamespaceFacts | None = request.app[NAMESPACES]  # type: ignore[assignment]
    labels = await facts.labels(review.namespace or "") if facts else ENABLED_LABELS
    if ann.namespace_mode(labels) != ann.NAMESPACE_STRICT:
        return None
    if review.sub_resource == admission.EPHEMERAL_CONTAINERS:
        problems = strict.ephemeral_problems(review.old_object, review.object)
    else:
        problems = strict.sidecar_image_changes(review.old_object, review.object)
    if not problems:
        return None
    log.info("refused pod update in namespace %s: %s", review.namespace, problems[0])
    return strict.refusal(problems)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if not request.app[CERTS].loaded:
        return web.Response(status=503, text="no serving certificate loaded\n")
    if not all(check() for check in request.app[READY_CHECKS]):
        return web.Response(status=503, text="not ready\n")
    return web.Response(text="ready\n")


async def metrics_endpoint(request: web.Request) -> web.Response:
    # the app's own registry, then the process-wide one (outrider.webhook.cluster's config-reload metrics)
    body = generate_latest(request.app[METRICS].registry) + generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def errors_are_one_line(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        raise web.HTTPBadRequest(text=f"bad request ({type(exc).__name__})\n") from None


def settle_heap() -> None:
    """Start-up is over: keep what it loaded out of the cyclic garbage collector's scans.

    Modules, the config, the TLS context and the app live as long as the process; `gc.freeze`
    moves them to the permanent generation, so the collections that every distinct pod's
    allocations trigger scan only objects made since (about 8 % less CPU per admission).
    """
    gc.collect()
    gc.freeze()


def build_app(
    config: ConfigHolder,
    certs: CertStore,
    namespaces: NamespaceFacts | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    cache_size: int = 256,
    meter_provider: otel_metrics.MeterProvider | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> web.Application:
    """The webhook app; OTel instruments come from the given providers, else the global (no-op) ones."""
    app = web.Application(client_max_size=max_body, middlewares=[errors_are_one_line])
    app[CONFIG] = config
    app[CERTS] = certs
    app[NAMESPACES] = namespaces
    app[METRICS] = Metrics.create()
    app[TELEMETRY] = Telemetry(meter_provider, tracer_provider)
    app[ANSWERS] = AnswerCache(cache_size)
    app[READY_CHECKS] = []
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app
