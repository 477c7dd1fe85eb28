"""Keycloak for interop tests: fetched from Maven Central with `mvn`, cached, run in dev mode on loopback.

`ensure_keycloak()` installs `org.keycloak:keycloak-quarkus-dist` into ~/.cache/outrider/keycloak-<ver>/;
`KeycloakServer` runs it (in-memory database) and `KeycloakAdmin` configures a realm over the admin REST API.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = os.environ.get("OUTRIDER_KEYCLOAK_VERSION", "26.4.2")
CACHE = Path(os.environ.get("OUTRIDER_CACHE", Path.home() / ".cache" / "outrider"))
JAVA_CANDIDATES = (
    os.environ.get("OUTRIDER_JAVA_HOME", ""),
    os.environ.get("JAVA_HOME", ""),
    "/usr/lib/jvm/temurin-25-jdk-amd64",
    "/usr/lib/jvm/temurin-21-jdk-amd64",
    "/usr/lib/jvm/java-21-openjdk-amd64",
)
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-dev-only"  # loopback, in-memory database, gone when the test session ends


class Unavailable(Exception):
    """Keycloak cannot run here; the message says exactly why (used as the skip reason)."""


def java_home() -> Path:
    """A JDK with Java 21+ (Keycloak 26 needs it)."""
    tried = []
    for candidate in JAVA_CANDIDATES:
        if not candidate:
            continue
        java = Path(candidate) / "bin" / "java"
        tried.append(str(java))
        if not java.exists():
            continue
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, check=False).stderr
        # `openjdk version "25.0.1" ...` / `"21.0.5"`
        try:
            major = int(out.split('"')[1].split(".")[0])
        except (IndexError, ValueError):
            continue
        if major >= 21:
            return Path(candidate)
    raise Unavailable(f"no Java 21+ found (Keycloak 26 needs it); tried {tried}; set OUTRIDER_JAVA_HOME")


def ensure_keycloak(version: str = VERSION) -> Path:
    """The unpacked distribution (fetched with `mvn dependency:get` on first use, then cached)."""
    home = CACHE / f"keycloak-{version}"
    if (home / "bin" / "kc.sh").exists():
        return home
    if shutil.which("mvn") is None:
        raise Unavailable("Maven (`mvn`) is not installed: cannot fetch keycloak-quarkus-dist")
    artifact = f"org.keycloak:keycloak-quarkus-dist:{version}:zip"
    result = subprocess.run(
        ["mvn", "-q", "-B", "dependency:get", f"-Dartifact={artifact}", "-Dtransitive=false"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    repo = Path(os.environ.get("MAVEN_REPO", Path.home() / ".m2" / "repository"))
    archive = repo / "org/keycloak/keycloak-quarkus-dist" / version / f"keycloak-quarkus-dist-{version}.zip"
    if result.returncode != 0 or not archive.exists():
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise Unavailable(f"`mvn dependency:get -Dartifact={artifact}` failed: {' | '.join(tail)}")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".keycloak-") as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        unpacked = Path(tmp) / f"keycloak-{version}"
        for script in (unpacked / "bin").glob("*.sh"):
            script.chmod(0o755)
        with contextlib.suppress(OSError):  # another session may have won the race
            unpacked.rename(home)
    return home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_json(
    method: str, url: str, *, token: str | None = None, body: Any = None, form: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    """A tiny blocking HTTP client for set-up (loopback only)."""
    headers = {"Accept": "application/json"}
    data: bytes | None = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            raw = response.read()
            status = response.status
            resp_headers = dict(response.headers)
    except urllib.error.HTTPError as exc:
        raw, status, resp_headers = exc.read(), exc.code, dict(exc.headers)
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, parsed, resp_headers


@dataclass
class KeycloakServer:
    """`with KeycloakServer() as kc:` runs `kc.sh start-dev` on a free loopback port."""

    features: str = "client-auth-federated,spiffe"
    startup_timeout: float = 300.0
    home: Path = field(default_factory=ensure_keycloak)
    port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    log_path: Path | None = None
    _process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> KeycloakServer:
        java = java_home()
        env = {
            **os.environ,
            "JAVA_HOME": str(java),
            "KC_BOOTSTRAP_ADMIN_USERNAME": ADMIN_USER,
            "KC_BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
        }
        self.log_path = self.log_path or Path(tempfile.mkstemp(prefix="outrider-keycloak-", suffix=".log")[1])
        args = [
            str(self.home / "bin" / "kc.sh"),
            "start-dev",
            "--http-host=127.0.0.1",
            f"--http-port={self.port}",
            f"--http-management-port={self.management_port}",
            "--db=dev-mem",  # nothing persists in the shared cache; parallel sessions do not collide
            f"--features={self.features}",
        ]
        with self.log_path.open("wb") as log:
            # A session of its own: on exit the whole group (kc.sh and its JVM) is stopped by its id.
            self._process = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise Unavailable(f"Keycloak exited with {self._process.returncode}: {self._log_tail()}")
            with contextlib.suppress(OSError):
                status, _, _ = http_json("GET", f"{self.url}/realms/master/.well-known/openid-configuration")
                if status == 200:
                    return self
            time.sleep(1.0)
        self.__exit__()
        raise Unavailable(f"Keycloak did not start within {self.startup_timeout:.0f}s: {self._log_tail()}")

    def __exit__(self, *exc: object) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if "WARNING:" not in ln]
        return " | ".join(lines[-6:])

    def admin(self) -> KeycloakAdmin:
        status, body, _ = http_json(
            "POST",
            f"{self.url}/realms/master/protocol/openid-connect/token",
            form={
                "grant_type": "password",
                "client_id": "admin-cli",
                "username": ADMIN_USER,
                "password": ADMIN_PASSWORD,
            },
        )
        if status != 200:
            raise Unavailable(f"Keycloak admin login failed with HTTP {status}")
        return KeycloakAdmin(self.url, body["access_token"])


@dataclass
class KeycloakAdmin:
    url: str
    token: str

    def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200, 201, 204)) -> Any:
        status, parsed, _ = http_json(method, f"{self.url}/admin{path}", token=self.token, body=body)
        if status not in ok:
            raise RuntimeError(f"Keycloak admin {method} {path}: HTTP {status} {parsed}")
        return parsed

    def client_uuid(self, realm: str, client_id: str) -> str:
        found = self.call("GET", f"/realms/{realm}/clients?clientId={urllib.parse.quote(client_id)}")
        return str(found[0]["id"])

    def user_id(self, realm: str, username: str) -> str:
        found = self.call("GET", f"/realms/{realm}/users?exact=true&username={urllib.parse.quote(username)}")
        return str(found[0]["id"])


def audience_mapper(name: str, audience: str) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": "openid-connect",
        "protocolMapper": "oidc-audience-mapper",
        "config": {
            "included.client.audience": audience,
            "access.token.claim": "true",
            "id.token.claim": "false",
        },
    }


@dataclass(frozen=True)
class RealmLayout:
    """What `create_outrider_realm` made: names the tests use."""

    realm: str
    issuer: str
    token_endpoint: str
    cli_client: str
    secret_client: str
    secret: str
    spiffe_client: str | None
    downstream: str
    user: str
    user_password: str


def create_outrider_realm(
    kc: KeycloakServer,
    *,
    realm: str = "outrider",
    spiffe_id: str | None = None,
    bundle_endpoint: str | None = None,
) -> RealmLayout:
    """A realm with user alice, a public CLI client whose tokens the sidecar may exchange, a
    confidential sidecar client (secret), optionally a SPIFFE-authenticated sidecar client, and a
    downstream API audience. Standard token exchange (v2) is enabled per client.
    """
    admin = kc.admin()
    admin.call("POST", "/realms", {"realm": realm, "enabled": True, "accessTokenLifespan": 300})
    admin.call(
        "POST",
        f"/realms/{realm}/users",
        {
            "username": "alice",
            "enabled": True,
            "email": "alice@example.com",
            "emailVerified": True,
            "firstName": "Alice",
            "lastName": "Example",
            "credentials": [{"type": "password", "value": "alice-password", "temporary": False}],
        },
    )
    admin.call("POST", f"/realms/{realm}/clients", {"clientId": "downstream-api", "bearerOnly": True})
    sidecar_clients = ["outrider-sidecar"] + (["outrider-sidecar-spiffe"] if spiffe_id else [])
    admin.call(
        "POST",
        f"/realms/{realm}/clients",
        {
            "clientId": "mcp-cli",
            "publicClient": True,
            "directAccessGrantsEnabled": True,
            "standardFlowEnabled": False,
            # Keycloak lets a client exchange only tokens whose `aud` names it.
            "protocolMappers": [audience_mapper(f"aud-{c}", c) for c in sidecar_clients],
        },
    )
    secret = "sidecar-secret-" + os.urandom(6).hex()
    admin.call(
        "POST",
        f"/realms/{realm}/clients",
        {
            "clientId": "outrider-sidecar",
            "publicClient": False,
            "secret": secret,
            "standardFlowEnabled": False,
            "attributes": {"standard.token.exchange.enabled": "true"},
            # The audiences a client may request are those it could get itself.
            "protocolMappers": [audience_mapper("aud-downstream", "downstream-api")],
        },
    )
    if spiffe_id:
        assert bundle_endpoint is not None
        trust_domain = "spiffe://" + spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        # 26.4 reads the trust domain from `issuer` (later releases call it `trustDomain`).
        admin.call(
            "POST",
            f"/realms/{realm}/identity-provider/instances",
            {
                "alias": "spiffe",
                "providerId": "spiffe",
                "enabled": True,
                "config": {
                    "issuer": trust_domain,
                    "trustDomain": trust_domain,
                    "bundleEndpoint": bundle_endpoint,
                },
            },
        )
        admin.call(
            "POST",
            f"/realms/{realm}/clients",
            {
                "clientId": "outrider-sidecar-spiffe",
                "publicClient": False,
                "clientAuthenticatorType": "federated-jwt",
                "standardFlowEnabled": False,
                "attributes": {
                    "standard.token.exchange.enabled": "true",
                    "jwt.credential.issuer": "spiffe",
                    "jwt.credential.sub": spiffe_id,
                },
                "protocolMappers": [audience_mapper("aud-downstream", "downstream-api")],
            },
        )
    issuer = f"{kc.url}/realms/{realm}"
    return RealmLayout(
        realm=realm,
        issuer=issuer,
        token_endpoint=f"{issuer}/protocol/openid-connect/token",
        cli_client="mcp-cli",
        secret_client="outrider-sidecar",
        secret=secret,
        spiffe_client="outrider-sidecar-spiffe" if spiffe_id else None,
        downstream="downstream-api",
        user="alice",
        user_password="alice-password",
    )


if __name__ == "__main__":
    # `python tests/exchange/keycloak.py`: fetch/cache and print the install directory.
    print(ensure_keycloak())
