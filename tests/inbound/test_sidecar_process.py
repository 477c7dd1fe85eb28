"""The whole `outrider sidecar` process (every component, in order) serving a real MCP client.

Proves the inbound proxy, identity, exchange, admin and the real telemetry observer work together:
the audit log names the user and the tool, and holds no token.
"""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

import aiohttp
import pytest

from outrider.sidecar.config import parse
from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.main import YOUNG_GC_THRESHOLD, serve

from .conftest import RESOURCE, free_port, sidecar_config, streamable_client
from .test_e2e import assert_exchanged, tool_json


async def test_full_sidecar_process(
    mcp_app: mcp_server.RunningServer,
    idp: DevIdP,
    workload_api: DevWorkloadApi,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")  # spans off; the audit log still runs
    audit = tmp_path / "audit.jsonl"
    raw = sidecar_config(idp, workload_api, mcp_app.port)
    admin_port = free_port()
    raw["admin"] = {"host": "127.0.0.1", "port": admin_port}
    raw["egress"] = {"mode": "explicit", "port": free_port(), "policy_file": None}
    raw["telemetry"] = {"audit": str(audit)}
    config = parse(raw)
    stop = asyncio.Event()
    gc.unfreeze()
    threshold = gc.get_threshold()
    gc.set_threshold(700, *threshold[1:])  # the interpreter's default (an earlier serve() raised it)
    task = asyncio.create_task(serve(config, stop))
    token = idp.mint("alice", audience=RESOURCE)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(500):
                try:
                    async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert not task.done(), task
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the sidecar never became ready")
            # Start-up's heap is out of the full collections' scans once the sidecar is ready.
            assert gc.get_freeze_count() > 0
            # ... and its young generation is collected less often than the interpreter's default.
            assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD > 700
            async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
                metrics = await response.text()
        assert "outrider_inbound_requests_total" in metrics
        url = f"http://127.0.0.1:{config.inbound.port}/mcp"
        async with streamable_client(url, token) as client:
            who = tool_json(await client.call_tool("whoami", {}))
        assert_exchanged(who, token, idp)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        gc.unfreeze()  # the rest of the test session collects as before
        gc.set_threshold(*threshold)
    text = audit.read_text()
    assert token not in text and who["authorization"].removeprefix("Bearer ") not in text
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    calls = [e for e in events if "whoami" in json.dumps(e)]
    assert calls, events
    assert "alice" in json.dumps(calls[-1])
