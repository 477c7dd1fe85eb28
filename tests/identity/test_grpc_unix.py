"""The pure-Python gRPC client of the Workload API (`grpc_unix`): calls, statuses, and a lost connection.

Against the dev Workload API (a real grpcio server on a Unix socket), and against raw sockets that
misbehave the way a killed or broken agent does.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived
from spiffe._proto import workload_pb2

from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.identity import IdentityUnavailable
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.grpc_unix import MAX_MESSAGE_BYTES, RpcError, UnixChannel, status_name
from outrider.sidecar.identity.workload import WorkloadApiIdentity

APP_ID = "spiffe://example.org/ns/apps/sa/mcp"
HEADER = (("workload.spiffe.io", "true"),)
X509 = "/SpiffeWorkloadAPI/FetchX509SVID"
JWT = "/SpiffeWorkloadAPI/FetchJWTSVID"


def test_status_names() -> None:
    assert status_name("0") == "OK"
    assert status_name("14") == "UNAVAILABLE"
    assert status_name("99") == "UNKNOWN"
    assert status_name("x") == "UNKNOWN"
    assert status_name(None) == "UNKNOWN"


async def test_calls_against_the_dev_workload_api(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    async with DevWorkloadApi(sock, spiffe_id=APP_ID):
        channel = UnixChannel(str(sock))
        try:
            raw = await channel.unary_unary(
                JWT, workload_pb2.JWTSVIDRequest(audience=["aud-1"]).SerializeToString(), HEADER, 5
            )
            assert workload_pb2.JWTSVIDResponse.FromString(raw).svids[0].spiffe_id == APP_ID
            # Without the security header the agent refuses: the server's status and message come back.
            with pytest.raises(RpcError) as caught:
                await channel.unary_unary(
                    JWT, workload_pb2.JWTSVIDRequest(audience=["a"]).SerializeToString(), (), 5
                )
            assert caught.value.code_name == "INVALID_ARGUMENT"
            # Concurrent calls share the connection.
            answers = await asyncio.gather(
                *(
                    channel.unary_unary(
                        JWT, workload_pb2.JWTSVIDRequest(audience=[f"a{i}"]).SerializeToString(), HEADER, 5
                    )
                    for i in range(20)
                )
            )
            assert len(answers) == 20
        finally:
            await channel.close()


async def test_a_waiting_stream_fails_when_the_agent_goes_away(tmp_path: Path) -> None:
    """The bug that ruled grpclib out: a stream waiting for its next message must end, not hang."""
    sock = tmp_path / "agent.sock"
    api = DevWorkloadApi(sock, spiffe_id=APP_ID, svid_ttl_s=3600)
    await api.start()
    channel = UnixChannel(str(sock))
    received: list[bytes] = []
    try:

        async def follow() -> None:
            async for message in channel.unary_stream(
                X509, workload_pb2.X509SVIDRequest().SerializeToString(), HEADER
            ):
                received.append(message)

        task = asyncio.create_task(follow())
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
        assert received, "no first X.509-SVID"
        await api.stop()
        with pytest.raises(RpcError) as caught:
            await asyncio.wait_for(task, 10)
        assert caught.value.code_name in {"UNAVAILABLE", "CANCELLED"}
        # The channel connects again once the agent is back.
        api = DevWorkloadApi(sock, spiffe_id=APP_ID, svid_ttl_s=3600, ca=api.ca)
        await api.start()
        raw = await channel.unary_unary(
            JWT, workload_pb2.JWTSVIDRequest(audience=["back"]).SerializeToString(), HEADER, 5
        )
        assert workload_pb2.JWTSVIDResponse.FromString(raw).svids
    finally:
        await channel.close()
        await api.stop()


@asynccontextmanager
async def raw_server(path: Path, behave: str) -> AsyncIterator[None]:
    """An HTTP/2 server on a Unix socket that answers a call by misbehaving (`behave`)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        h2.initiate_connection()
        writer.write(h2.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in h2.receive_data(data):
                    if not isinstance(event, RequestReceived):
                        continue
                    if behave == "vanish":
                        writer.transport.abort()  # the agent killed: no GOAWAY, no trailers
                        return
                    headers = [(":status", "200"), ("content-type", "application/grpc")]
                    h2.send_headers(event.stream_id, headers)
                    if behave == "huge":
                        h2.send_data(event.stream_id, struct.pack(">BI", 0, MAX_MESSAGE_BYTES + 1))
                    elif behave == "compressed":
                        h2.send_data(event.stream_id, struct.pack(">BI", 1, 3) + b"abc")
                    elif behave == "garbage":
                        # a well-framed gRPC message whose protobuf is cut short: field 1 claims 5 bytes
                        body = b"\x0a\x05abc"
                        h2.send_data(event.stream_id, struct.pack(">BI", 0, len(body)) + body)
                        h2.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
                writer.write(h2.data_to_send())
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("behave", "code"),
    [("vanish", "UNAVAILABLE"), ("huge", "RESOURCE_EXHAUSTED"), ("compressed", "INTERNAL")],
)
async def test_a_misbehaving_server_ends_the_call_with_a_status(
    tmp_path: Path, behave: str, code: str
) -> None:
    sock = tmp_path / "raw.sock"
    async with raw_server(sock, behave):
        channel = UnixChannel(str(sock))
        try:
            with pytest.raises(RpcError) as caught:
                async with asyncio.timeout(10):  # a hang is the failure this test is about
                    async for _ in channel.unary_stream(X509, b"", HEADER):
                        pass
            assert caught.value.code_name == code
        finally:
            await channel.close()


async def test_no_socket_is_unavailable_and_a_timeout_is_a_deadline(tmp_path: Path) -> None:
    channel = UnixChannel(str(tmp_path / "missing.sock"))
    with pytest.raises(RpcError) as caught:
        await channel.unary_unary(JWT, b"", HEADER, 1)
    assert caught.value.code_name == "UNAVAILABLE"
    sock = tmp_path / "silent.sock"
    async with raw_server(sock, "silent"):
        channel = UnixChannel(str(sock))
        try:
            with pytest.raises(RpcError) as caught:
                await channel.unary_unary(JWT, b"", HEADER, 0.3)
            assert caught.value.code_name == "DEADLINE_EXCEEDED"
        finally:
            await channel.close()


async def test_an_unreadable_workload_api_answer_is_a_bad_response_not_a_crash(tmp_path: Path) -> None:
    """The agent's bytes are parsed by the sidecar's own codec: a malformed answer makes the
    identity unready with a reason (X.509) or fails the JWT-SVID request with one, never a traceback."""
    sock = tmp_path / "raw.sock"
    async with raw_server(sock, "garbage"):
        identity = WorkloadApiIdentity(
            IdentityConfig(socket=f"unix://{sock}", backoff_min_s=0.1, backoff_max_s=0.2)
        )
        async with identity:
            for _ in range(100):
                if identity.stats().state == "bad_response":
                    break
                await asyncio.sleep(0.05)
            assert not identity.ready
            assert identity.stats().state == "bad_response"
            assert "unusable X.509-SVID" in identity.status and "runs past the end" in identity.status
            with pytest.raises(IdentityUnavailable, match="unreadable JWT-SVID answer for audience 'aud-1'"):
                await identity.jwt_svid("aud-1")
            assert identity.stats().jwt_fetches.get("bad_response") == 1
            with pytest.raises(IdentityUnavailable, match="unreadable JWT bundle answer"):
                await identity.jwt_bundles()
