"""OpenTelemetry from the webhook: admissions by outcome, latency and a SERVER span per admission.

In-memory SDK reader/exporter for the shapes, a subprocess for "nothing set up without OTEL_*", and
once `outrider webhook` over real TLS exporting OTLP/HTTP to a local receiver (tests/telemetry's).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from webhook_support import review

from outrider.webhook.config import ConfigHolder
from outrider.webhook.server import ADMISSIONS_METRIC, DURATION_METRIC, build_app
from outrider.webhook.server_cli import telemetry
from outrider.webhook.tls import CertStore
from tests.telemetry.otlp_receiver import attributes_of, otlp_http_receiver

SECRET_ENV = "do-not-export-this-pod-value"


def _pod(**annotations: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "mcp", "namespace": "tools", "annotations": annotations},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "ghcr.io/example/mcp:1",
                    "ports": [{"containerPort": 8080}],
                    "env": [{"name": "X", "value": SECRET_ENV}],
                }
            ]
        },
    }


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


async def test_admissions_by_outcome_latency_and_spans_in_memory() -> None:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    app = build_app(
        ConfigHolder(),
        CertStore(),
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracer_provider,
    )
    async with TestClient(TestServer(app)) as client:
        reviews = [
            review(_pod(), uid="u-injected"),
            review(_pod(**{"outrider.dev/inject": "false"}), uid="u-skipped"),
            review(_pod(**{"outrider.dev/mcp-port": "15020"}), uid="u-denied"),
            review({"metadata": {}}, uid="u-ignored", kind="ConfigMap"),
        ]
        for body in reviews:
            response = await client.post("/mutate", json=body)
            assert response.status == 200
        response = await client.post("/mutate", data=b"not json")
        assert response.status == 400

    points = _points(reader)
    by_outcome = {p.attributes["outcome"]: p.value for p in points[ADMISSIONS_METRIC]}
    assert by_outcome == {"injected": 1, "skipped": 1, "denied": 1, "ignored": 1, "invalid": 1}
    durations = {p.attributes["outcome"]: p for p in points[DURATION_METRIC]}
    assert sum(p.count for p in durations.values()) == 5
    assert all(p.sum > 0 for p in durations.values())
    assert list(durations["injected"].explicit_bounds)[:2] == [0.0005, 0.001]

    finished = {s.attributes.get("outrider.admission.uid", "none"): s for s in spans.get_finished_spans()}
    assert set(finished) == {"u-injected", "u-skipped", "u-denied", "u-ignored", "none"}
    injected = finished["u-injected"]
    assert injected.name == "admission CREATE Pod"
    assert injected.kind is SpanKind.SERVER
    assert dict(injected.attributes or {}) == {
        "outrider.admission.outcome": "injected",
        "outrider.admission.uid": "u-injected",
        "outrider.admission.operation": "CREATE",
        "k8s.namespace.name": "tools",
    }
    assert injected.end_time is not None and injected.start_time is not None
    assert injected.end_time >= injected.start_time
    assert finished["u-denied"].attributes["outrider.admission.outcome"] == "denied"
    assert finished["u-ignored"].name == "admission CREATE ConfigMap"
    invalid = finished["none"]
    assert invalid.name == "admission" and invalid.status.status_code is StatusCode.ERROR
    assert invalid.attributes["error.type"] == "invalid"
    # never the object itself: nothing from the pod spec lands in a span
    everything = json.dumps([dict(s.attributes or {}) for s in spans.get_finished_spans()])
    assert SECRET_ENV not in everything and "ghcr.io" not in everything


def test_nothing_is_set_up_without_otel_variables() -> None:
    # outrider.sidecar.telemetry.config is the sidecar's (pure) config parser, which the webhook uses to check
    # its `sidecar:` block; the sidecar's telemetry runtime and the OTel SDK stay unloaded.
    code = (
        "import sys\n"
        "from outrider.webhook.server_cli import telemetry\n"
        "with telemetry({'PATH': '/bin'}) as t:\n"
        "    assert t is None, t\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
        "'opentelemetry.exporter', 'outrider.sidecar.telemetry'))\n"
        "    and m not in ('outrider.sidecar.telemetry', 'outrider.sidecar.telemetry.config'))\n"
        "print(loaded)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_otel_variables_without_an_endpoint_export_nothing() -> None:
    with telemetry({"OTEL_SERVICE_NAME": "x"}) as providers:
        assert providers is None
    with telemetry(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"}
    ) as p:
        assert p is not None and p.plan.traces is None and p.plan.metrics == "http/protobuf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_outrider_webhook_exports_over_real_otlp_http(cert_dir: Path) -> None:
    async with otlp_http_receiver() as (endpoint, received):
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env |= {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "outrider.webhook.cli",
            "webhook",
            "--tls-cert",
            str(cert_dir / "tls.crt"),
            "--tls-key",
            str(cert_dir / "tls.key"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            context = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
            url = f"https://localhost:{port}"
            async with aiohttp.ClientSession() as session:
                for _ in range(300):
                    try:
                        async with session.get(f"{url}/readyz", ssl=context) as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        assert proc.returncode is None
                    await asyncio.sleep(0.1)
                async with session.post(f"{url}/mutate", json=review(_pod(), uid="u-otlp"), ssl=context) as r:
                    assert r.status == 200
                    assert (await r.json())["response"]["allowed"] is True
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, output.decode()
        assert b"exported over OTLP http/protobuf" in output
    span = received.spans()["admission CREATE Pod"]
    assert attributes_of(span)["outrider.admission.uid"] == "u-otlp"
    assert attributes_of(span)["outrider.admission.outcome"] == "injected"
    assert received.resource()["service.name"] == "outrider-webhook"
    assert {ADMISSIONS_METRIC, DURATION_METRIC} <= received.metric_names()
    assert all(SECRET_ENV.encode() not in raw for raw in received.raw)
