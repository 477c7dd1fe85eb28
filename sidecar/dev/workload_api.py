"""DEV STAND-IN, NOT FOR PRODUCTION: a SPIFFE Workload API server with an in-memory CA.

Speaks the real Workload API (gRPC, py-spiffe's stubs) on a unix socket; use real SPIRE in clusters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf import struct_pb2
from spiffe._proto import workload_pb2, workload_pb2_grpc

log = logging.getLogger("outrider.dev.workload_api")

_PEERCRED = struct.Struct("3i")  # struct ucred {pid, uid, gid}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class _Root:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@dataclass
class DevCA:
    """An in-memory SPIFFE trust domain: X.509 roots (old ones kept after a rotation) and a JWT key."""

    trust_domain: str = "example.org"
    jwt_alg: str = "ES256"
    roots: list[_Root] = field(default_factory=list)
    jwt_key: Any = None
    jwt_kid: str = ""

    def __post_init__(self) -> None:
        if self.jwt_alg not in ("ES256", "RS256"):
            raise ValueError(f"jwt_alg must be ES256 or RS256, not {self.jwt_alg!r}")
        if not self.roots:
            self.rotate_x509_root()
        if self.jwt_key is None:
            self.rotate_jwt_key()

    def rotate_x509_root(self) -> None:
        """Add a new root and sign with it from now on; older roots stay in the bundle."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "outrider dev CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        self.roots.append(_Root(key, cert))

    def rotate_jwt_key(self) -> None:
        if self.jwt_alg == "ES256":
            self.jwt_key = ec.generate_private_key(ec.SECP256R1())
        else:
            self.jwt_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwt_kid = uuid.uuid4().hex

    @property
    def bundle_der(self) -> bytes:
        return b"".join(root.cert.public_bytes(Encoding.DER) for root in self.roots)

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(root.cert.public_bytes(Encoding.PEM) for root in self.roots)

    def jwks(self) -> dict[str, Any]:
        """The trust domain's JWT bundle as SPIFFE JWKS (`use: jwt-svid`)."""
        algorithm = jwt.algorithms.ECAlgorithm if self.jwt_alg == "ES256" else jwt.algorithms.RSAAlgorithm
        key: dict[str, Any] = dict(algorithm.to_jwk(self.jwt_key.public_key(), as_dict=True))
        key.update({"kid": self.jwt_kid, "use": "jwt-svid", "alg": self.jwt_alg})
        return {"keys": [key], "spiffe_refresh_hint": 60}

    def issue_x509(self, spiffe_id: str, ttl_s: float) -> tuple[bytes, bytes, dt.datetime]:
        """(leaf DER, PKCS#8 key DER, notAfter) for `spiffe_id`, signed by the newest root."""
        root = self.roots[-1]
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = _now() + dt.timedelta(seconds=ttl_s)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "SPIRE")]))
            .issuer_name(root.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(seconds=30))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, True, False, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False
            )
            .sign(root.key, hashes.SHA256())
        )
        key_der = key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
        return cert.public_bytes(Encoding.DER), key_der, not_after

    def issue_jwt(self, spiffe_id: str, audience: list[str], ttl_s: float) -> str:
        now = int(time.time())
        claims = {"sub": spiffe_id, "aud": audience, "iat": now, "exp": now + int(ttl_s)}
        return jwt.encode(
            claims, self.jwt_key, algorithm=self.jwt_alg, headers={"kid": self.jwt_kid, "typ": "JWT"}
        )

    def validate_jwt(self, token: str, audience: str) -> dict[str, Any]:
        """Verify a JWT-SVID of this trust domain; raises jwt.InvalidTokenError."""
        header = jwt.get_unverified_header(token)
        if header.get("kid") != self.jwt_kid:
            raise jwt.InvalidTokenError(f"unknown kid {header.get('kid')!r}")
        claims: dict[str, Any] = jwt.decode(
            token,
            self.jwt_key.public_key(),
            algorithms=[self.jwt_alg],
            audience=audience,
            options={"require": ["sub", "aud", "exp"]},
        )
        if not str(claims["sub"]).startswith(f"spiffe://{self.trust_domain}/"):
            raise jwt.InvalidTokenError("sub is not a SPIFFE ID of this trust domain")
        return claims


