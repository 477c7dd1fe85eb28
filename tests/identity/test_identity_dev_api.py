"""The sidecar identity against the dev Workload API (real gRPC on a real unix socket, real TLS)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import aiohttp
import grpc
import jwt
import pytest
from spiffe._proto import workload_pb2, workload_pb2_grpc

from outrider.sidecar.config import parse
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.identity import IdentityUnavailable
from outrider.sidecar.identity import component as identity_component
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.workload import WorkloadApiIdentity
from outrider.sidecar.main import serve
from outrider.sidecar.runtime import Runtime

from .support import (
    CallStats,
    RecordingObserver,
    RotatingClientContext,
    call_once,
    keep_calling,
    mtls_echo,
    poll_until,
)

APP_ID = "spiffe://example.org/ns/mcp/sa/server"


def _config(sock: Path, **kw: float) -> IdentityConfig:
    return IdentityConfig(socket=f"unix://{sock}", backoff_min_s=0.05, backoff_max_s=0.3, **kw)  # type: ignore[arg-type]


async def test_missing_socket_is_not_ready_then_recovers(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    observer = RecordingObserver()
    async with WorkloadApiIdentity(_config(sock), observer=observer) as identity:
        await asyncio.sleep(0.3)
        assert not identity.ready
        assert identity.status.startswith("socket_missing") and str(sock) in identity.status
        with pytest.raises(IdentityUnavailable, match="socket_missing"):
            identity.x509()
        async with DevWorkloadApi(sock, spiffe_id=APP_ID):
            assert await identity.wait_ready(10)
            assert identity.status == "ok"
            assert identity.spiffe_id == APP_ID
    kinds = [event for event, _, _ in observer.events]
    assert kinds[0] == "unhealthy"
    assert kinds.index("rotated") < kinds.index("healthy")
    # reported once per state change (socket missing, maybe agent unavailable, agent gone at the
    # end), not once per retry: there were several retries while the socket was missing
    assert kinds.count("unhealthy") <= 3


async def test_no_registration_entry_stays_not_ready_until_one_exists(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    async with (
        DevWorkloadApi(sock, uid_map={os.getuid() + 1: APP_ID}) as api,
        WorkloadApiIdentity(_config(sock)) as identity,
    ):
        await asyncio.sleep(0.5)
        assert not identity.ready
        assert "PermissionDenied" in identity.status and "registration entry" in identity.status
        with pytest.raises(IdentityUnavailable, match="PermissionDenied"):
            await identity.jwt_svid("https://idp.example")
        api.set_identity(os.getuid(), APP_ID)  # "create the entry"
        assert await identity.wait_ready(10)
        assert identity.x509().spiffe_id == APP_ID


async def test_security_header_is_required(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    async with DevWorkloadApi(sock, spiffe_id=APP_ID), grpc.aio.insecure_channel(f"unix://{sock}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_rotations_are_followed_while_mtls_calls_keep_succeeding(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    observer = RecordingObserver()
    # 6 s: rotations every ~3 s leave a loaded CI machine seconds of slack before the 0.5 s margin
    async with DevWorkloadApi(sock, spiffe_id=APP_ID, svid_ttl_s=6) as api:
        async with WorkloadApiIdentity(_config(sock, expiry_margin_s=0.5), observer=observer) as identity:
            assert await identity.wait_ready(10)
            rebuilt: list[float] = []
            identity.add_listener(lambda m: rebuilt.append(m.not_after))
            async with mtls_echo(identity) as port:
                stats, stop = CallStats(), asyncio.Event()
                caller = asyncio.create_task(keep_calling(identity, port, stats, stop))
                first = identity.x509()
                current = first
                for _ in range(3):
                    current = await asyncio.wait_for(identity.next_update(current), 10)
                stop.set()
                await caller
            api.rotate_ca()  # new root: the server context must now trust the new issuer too
            current = await asyncio.wait_for(identity.next_update(current), 10)
            async with mtls_echo(identity) as port:
                after = CallStats()
                stop = asyncio.Event()
                stop.set()
                await call_once(identity, port, after, RotatingClientContext(identity, trust="spiffe"))
        assert after.failures == [] and after.ok == 1
    assert stats.failures == []
    assert stats.ok > 10
    assert len(stats.server_serials) >= 3  # the server presented rotated SVIDs without a restart
    assert stats.peer_ids == {APP_ID}
    assert len(rebuilt) >= 3
    assert sum(1 for e, _, _ in observer.events if e == "rotated") >= 4
    assert current.bundles_pem["example.org"].count(b"BEGIN CERTIFICATE") == 2


async def test_jwt_svid_cached_until_half_life_and_single_flight(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    skew = 0.0

    def clock() -> float:
        return time.time() + skew

    async with (
        DevWorkloadApi(sock, spiffe_id=APP_ID, jwt_ttl_s=100) as api,
        WorkloadApiIdentity(_config(sock), clock=clock) as identity,
    ):
        tokens = await asyncio.gather(*(identity.jwt_svid("https://idp.example") for _ in range(20)))
        assert len(set(tokens)) == 1 and api.issued_jwt == 1
        claims = api.ca.validate_jwt(tokens[0], "https://idp.example")
        assert claims["sub"] == APP_ID
        assert await identity.jwt_svid("https://idp.example") == tokens[0]
        assert api.issued_jwt == 1
        await identity.jwt_svid("https://other.example")
        assert api.issued_jwt == 2
        skew = 55  # past half of the 100 s lifetime: fetch a fresh one
        fresh = await identity.jwt_svid("https://idp.example")
        assert fresh != tokens[0] and api.issued_jwt == 3
        stats = identity.stats()
        assert stats.jwt_fetches["fetched"] == 3 and stats.jwt_fetches["cache_hit"] >= 1


async def test_jwt_bundle_and_validation_agree_with_the_dev_ca(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    async with DevWorkloadApi(sock, spiffe_id=APP_ID, jwt_alg="RS256") as api:
        async with WorkloadApiIdentity(_config(sock)) as identity:
            token = await identity.jwt_svid("aud-1")
            bundles = await identity.jwt_bundles()
            jwks = json.loads(bundles["example.org"])
            assert jwks == api.jwks()
            key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
            claims = jwt.decode(token, key.key, algorithms=["RS256"], audience="aud-1")
            assert claims["sub"] == APP_ID
        async with grpc.aio.insecure_channel(api.target) as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            meta = (("workload.spiffe.io", "true"),)
            ok = await stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="aud-1", svid=token), metadata=meta
            )
            assert ok.spiffe_id == APP_ID
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience="aud-2", svid=token), metadata=meta
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_agent_restart_is_survived_without_failed_calls(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    api = DevWorkloadApi(sock, spiffe_id=APP_ID, svid_ttl_s=60)
    await api.start()
    try:
        async with WorkloadApiIdentity(_config(sock)) as identity:
            assert await identity.wait_ready(10)
            before = identity.x509()
            async with mtls_echo(identity) as port:
                stats, stop = CallStats(), asyncio.Event()
                caller = asyncio.create_task(keep_calling(identity, port, stats, stop))
                await api.stop()
                assert await poll_until(lambda: identity.status != "ok", 10)
                calls_at_stop = stats.ok
                assert await poll_until(lambda: stats.ok >= calls_at_stop + 3, 30)
                # the agent is away: the held SVID keeps serving, within the grace period still ready
                assert identity.ready and identity.status.startswith("degraded")
                assert identity.x509() is before
                api = DevWorkloadApi(sock, spiffe_id=APP_ID, svid_ttl_s=60, ca=api.ca)
                await api.start()
                after = await asyncio.wait_for(identity.next_update(before), 10)
                assert identity.status == "ok" and after is not before
                calls_at_recovery = stats.ok
                assert await poll_until(lambda: stats.ok >= calls_at_recovery + 3, 30)
                stop.set()
                await caller
            assert stats.failures == [] and stats.ok > 5
    finally:
        await api.stop()


async def test_component_publishes_identity_readiness_and_metrics(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    runtime = Runtime(
        config=parse({"identity": {"socket": f"unix://{sock}", "backoff_min_s": 0.05, "backoff_max_s": 0.2}})
    )
    async with DevWorkloadApi(sock, spiffe_id=APP_ID), identity_component.component(runtime):
        assert runtime.identity is not None
        identity = runtime.identity
        assert isinstance(identity, WorkloadApiIdentity)
        assert await identity.wait_ready(10)
        assert runtime.readiness["identity"]() == (True, "ok")
        text = b"".join(produce() for produce in runtime.metrics).decode()
        assert "outrider_identity_ready 1.0" in text
        assert 'outrider_identity_state{state="ok"} 1.0' in text
        assert "outrider_identity_svid_rotations_total 1.0" in text
        expiry = next(
            line for line in text.splitlines() if line.startswith("outrider_identity_svid_expiry_seconds ")
        )
        assert 3000 < float(expiry.split()[1]) <= 3600
    assert "identity" not in runtime.readiness and runtime.identity is None


async def test_cached_jwt_svid_is_served_while_the_agent_is_away(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    skew = 0.0

    def clock() -> float:
        return time.time() + skew

    api = DevWorkloadApi(sock, spiffe_id=APP_ID, jwt_ttl_s=100)
    await api.start()
    async with WorkloadApiIdentity(_config(sock), clock=clock) as identity:
        token = await identity.jwt_svid("aud")
        await api.stop()
        skew = 60  # due for a refresh, but still valid: keep serving it
        assert await identity.jwt_svid("aud") == token
        skew = 99  # within the expiry margin: no longer usable
        with pytest.raises(IdentityUnavailable, match="no JWT-SVID for audience 'aud'"):
            await identity.jwt_svid("aud")


async def test_a_changed_registration_drops_cached_jwt_svids(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    async with (
        DevWorkloadApi(sock, spiffe_id=APP_ID) as api,
        WorkloadApiIdentity(_config(sock)) as identity,
    ):
        assert await identity.wait_ready(10)
        old = await identity.jwt_svid("aud")
        before = identity.x509()
        api.set_identity(None, "spiffe://example.org/ns/mcp/sa/renamed")
        await asyncio.wait_for(identity.next_update(before), 10)
        assert identity.spiffe_id == "spiffe://example.org/ns/mcp/sa/renamed"
        new = await identity.jwt_svid("aud")
        assert new != old and api.ca.validate_jwt(new, "aud")["sub"] == identity.spiffe_id


def _py_spiffe_roundtrip(target: str) -> tuple[str, str, str]:
    from spiffe import WorkloadApiClient

    client = WorkloadApiClient(target)
    try:
        svid = client.fetch_x509_svid()
        jwt_svid = client.fetch_jwt_svid(audience={"aud-x"})
        validated = client.validate_jwt_svid(jwt_svid.token, "aud-x")
        bundles = client.fetch_jwt_bundles()
        assert len(bundles.bundles) == 1
        return str(svid.spiffe_id), str(jwt_svid.spiffe_id), str(validated.spiffe_id)
    finally:
        client.close()


async def test_dev_workload_api_speaks_the_protocol_py_spiffe_expects(sock_dir: Path) -> None:
    """The dev stand-in must satisfy the reference Python client too, not only ours."""
    async with DevWorkloadApi(sock_dir / "agent.sock", spiffe_id=APP_ID) as api:
        ids = await asyncio.to_thread(_py_spiffe_roundtrip, api.target)
    assert ids == (APP_ID, APP_ID, APP_ID)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_sidecar_readyz_follows_the_identity(sock_dir: Path) -> None:
    """The whole `outrider sidecar` process: /readyz on the admin port is 503 until the first SVID."""
    sock = sock_dir / "agent.sock"
    admin = _free_port()
    config = parse(
        {
            "identity": {"socket": f"unix://{sock}", "backoff_min_s": 0.05, "backoff_max_s": 0.3},
            "admin": {"host": "127.0.0.1", "port": admin},
            "inbound": {"port": _free_port(), "mcp_port": _free_port()},
        }
    )
    stop = asyncio.Event()
    sidecar = asyncio.create_task(serve(config, stop))
    url = f"http://127.0.0.1:{admin}"

    async def readyz(session: aiohttp.ClientSession) -> tuple[int, str]:
        try:
            async with session.get(f"{url}/readyz") as response:
                return response.status, await response.text()
        except aiohttp.ClientConnectionError:
            return 0, ""

    try:
        async with aiohttp.ClientSession() as session:
            # The admin port can answer before the first attempt on the socket has failed ("starting"):
            # wait for that failure to be reported, and never see ready while there is no SVID.
            seen: list[tuple[int, str]] = []
            for _ in range(200):
                status, text = await readyz(session)
                if status:
                    seen.append((status, text))
                    if "socket_missing" in text:
                        break
                await asyncio.sleep(0.05)
            assert seen, "the admin port never answered"
            assert all(code == 503 for code, _ in seen), seen
            assert "identity" in text and "socket_missing" in text, text
            async with DevWorkloadApi(sock, spiffe_id=APP_ID):
                for _ in range(200):
                    status, text = await readyz(session)
                    if "identity: ok" in text:
                        break
                    await asyncio.sleep(0.05)
                assert "identity: ok" in text
                async with session.get(f"{url}/metrics") as response:
                    assert "outrider_identity_ready 1.0" in await response.text()
    finally:
        stop.set()
        await asyncio.wait_for(sidecar, 30)


async def test_an_unusable_svid_is_reported_and_retried_never_fatal(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    async with DevWorkloadApi(sock, spiffe_id=APP_ID) as api:
        genuine = api.ca.issue_x509

        def wrong_leaf(spiffe_id: str, ttl_s: float) -> tuple[bytes, bytes, object]:
            return genuine("spiffe://example.org/someone-else", ttl_s)

        api.ca.issue_x509 = wrong_leaf  # type: ignore[assignment,method-assign]
        async with WorkloadApiIdentity(_config(sock)) as identity:
            assert await poll_until(lambda: identity.status.startswith("bad_response"), 10)
            assert not identity.ready and "does not carry the SPIFFE ID" in identity.status
            api.ca.issue_x509 = genuine  # type: ignore[method-assign]
            assert await identity.wait_ready(10)
            assert identity.spiffe_id == APP_ID


async def test_an_expired_svid_is_never_served(sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    api = DevWorkloadApi(sock, spiffe_id=APP_ID, svid_ttl_s=3)
    await api.start()
    async with WorkloadApiIdentity(_config(sock, expiry_margin_s=0.5)) as identity:
        assert await identity.wait_ready(10)
        async with mtls_echo(identity) as port:
            await api.stop()  # the agent is gone for longer than the SVID lives
            assert await poll_until(lambda: not identity.ready, 10)
            assert "expired" in identity.status
            with pytest.raises(IdentityUnavailable):
                identity.x509()
            stats = CallStats()
            await call_once(identity, port, stats, RotatingClientContext(identity, trust="spiffe"))
            assert stats.ok == 0 and stats.failures
