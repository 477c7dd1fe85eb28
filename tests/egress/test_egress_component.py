"""The egress component inside a sidecar runtime: listeners, metrics, readiness and the reload loop."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from outrider.sidecar.config import parse
from outrider.sidecar.egress.component import component
from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry.observer import EgressDecision, NullObserver


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.decisions: list[EgressDecision] = []

    def egress(self, decision: EgressDecision) -> None:
        self.decisions.append(decision)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def status_of(port: int, authority: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return line


async def test_component_serves_reloads_and_reports(tmp_path: Path) -> None:
    upstream = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    policy_file = tmp_path / "policy.yaml"
    port = free_port()
    config = parse(
        {
            "egress": {
                "mode": "explicit",
                "policy": {"allow": [f"127.0.0.0/8:{up_port}"]},
                "policy_file": str(policy_file),
                "reload_interval_s": 0.1,
                "listen": ["127.0.0.1"],
                "port": port,
            }
        }
    )
    recorder = Recorder()
    runtime = Runtime(config=config, observer=recorder)
    async with component(runtime):
        assert (await status_of(port, f"127.0.0.1:{up_port}")).startswith(b"HTTP/1.1 200")
        assert runtime.readiness["egress"]() == (True, "ok")
        policy_file.write_text("allow: ['10.0.0.0/8:*']\n")  # narrows to nothing this pod may reach
        for _ in range(50):
            await asyncio.sleep(0.1)
            if (await status_of(port, f"127.0.0.1:{up_port}")).startswith(b"HTTP/1.1 403"):
                break
        else:
            raise AssertionError("the narrowed policy file was not picked up")
        policy_file.write_text("allow: ['bad..name']\n")
        await asyncio.sleep(0.5)
        ok, detail = runtime.readiness["egress"]()
        assert ok and "bad..name" in detail  # reported, last good kept
        metrics = b"".join(producer() for producer in runtime.metrics).decode()
        assert (
            "outrider_egress_active_tunnels 0" in metrics and "outrider_egress_decisions_total" not in metrics
        )
        assert "outrider_egress_policy_reload_errors_total 1" in metrics
    assert [d.allowed for d in recorder.decisions][:1] == [True]
    upstream.close()


async def test_decisions_become_audit_events_through_the_real_telemetry(tmp_path: Path) -> None:
    import json

    from outrider.sidecar.telemetry import component as telemetry

    audit = tmp_path / "audit.jsonl"
    port = free_port()
    config = parse(
        {
            "pod": {"name": "mcp-0", "namespace": "shop"},
            "telemetry": {"audit": str(audit)},
            "egress": {
                "mode": "explicit",
                "policy": {"allow": ["api.example.com:443"]},
                "policy_file": None,
                "listen": ["127.0.0.1"],
                "port": port,
            },
        }
    )
    runtime = Runtime(config=config)
    async with telemetry.component(runtime), component(runtime):
        assert (await status_of(port, "evil.example.com:443")).startswith(b"HTTP/1.1 403")
        await asyncio.sleep(0.1)
    events = [json.loads(line) for line in audit.read_text().splitlines() if "egress.decision" in line]
    assert len(events) == 1
    event = events[0]
    assert event["egress"]["name"] == "evil.example.com" and event["egress"]["allowed"] is False
    assert event["egress"]["rule"] is None and event["reason"].startswith("default deny")
    assert "shop" in json.dumps(event)  # the pod's namespace is part of the record