class _Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self, api: DevWorkloadApi) -> None:
        self._api = api

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("workload.spiffe.io") != "true":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        spiffe_id = self._api.spiffe_id_for_peer(context.peer())
        if spiffe_id is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        assert spiffe_id is not None
        return spiffe_id

    async def FetchX509SVID(self, request: Any, context: Any) -> Any:
        peer = context.peer()
        spiffe_id = await self._caller(context)
        api = self._api
        while True:
            chain, key, not_after = api.ca.issue_x509(spiffe_id, api.svid_ttl_s)
            api.issued_x509 += 1
            yield workload_pb2.X509SVIDResponse(
                svids=[
                    workload_pb2.X509SVID(
                        spiffe_id=spiffe_id, x509_svid=chain, x509_svid_key=key, bundle=api.ca.bundle_der
                    )
                ]
            )
            changed = api.changed
            # rotate at half the certificate's real lifetime (X.509 keeps whole seconds, so it can be
            # up to a second shorter than asked), as SPIRE does, or at once when the registration changes
            lifetime_s = (not_after.replace(microsecond=0) - _now()).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(lifetime_s, 0.2) / 2)
            spiffe_id_now = api.spiffe_id_for_peer(peer)
            if spiffe_id_now is None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            assert spiffe_id_now is not None
            spiffe_id = spiffe_id_now

    async def FetchX509Bundles(self, request: Any, context: Any) -> Any:
        await self._caller(context)
        while True:
            api = self._api
            yield workload_pb2.X509BundlesResponse(bundles={api.ca.trust_domain: api.ca.bundle_der})
            await api.changed.wait()

    async def FetchJWTSVID(self, request: Any, context: Any) -> Any:
        spiffe_id = await self._caller(context)
        if not request.audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id and request.spiffe_id != spiffe_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        self._api.issued_jwt += 1
        token = self._api.ca.issue_jwt(spiffe_id, list(request.audience), self._api.jwt_ttl_s)
        return workload_pb2.JWTSVIDResponse(svids=[workload_pb2.JWTSVID(spiffe_id=spiffe_id, svid=token)])

    async def FetchJWTBundles(self, request: Any, context: Any) -> Any:
        await self._caller(context)
        while True:
            api = self._api
            yield workload_pb2.JWTBundlesResponse(
                bundles={api.ca.trust_domain: json.dumps(api.ca.jwks()).encode()}
            )
            await api.changed.wait()

    async def ValidateJWTSVID(self, request: Any, context: Any) -> Any:
        await self._caller(context)
        if not request.audience or not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience and svid must be specified")
        try:
            claims = self._api.ca.validate_jwt(request.svid, request.audience)
        except jwt.InvalidTokenError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid JWT-SVID: {exc}")
            raise  # unreachable: abort raises
        message = struct_pb2.Struct()
        message.update(claims)
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(claims["sub"]), claims=message)


