"""The real egress enforcer (explicit-proxy mode on loopback) reporting to the real telemetry component."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from outrider.sidecar.config import parse
from outrider.sidecar.egress.component import component as egress_component
from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry import component as telemetry_component
from outrider.sidecar.telemetry.observer_otel import OtelObserver

from .harness import validate_event
from .otlp_receiver import attributes_of, free_port, otlp_http_receiver


async def _connect(port: int, authority: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return line


async def test_egress_decisions_become_spans_metrics_and_audit_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    async with otlp_http_receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        config = parse(
            {
                "pod": {"name": "weather-0", "namespace": "mcp"},
                "egress": {
                    "mode": "explicit",
                    "policy": {"allow": [f"127.0.0.0/8:{up_port}"]},
                    "policy_file": None,
                    "listen": ["127.0.0.1"],
                    "port": port,
                },
                "telemetry": {"audit": str(audit)},
            }
        )
        runtime = Runtime(config=config)
        async with telemetry_component.component(runtime), egress_component(runtime):
            assert (await _connect(port, f"127.0.0.1:{up_port}")).startswith(b"HTTP/1.1 200")
            assert (await _connect(port, "blocked.example.com:443")).startswith(b"HTTP/1.1 403")
            observer = runtime.observer
            assert isinstance(observer, OtelObserver)
            observer.worker.drain()  # recording runs on the telemetry thread
            metrics = b"".join(producer() for producer in runtime.metrics).decode()
        # Leaving the telemetry component flushed the exporters.
    upstream.close()

    assert (
        'outrider_egress_decisions_total{mode="explicit",outcome="allowed",protocol="connect"} 1.0' in metrics
    )
    assert (
        'outrider_egress_decisions_total{mode="explicit",outcome="denied",protocol="connect"} 1.0' in metrics
    )
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    for event in events:
        validate_event(event)
    assert [(e["type"], e["outcome"]) for e in events] == [
        ("egress.decision", "allowed"),
        ("egress.decision", "denied"),
    ]
    assert events[1]["egress"]["name"] == "blocked.example.com"
    assert events[1]["workload"]["pod"] == "weather-0"
    spans = received.spans()
    assert attributes_of(spans["egress deny"])["server.address"] == "blocked.example.com"
    assert attributes_of(spans["egress allow"])["server.port"] == up_port
