"""The sidecar identity against a REAL SPIRE server and agent (v1.13.3, join token, unix attestor)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from outrider.sidecar.demo.uid_access import UidAccessError, require_runnable_as
from outrider.sidecar.dev.spire import SpireDev, SpireOptions, find_binaries
from outrider.sidecar.identity import IdentityUnavailable
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.workload import WorkloadApiIdentity

from .support import CallStats, RecordingObserver, keep_calling, mtls_echo, poll_until

pytestmark = [pytest.mark.spire, pytest.mark.slow]

TD = "example.org"
APP_ID = f"spiffe://{TD}/ns/mcp/sa/server"
SVID_TTL_S = 10  # SPIRE accepts it; its agent renews at half life, so a rotation every ~5 s
OTHER_UID = 4242
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def spire() -> AsyncIterator[SpireDev]:
    bin_dir = find_binaries(build=True)
    assert bin_dir is not None, "scripts/build-upstream.sh spire did not produce binaries"
    async with SpireDev(bin_dir=bin_dir, options=SpireOptions(trust_domain=TD, log_level="WARN")) as running:
        yield running


def _config(spire: SpireDev) -> IdentityConfig:
    return IdentityConfig(socket=spire.agent_socket_uri, backoff_min_s=0.2, backoff_max_s=2.0)


async def test_no_entry_is_not_ready_and_recovers_when_the_entry_is_created(spire: SpireDev) -> None:
    observer = RecordingObserver()
    async with WorkloadApiIdentity(_config(spire), observer=observer) as identity:
        await poll_until(lambda: "PermissionDenied" in identity.status, 15)
        assert not identity.ready
        assert identity.status.startswith("no_registration_entry")
        assert "PermissionDenied" in identity.status and "registration entry" in identity.status
        with pytest.raises(IdentityUnavailable):
            await identity.jwt_svid("https://idp.example")
        await asyncio.sleep(1.5)  # several retries later: still not ready, reported only once
        assert not identity.ready
        assert [e for e, _, _ in observer.events].count("unhealthy") == 1

        await spire.create_entry(APP_ID, [f"unix:uid:{os.getuid()}"])
        assert await identity.wait_ready(30), identity.status
        assert identity.status == "ok"
        material = identity.x509()
        assert material.spiffe_id == APP_ID
        assert material.bundles_pem[TD].startswith(b"-----BEGIN CERTIFICATE-----")
        token = await identity.jwt_svid("https://idp.example")
        assert token.count(".") == 2


_CHILD = """
import asyncio, json, sys
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.workload import WorkloadApiIdentity

async def main():
    cfg = IdentityConfig(socket=sys.argv[1], backoff_min_s=0.2, backoff_max_s=1.0)
    async with WorkloadApiIdentity(cfg) as identity:
        last = None
        while True:
            line = json.dumps({"ready": identity.ready, "status": identity.status, "id": identity.spiffe_id})
            if line != last:
                print(line, flush=True)
                last = line
            if identity.ready:
                return
            await asyncio.sleep(0.1)