class DevWorkloadApi:
    """The dev Workload API on `socket_path`, as an async context manager.

    Identity assignment: `spiffe_id` for every caller, or `uid_map` (caller UID from SO_PEERCRED,
    as SPIRE's unix attestor does) for per-UID identities; a caller with neither gets
    PermissionDenied, like a workload without a registration entry.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        trust_domain: str = "example.org",
        spiffe_id: str | None = None,
        uid_map: Mapping[int, str] | None = None,
        svid_ttl_s: float = 3600,
        jwt_ttl_s: float = 300,
        jwt_alg: str = "ES256",
        ca: DevCA | None = None,
    ) -> None:
        self.socket_path = str(socket_path)
        self.ca = ca or DevCA(trust_domain=trust_domain, jwt_alg=jwt_alg)
        self.default_spiffe_id = spiffe_id
        self.uid_map: dict[int, str] = dict(uid_map or {})
        self.svid_ttl_s = svid_ttl_s
        self.jwt_ttl_s = jwt_ttl_s
        self.changed = asyncio.Event()
        self.issued_x509 = 0
        self.issued_jwt = 0
        self._port_uids: dict[int, int] = {}
        self._grpc: grpc.aio.Server | None = None
        self._grpc_port = 0
        self._front: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    # -- what in-process users (tests, the dev IdP) read ---------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    @property
    def bundle_pem(self) -> bytes:
        return self.ca.bundle_pem

    def jwks(self) -> dict[str, Any]:
        return self.ca.jwks()

    @property
    def target(self) -> str:
        return "unix://" + str(Path(self.socket_path).resolve())

    # -- registration changes (like creating/deleting SPIRE entries) -------------------------------

    def set_identity(self, uid: int | None, spiffe_id: str | None) -> None:
        """Give `uid` (or every caller, for None) an identity, or take it away with `spiffe_id=None`."""
        if uid is None:
            self.default_spiffe_id = spiffe_id
        elif spiffe_id is None:
            self.uid_map.pop(uid, None)
        else:
            self.uid_map[uid] = spiffe_id
        self.notify()

    def rotate_ca(self) -> None:
        self.ca.rotate_x509_root()
        self.ca.rotate_jwt_key()
        self.notify()

    def notify(self) -> None:
        """Wake every stream: they send fresh SVIDs/bundles (or PermissionDenied) right away."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    def spiffe_id_for_peer(self, peer: str) -> str | None:
        port = int(peer.rsplit(":", 1)[1]) if peer.startswith("ipv4:") else -1
        uid = self._port_uids.get(port)
        if uid is not None and uid in self.uid_map:
            return self.uid_map[uid]
        return self.default_spiffe_id

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        server = grpc.aio.server()
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]
        # gRPC python cannot see a unix peer's credentials, so a small front relays each unix
        # connection to a loopback port and remembers which source port belongs to which UID.
        self._grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._grpc = server
        path = Path(self.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # noqa: ASYNC240 (dev tool: a stale socket file from a crash)
        self._front = await asyncio.start_unix_server(self._relay, path=str(path))
        path.chmod(0o777)  # noqa: ASYNC240 any UID may ask; the answer depends on who it is
        log.info("dev Workload API (NOT SPIRE) on %s, trust domain %s", self.target, self.trust_domain)

    async def stop(self) -> None:
        if self._front is not None:
            self._front.close()
            self._front = None
        for task in list(self._pipes):
            task.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace=0.2)
            self._grpc = None
        Path(self.socket_path).unlink(missing_ok=True)  # noqa: ASYNC240

    async def __aenter__(self) -> DevWorkloadApi:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._grpc_port)
        except OSError:
            writer.close()
            return
        port = int(up_writer.get_extra_info("sockname")[1])
        self._port_uids[port] = uid
        try:
            pipes = [
                asyncio.create_task(_pipe(reader, up_writer)),
                asyncio.create_task(_pipe(up_reader, writer)),
            ]
            self._pipes.update(pipes)
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for task in pipes:
                task.cancel()
                self._pipes.discard(task)
        finally:
            self._port_uids.pop(port, None)
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


def _parse_uid_map(items: list[str]) -> dict[int, str]:
    result: dict[int, str] = {}
    for item in items:
        uid, sep, spiffe_id = item.partition("=")
        if not sep or not uid.isdigit() or not spiffe_id.startswith("spiffe://"):
            raise SystemExit(f"--uid-map {item!r}: expected UID=spiffe://trust.domain/path")
        result[int(uid)] = spiffe_id
    return result


async def _serve(args: argparse.Namespace) -> None:
    api = DevWorkloadApi(
        args.socket,
        trust_domain=args.trust_domain,
        spiffe_id=args.spiffe_id,
        uid_map=_parse_uid_map(args.uid_map),
        svid_ttl_s=args.svid_ttl,
        jwt_ttl_s=args.jwt_ttl,
        jwt_alg=args.jwt_alg,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with api:
        if args.bundle_out:
            out = Path(args.bundle_out)
            out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (start-up, once)
            (out / "bundle.pem").write_bytes(api.bundle_pem)
            (out / "jwks.json").write_text(json.dumps(api.jwks(), indent=2))
            print(f"trust bundle: {out / 'bundle.pem'}, JWKS: {out / 'jwks.json'}", flush=True)
        print(f"dev Workload API (a stand-in, NOT SPIRE) serving {api.target}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m outrider.sidecar.dev.workload_api",
        description="DEV STAND-IN: a SPIFFE Workload API with an in-memory CA (use SPIRE for anything real)",
    )
    parser.add_argument("--socket", required=True, help="unix socket path to serve on")
    parser.add_argument("--trust-domain", default="example.org")
    parser.add_argument("--spiffe-id", help="SPIFFE ID given to every caller")
    parser.add_argument("--uid-map", action="append", default=[], metavar="UID=SPIFFE_ID")
    parser.add_argument(
        "--svid-ttl", type=float, default=3600, help="X.509-SVID lifetime, s (rotates at half)"
    )
    parser.add_argument("--jwt-ttl", type=float, default=300, help="JWT-SVID lifetime, s")
    parser.add_argument("--jwt-alg", choices=("ES256", "RS256"), default="ES256")
    parser.add_argument("--bundle-out", help="directory to write bundle.pem and jwks.json into")
    args = parser.parse_args(argv)
    if not args.spiffe_id and not args.uid_map:
        parser.error("give --spiffe-id or at least one --uid-map")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
