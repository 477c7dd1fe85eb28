"""`ssl.SSLContext`s built from the current X.509-SVID: an mTLS server that only admits peers
verified against the SPIFFE bundle, an RFC 8705 client, and a server context that follows rotations.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography import x509

from outrider.sidecar.identity import WorkloadIdentity, X509Material
from outrider.sidecar.identity.svid import spiffe_id_of


@contextlib.contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    """A path `load_cert_chain` can read, holding `data` only in memory where Linux allows (memfd)."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("outrider-svid", 0)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="outrider-svid-") as tmp:  # pragma: no cover (non-Linux)
        path = str(Path(tmp) / "svid.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield path


def load_svid(context: ssl.SSLContext, material: X509Material) -> None:
    """Put the SVID's chain and key into `context` (the key never touches a filesystem on Linux)."""
    with _pem_file(material.cert_chain_pem + material.private_key_pem) as path:
        context.load_cert_chain(path)


def bundle_pem(material: X509Material, trust_domains: tuple[str, ...] | None = None) -> bytes:
    names = sorted(material.bundles_pem) if trust_domains is None else trust_domains
    return b"".join(material.bundles_pem[name] for name in names if name in material.bundles_pem)


def server_context(
    material: X509Material, *, require_client_cert: bool = True, trust_domains: tuple[str, ...] | None = None
) -> ssl.SSLContext:
    """A TLS server presenting the SVID; peers must present an SVID chaining to the bundle(s).

    X.509 path validation is what SPIFFE requires of an SVID; authorisation by SPIFFE ID is the
    caller's job (`peer_spiffe_id`), since only the application knows which IDs it accepts.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_svid(context, material)
    bundle = bundle_pem(material, trust_domains)
    if bundle:
        context.load_verify_locations(cadata=bundle.decode())
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(
    material: X509Material,
    *,
    cafile: str | None = None,
    trust: str = "system",
) -> ssl.SSLContext:
    """A TLS client presenting the SVID (RFC 8705 mutual-TLS client authentication).

    `trust="system"` verifies the server like a browser (an IdP with a public or cluster CA,
    plus `cafile`); `trust="spiffe"` verifies it against the SPIFFE bundle instead, without a
    host name check (SVIDs carry SPIFFE IDs, not DNS names): check `peer_spiffe_id` yourself.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_svid(context, material)
    if trust == "spiffe":
        context.check_hostname = False
        context.load_verify_locations(cadata=bundle_pem(material).decode())
    elif trust == "system":
        context.load_default_certs()
        if cafile:
            context.load_verify_locations(cafile=cafile)
    else:
        raise ValueError(f"trust must be 'system' or 'spiffe', not {trust!r}")
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The SPIFFE ID of a verified TLS peer (from `transport.get_extra_info('ssl_object')`)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return spiffe_id_of(x509.load_der_x509_certificate(der))


class _Cached:
    """One context per SVID snapshot: rebuilt only when the identity hands out a new snapshot."""

    def __init__(self, build: Callable[[X509Material], ssl.SSLContext]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._material: X509Material | None = None
        self._context: ssl.SSLContext | None = None

    def get(self, material: X509Material) -> ssl.SSLContext:
        with self._lock:
            if self._context is None or self._material is not material:
                self._context = self._build(material)
                self._material = material
            return self._context


class RotatingServerContext:
    """A server `SSLContext` that always presents the identity's *current* SVID and bundle.

    Hand `.context` to `asyncio.start_server(ssl=...)` or aiohttp once. On every handshake the SNI
    callback (OpenSSL calls it for every ClientHello, with or without SNI) switches the connection
    to a context built from the current snapshot, so rotations need no restart and established
    connections keep their session.
    """

    def __init__(
        self,
        identity: WorkloadIdentity,
        *,
        require_client_cert: bool = True,
        trust_domains: tuple[str, ...] | None = None,
    ) -> None:
        self._identity = identity
        self._cache = _Cached(
            lambda m: server_context(m, require_client_cert=require_client_cert, trust_domains=trust_domains)
        )
        # The outer context only dispatches; its verify mode must match (OpenSSL keeps the
        # connection's verify mode from the context the connection was created with).
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        self.context.sni_callback = self._on_hello
        with contextlib.suppress(Exception):
            # A cert in the outer context too, for clients that skip the callback path.
            load_svid(self.context, identity.x509())

    def current(self) -> ssl.SSLContext:
        """The context for the current SVID (raises IdentityUnavailable when none is held)."""
        return self._cache.get(self._identity.x509())

    def _on_hello(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        try:
            conn.context = self.current()
        except Exception:
            # No usable SVID: fail this handshake rather than present a stale or empty identity.
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None


class RotatingClientContext:
    """`current()` returns a client context for the current SVID, rebuilt once per rotation."""

    def __init__(
        self, identity: WorkloadIdentity, *, cafile: str | None = None, trust: str = "system"
    ) -> None:
        self._identity = identity
        self._cache = _Cached(lambda m: client_context(m, cafile=cafile, trust=trust))

    def current(self) -> ssl.SSLContext:
        return self._cache.get(self._identity.x509())
