"""The webhook's TLS: one server `ssl.SSLContext` whose certificate can be swapped while it serves.

A new certificate is checked in a scratch context first, then loaded into the live context, so new
handshakes get it and established connections keep theirs; a bad file never replaces a good one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import tempfile
from pathlib import Path

log = logging.getLogger("outrider.webhook.tls")


class CertError(ValueError):
    """A certificate or key cannot be used; the message says which file and why (never the key)."""


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class CertStore:
    """Owns the server's SSLContext; `load_files` / `load_pem` swap the certificate for new handshakes."""

    def __init__(self) -> None:
        self.context = _server_context()
        self.loaded = False
        self.fingerprint: str | None = None  # sha256 of the served certificate PEM, for logs and tests
        self._files: tuple[Path, Path] | None = None
        self._file_digest: str | None = None

    def load_files(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> None:
        cert_path, key_path = Path(cert_file), Path(key_file)
        try:
            cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        except OSError as exc:
            raise CertError(f"cannot read {exc.filename}: {exc.strerror}") from None
        self._files = (cert_path, key_path)
        self.load_pem(cert_pem, key_pem)
        self._file_digest = _digest(cert_pem, key_pem)

    def load_pem(self, cert_pem: bytes, key_pem: bytes) -> None:
        # ssl only loads chains from files: a private temp dir (0700) holds them for a moment.
        with tempfile.TemporaryDirectory(prefix="outrider-tls-") as tmp:
            cert_path, key_path = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert_path.write_bytes(cert_pem)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key_pem)
            try:
                _server_context().load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                raise CertError(f"certificate and key do not form a usable pair ({exc.reason})") from None
            self.context.load_cert_chain(cert_path, key_path)
        self.loaded = True
        self.fingerprint = hashlib.sha256(cert_pem).hexdigest()
        log.info("serving certificate loaded (sha256 %s)", self.fingerprint[:16])

    def reload_if_changed(self) -> bool:
        """Reload the files given to `load_files` when their content changed; True when reloaded."""
        if self._files is None:
            return False
        cert_path, key_path = self._files
        try:
            cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        except OSError as exc:
            log.warning("cannot read %s (%s); keeping the current certificate", exc.filename, exc.strerror)
            return False
        digest = _digest(cert_pem, key_pem)
        if digest == self._file_digest:
            return False
        try:
            self.load_pem(cert_pem, key_pem)
        except CertError as exc:
            # cert-manager and kubelet write the two files one after the other: retry next tick.
            log.warning("new certificate files are not usable yet (%s); keeping the current one", exc)
            return False
        self._file_digest = digest
        return True

    async def watch(self, interval: float = 2.0) -> None:
        """Poll the files (Secret volume updates are symlink swaps, which inotify handles badly)."""
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()


def _digest(cert_pem: bytes, key_pem: bytes) -> str:
    return hashlib.sha256(cert_pem + b"\0" + key_pem).hexdigest()
