"""Every MCP server is its own protected resource: a token for one server is refused by another's.

The resource URIs come from the webhook (its `resource_template`, two pods in two namespaces), and
each is served by a real `outrider sidecar` process in front of a real `mcp` SDK server; the caller
is the real SDK client. Both sidecars trust the same IdP, as two servers of one cluster do.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.webhook import engine
from outrider.webhook.config import parse_config

from .conftest import DOWNSTREAM, free_port, streamable_client
from .test_auth_e2e import post
from .test_e2e import assert_exchanged, tool_json

WEBHOOK_CONFIG = {
    "resource_template": "https://{app}.{namespace}.mcp.example.com/mcp",
    "sidecar": {"inbound": {"issuer": "https://idp.example/realms/mcp"}},
}


def _resource_from_webhook(namespace: str, app: str) -> str:
    pod = {
        "metadata": {"name": app, "namespace": namespace, "labels": {"app.kubernetes.io/name": app}},
        "spec": {"containers": [{"name": "server", "image": "x", "ports": [{"containerPort": 8080}]}]},
    }
    result = engine.inject(pod, {"outrider.dev/inject": "enabled"}, parse_config(WEBHOOK_CONFIG))
    assert result.injected, result.message
    proxy = next(c for c in result.pod["spec"]["initContainers"] if c["name"] == "outrider-proxy")
    config = json.loads(next(e["value"] for e in proxy["env"] if e["name"] == "OUTRIDER_CONFIG"))
    status = json.loads(result.pod["metadata"]["annotations"]["outrider.dev/status"])
    assert status["resource"] == config["inbound"]["resource"]
    return str(config["inbound"]["resource"])


@asynccontextmanager
async def sidecar_process(config: dict[str, Any], tmp_path: Path, name: str) -> AsyncIterator[str]:
    """`outrider sidecar --config FILE` until ready; yields its MCP URL."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "outrider.webhook.cli", "sidecar", "--config", str(path)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        admin = f"http://127.0.0.1:{config['admin']['port']}/readyz"
        async with aiohttp.ClientSession() as session:
            for _ in range(1500):
                if proc.returncode is not None:
                    err = await proc.stderr.read() if proc.stderr else b""
                    raise AssertionError(f"sidecar {name} exited: {err.decode()}")
                try:
                    async with session.get(admin) as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"sidecar {name} never became ready")
        yield f"http://127.0.0.1:{config['inbound']['port']}/mcp"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _config(idp: DevIdP, api: DevWorkloadApi, mcp_port: int, resource: str) -> dict[str, Any]:
    config = idp.sidecar_config(
        workload_socket=api.target,
        port=free_port(),
        mcp_port=mcp_port,
        resource=resource,
        audience=DOWNSTREAM,
    )
    config["admin"] = {"host": "127.0.0.1", "port": free_port()}
    config["egress"] = {"mode": "explicit", "port": free_port(), "policy_file": None}
    config["telemetry"] = {"audit": "off"}
    return config


@pytest.mark.parametrize("mcp_app", ["streamable"], indirect=True)
async def test_a_token_for_one_server_is_refused_by_the_other(
    mcp_app: mcp_server.RunningServer, idp: DevIdP, workload_api: DevWorkloadApi, tmp_path: Path
) -> None:
    weather = _resource_from_webhook("tools", "weather")
    ledger = _resource_from_webhook("billing", "ledger")
    assert weather == "https://weather.tools.mcp.example.com/mcp"
    assert ledger == "https://ledger.billing.mcp.example.com/mcp"
    async with (
        mcp_server.running(0, "streamable") as ledger_app,
        sidecar_process(
            _config(idp, workload_api, mcp_app.port, weather), tmp_path, "weather"
        ) as weather_url,
        sidecar_process(
            _config(idp, workload_api, ledger_app.port, ledger), tmp_path, "ledger"
        ) as ledger_url,
    ):
        for_weather = idp.mint("alice", audience=weather)
        for_ledger = idp.mint("alice", audience=ledger)
        # Each server accepts the token made for it (the real SDK client, through the real sidecar).
        async with streamable_client(weather_url, for_weather) as client:
            assert_exchanged(tool_json(await client.call_tool("whoami", {})), for_weather, idp)
        async with streamable_client(ledger_url, for_ledger) as client:
            assert_exchanged(tool_json(await client.call_tool("whoami", {})), for_ledger, idp)
        # ... and refuses the other server's token, with the MCP 401 pointing at its own metadata.
        for url, token, own in ((ledger_url, for_weather, ledger), (weather_url, for_ledger, weather)):
            with pytest.raises(Exception):  # the SDK's error type is not the point
                async with streamable_client(url, token) as client:
                    await client.call_tool("whoami", {})
            status, headers, _ = await post(url, token)
            assert status == 401
            assert 'error="invalid_token"' in headers["WWW-Authenticate"]
            async with aiohttp.ClientSession() as session:
                metadata_url = url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")
                async with session.get(metadata_url) as response:
                    assert (await response.json())["resource"] == own