asyncio.run(main())
"""


async def _next_report(stream: asyncio.StreamReader, within_s: float) -> dict[str, object]:
    line = await asyncio.wait_for(stream.readline(), within_s)
    assert line, "the workload process exited without reporting"
    report: dict[str, object] = json.loads(line)
    return report


async def test_a_uid_without_entry_stays_not_ready_while_another_uid_is_served(spire: SpireDev) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the workload as another UID (setpriv)")
    await spire.create_entry(APP_ID, [f"unix:uid:{os.getuid()}"])
    repo = REPO
    try:
        require_runnable_as([OTHER_UID], sys.executable, [str(repo / "sidecar" / "__init__.py")])
    except UidAccessError as exc:
        pytest.fail(str(exc))
    child = await asyncio.create_subprocess_exec(
        "setpriv",
        f"--reuid={OTHER_UID}",
        f"--regid={OTHER_UID}",
        "--clear-groups",
        sys.executable,
        "-c",
        _CHILD,
        spire.agent_socket_uri,
        cwd=str(repo),
        env={**os.environ, "PYTHONPATH": str(repo), "HOME": "/tmp"},
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        async with WorkloadApiIdentity(_config(spire)) as identity:
            assert await identity.wait_ready(30), identity.status
            report = await _next_report(child.stdout, 30)
            while (
                report["status"]
                == "starting: waiting for the first X.509-SVID from " + spire.agent_socket_uri
            ):
                report = await _next_report(child.stdout, 30)
            assert report["ready"] is False
            assert "PermissionDenied" in str(report["status"])
            assert identity.ready  # root's workload is served meanwhile

            other_id = f"spiffe://{TD}/uid/{OTHER_UID}"
            await spire.create_entry(other_id, [f"unix:uid:{OTHER_UID}"])
            while not report["ready"]:
                report = await _next_report(child.stdout, 30)
            assert report == {"ready": True, "status": "ok", "id": other_id}
            assert await asyncio.wait_for(child.wait(), 10) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_follows_rotations_while_clients_keep_calling(spire: SpireDev) -> None:
    await spire.create_entry(
        APP_ID, [f"unix:uid:{os.getuid()}"], x509_svid_ttl_s=SVID_TTL_S, jwt_svid_ttl_s=SVID_TTL_S
    )
    observer = RecordingObserver()
    async with WorkloadApiIdentity(_config(spire), observer=observer) as identity:
        assert await identity.wait_ready(30), identity.status
        jwt_tokens: set[str] = set()
        jwt_failures: list[str] = []

        async def jwt_caller(stop: asyncio.Event) -> None:
            while not stop.is_set():
                try:
                    jwt_tokens.add(await identity.jwt_svid("https://idp.example"))
                except IdentityUnavailable as exc:
                    jwt_failures.append(str(exc))
                await asyncio.sleep(0.1)

        async with mtls_echo(identity) as port:
            stats, stop = CallStats(), asyncio.Event()
            callers = [
                asyncio.create_task(keep_calling(identity, port, stats, stop)),
                asyncio.create_task(jwt_caller(stop)),
            ]
            current = identity.x509()
            for _ in range(3):  # three rotations after the first SVID
                current = await asyncio.wait_for(identity.next_update(current), 3 * SVID_TTL_S)
                assert identity.ready and current.not_after > time.time()
            stop.set()
            await asyncio.gather(*callers)
    assert stats.failures == []
    assert jwt_failures == []
    assert stats.ok > 20
    assert len(stats.server_serials) >= 3
    assert stats.peer_ids == {APP_ID}
    assert len(jwt_tokens) >= 2  # JWT-SVIDs were refreshed at half life, never served expired
    assert identity.stats().rotations >= 4
    assert sum(1 for e, _, _ in observer.events if e == "rotated") >= 4


async def test_agent_restart_is_survived(spire: SpireDev) -> None:
    await spire.create_entry(APP_ID, [f"unix:uid:{os.getuid()}"], x509_svid_ttl_s=60)
    observer = RecordingObserver()
    async with WorkloadApiIdentity(_config(spire), observer=observer) as identity:
        assert await identity.wait_ready(30), identity.status
        before = identity.x509()
        async with mtls_echo(identity) as port:
            stats, stop = CallStats(), asyncio.Event()
            caller = asyncio.create_task(keep_calling(identity, port, stats, stop))
            await spire.stop_agent()
            await poll_until(lambda: identity.status != "ok", 10)
            assert identity.status.startswith("degraded")  # noticed, still serving the valid SVID
            assert identity.ready
            calls_at_stop = stats.ok
            assert await poll_until(lambda: stats.ok >= calls_at_stop + 3, 30)  # calls go on, agent down
            await spire.start_agent()
            after = await asyncio.wait_for(identity.next_update(before), 30)
            assert identity.status == "ok"
            assert after.spiffe_id == APP_ID
            calls_at_recovery = stats.ok
            assert await poll_until(lambda: stats.ok >= calls_at_recovery + 3, 30)
            stop.set()
            await caller
    assert stats.failures == []
    assert stats.ok > 5
    kinds = [e for e, _, _ in observer.events]
    assert "unhealthy" in kinds and kinds[-1] in ("healthy", "rotated")
