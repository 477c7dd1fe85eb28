"""The built production images: what is in them, what is not, that their commands run, and their SBOMs.

Builds the images as `make images` does (scripts/build-images.sh; warm caches make that seconds, a
cold machine 15-30 minutes; `make test` builds them before the suite), never loads them into a
containerd (NO_LOAD=1), then reads each docker-archive's layers and runs the image's own entrypoint
under runc, the runtime containerd uses.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.images.imagefs import ImageArchive, run_in_image
from tests.images.imports import closure, installed_with, owner, requirement_lines
from tests.images.plan import PLANS, ROOT, SIDECAR, WEBHOOK, ImagePlan

# The first test's setup builds the images when `make test` has not (a cold machine: 15-30 min of
# debootstrap and buildah; the 600 s default timed out there): a timeout that covers that build.
pytestmark = [pytest.mark.images, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(2400)]

SITE = re.compile(r"^opt/outrider/lib/python3\.\d+/site-packages/")


@pytest.fixture(scope="session")
def archives() -> dict[str, ImageArchive]:
    if os.geteuid() != 0:
        pytest.skip("building the images needs root (debootstrap, buildah's vfs storage); run as root")
    env = {**os.environ, "NO_LOAD": "1"}
    build = subprocess.run(
        [str(ROOT / "scripts/build-images.sh"), "build"],
        env=env,
        capture_output=True,
        text=True,
        errors="replace",  # pip's progress bars, cut anywhere, in the heartbeat lines
        check=False,
    )
    assert build.returncode == 0, f"make images failed:\n{build.stderr[-4000:]}"
    out = subprocess.run(
        [str(ROOT / "scripts/build-images.sh"), "archives"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {k: ImageArchive.open(Path(v)) for k, v in (line.split("=", 1) for line in out.split())}


@pytest.fixture(scope="session")
def rootfs(archives: dict[str, ImageArchive], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The images' root filesystems extracted once per session: <dir>/<image name>/."""
    base = tmp_path_factory.mktemp("images")
    for name in ("sidecar", "webhook", "testkit"):
        archives[name].extract(base / name)
    yield base
    subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def _runc() -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (apt-get install runc): the entrypoint runs need it")


def _site_packages(files: dict[str, object]) -> str:
    roots = {m.group(0) for name in files if (m := SITE.match(name))}
    assert len(roots) == 1, f"one virtualenv site-packages expected under /opt/outrider, found {roots}"
    return roots.pop()


def _distributions(archive: ImageArchive) -> dict[str, str]:
    """canonical name -> version of every Python distribution the image's virtualenv holds."""
    files = archive.files()
    site = _site_packages(files)
    found: dict[str, str] = {}
    with tarfile.open(archive.path) as outer:
        for layer in archive.layers:
            with tarfile.open(fileobj=outer.extractfile(layer)) as tar:
                for info in tar:
                    name = info.name.lstrip("./")
                    if name.startswith(site) and name.endswith(".dist-info/METADATA") and name in files:
                        handle = tar.extractfile(info)
                        assert handle is not None
                        meta = HeaderParser().parsestr(handle.read().decode())
                        found[canonicalize_name(meta["Name"])] = meta["Version"]
    return found


def _dpkg_packages(root: Path) -> dict[str, str]:
    """name -> version of every package dpkg says is installed in an extracted image."""
    found: dict[str, str] = {}
    for stanza in (root / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" ")
        )
        if fields.get("Status", "").endswith(" installed"):
            found[fields["Package"]] = fields["Version"]
    return found


# --- what is in each image ---------------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_no_demo_dev_code_or_tools_in_the_image(archives: dict[str, ImageArchive], plan: ImagePlan) -> None:
    files = archives[plan.name].files()
    site = _site_packages(files)
    outrider = [name[len(site) :] for name in files if name.startswith(site + "outrider/")]
    assert outrider, "no outrider package in the image"
    for gone in ("outrider/sidecar/dev/", "outrider/sidecar/demo/"):
        assert not [f for f in outrider if f.startswith(gone)], f"{gone} is in the {plan.name} image"
    dists = _distributions(archives[plan.name])
    assert "outrider" in dists
    assert not (set(dists) & plan.absent), f"in the {plan.name} image: {sorted(set(dists) & plan.absent)}"
    # no pip, no compilers or headers, no man pages or translations
    assert not [f for f in files if re.match(r"(usr/(local/)?bin|opt/outrider/bin)/(pip|gcc|cc|make)\b", f)]
    assert not [
        f for f in files if f.startswith(("usr/include/python", "usr/share/man/", "usr/share/locale/"))
    ]
    assert not [f for f in files if f.startswith("usr/share/python-wheels/")], "python3-venv's wheels"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_everything_the_commands_import_is_in_the_image(
    archives: dict[str, ImageArchive], plan: ImagePlan
) -> None:
    files = archives[plan.name].files()
    site = _site_packages(files)
    own, external = closure(plan.entries)
    for module in own:
        path = site + module.replace(".", "/")
        assert f"{path}.py" in files or f"{path}/__init__.py" in files, (
            f"{module} is not in the {plan.name} image"
        )
    dists = set(_distributions(archives[plan.name]))
    wanted = {d for name in external if (d := owner(name))}
    assert wanted <= dists, f"the {plan.name} image lacks {sorted(wanted - dists)}"
    assert installed_with(requirement_lines(plan.requirements)) <= dists


def test_the_sidecar_image_holds_no_webhook_server(archives: dict[str, ImageArchive]) -> None:
    files = archives["sidecar"].files()
    site = _site_packages(files)
    webhook = sorted(
        f[len(site) :] for f in files if f.startswith(site + "outrider/webhook/") and f.endswith(".py")
    )
    assert webhook == ["outrider/webhook/__init__.py", "outrider/webhook/cli.py"]
    # outrider-init's iptables (nft and legacy) is here, and only here
    assert "usr/sbin/xtables-nft-multi" in files and "usr/sbin/xtables-legacy-multi" in files
    assert "usr/sbin/xtables-nft-multi" not in archives["webhook"].files()


def test_the_sidecar_image_carries_its_bytecode(archives: dict[str, ImageArchive]) -> None:
    """Without it every sidecar compiles what it imports at each start: more CPU, a higher start-up
    peak (docs/capacity.md, "Bytecode in the image")."""
    files = archives["sidecar"].files()
    site = _site_packages(files)
    for module in (
        "outrider/sidecar/main",
        "outrider/sidecar/identity/workload_messages",
        "aiohttp/web",
        "cryptography/x509/base",
        "h2/connection",
    ):
        folder, name = module.rsplit("/", 1)
        assert f"{site}{module}.py" in files, module
        pyc = re.compile(rf"{re.escape(site + folder)}/__pycache__/{name}\.cpython-\d+\.pyc")
        assert any(pyc.fullmatch(f) for f in files), f"no bytecode for {module} in the sidecar image"
    stdlib = re.compile(r"usr/(local/)?lib/python3\.\d+/asyncio/__pycache__/base_events\.cpython-\d+\.pyc")
    assert any(stdlib.fullmatch(f) for f in files), "no bytecode for the standard library in the image"


# --- their commands, run under runc as containerd would ----------------------------------------


def _one_line_refusal(result: subprocess.CompletedProcess[str], command: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"`outrider {command}` is not available in this installation" in lines[0]


def test_sidecar_image_runs_its_commands_and_refuses_the_rest(
    archives: dict[str, ImageArchive], rootfs: Path, tmp_path: Path
) -> None:
    _runc()
    image, fs = archives["sidecar"], rootfs / "sidecar"
    assert image.config.get("User") == "15337:15337" and image.config.get("Entrypoint") == ["outrider"]
    result = run_in_image(image, fs, tmp_path, ["sidecar", "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: outrider sidecar")
    result = run_in_image(image, fs, tmp_path, ["iptables", "--dry-run", "--proxy-uid", "15337"])
    assert result.returncode == 0, result.stderr
    assert "-j REDIRECT --to-ports 15001" in result.stdout and "--uid-owner 15337 -j RETURN" in result.stdout
    for absent in ("demo", "webhook", "check", "inject"):
        _one_line_refusal(run_in_image(image, fs, tmp_path, [absent, "--help"]), absent)


def test_sidecar_image_applies_the_capture_rules_as_outrider_init(
    archives: dict[str, ImageArchive], rootfs: Path, tmp_path: Path
) -> None:
    """As the outrider-init container: root with NET_ADMIN/NET_RAW, in the container's own netns."""
    _runc()
    result = run_in_image(
        archives["sidecar"],
        rootfs / "sidecar",
        tmp_path,
        ["-c", "outrider iptables && iptables-save -t nat && ip6tables-save -t nat"],
        entrypoint=["/bin/sh"],
        user="0:0",
        capabilities=("CAP_NET_ADMIN", "CAP_NET_RAW"),
    )
    assert result.returncode == 0, result.stderr
    assert "-A OUTPUT -p tcp -j OUTRIDER_OUTPUT" in result.stdout
    assert "-A OUTRIDER_REDIRECT -p tcp" in result.stdout and "--to-ports 15001" in result.stdout


_OPENSSL_IN_USE = """
import ssl
from cryptography.hazmat.backends.openssl.backend import backend
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import hashes
key = ec.generate_private_key(ec.SECP256R1())
key.public_key().verify(key.sign(b"m", ec.ECDSA(hashes.SHA256())), b"m", ec.ECDSA(hashes.SHA256()))
print(ssl.OPENSSL_VERSION)
print(backend.openssl_version_text())
"""


def test_the_sidecar_image_runs_cryptography_on_the_openssl_it_was_built_for(
    archives: dict[str, ImageArchive], rootfs: Path, tmp_path: Path
) -> None:
    """The default build compiles cryptography against the base's OpenSSL, the library Python's `ssl`
    already maps: one OpenSSL per sidecar, ~5.5 MB less RSS (docs/capacity.md). `bundled` (the
    PyPI wheel) carries its own."""
    _runc()
    flavour = os.environ.get("CRYPTOGRAPHY_OPENSSL") or "system"  # what build-images.sh built
    result = run_in_image(
        archives["sidecar"], rootfs / "sidecar", tmp_path, ["-c", _OPENSSL_IN_USE], entrypoint=["python"]
    )
    assert result.returncode == 0, result.stderr
    ssl_version, cryptography_version = result.stdout.strip().splitlines()
    assert ssl_version.startswith("OpenSSL "), ssl_version
    if flavour == "system":
        assert cryptography_version == ssl_version
    else:
        assert cryptography_version != ssl_version


def test_webhook_image_runs_its_commands_and_refuses_the_rest(
    archives: dict[str, ImageArchive], rootfs: Path, tmp_path: Path
) -> None:
    _runc()
    image, fs = archives["webhook"], rootfs / "webhook"
    assert image.config.get("User") == "65532:65532" and image.config.get("Cmd") == [
        "webhook",
        "--in-cluster",
    ]
    for command in WEBHOOK.commands:
        result = run_in_image(image, fs, tmp_path, [command, "--help"])
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.startswith(f"usage: outrider {command}")
    for absent in ("sidecar", "demo"):
        _one_line_refusal(run_in_image(image, fs, tmp_path, [absent, "--help"]), absent)


def test_testkit_image_runs_the_dev_idp(
    archives: dict[str, ImageArchive], rootfs: Path, tmp_path: Path
) -> None:
    """The in-cluster tests' dev IdP pod runs from the testkit image, not from the production one."""
    _runc()
    image = archives["testkit"]
    result = run_in_image(
        image,
        rootfs / "testkit",
        tmp_path,
        ["-m", "outrider.sidecar.dev.idp", "--help"],
        entrypoint=["python"],
    )
    assert result.returncode == 0, result.stderr
    assert "--issuer" in result.stdout
    # and what tests/cluster/pod_scripts/otlp_sink.py, run from the same image, imports
    sink = "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2; from aiohttp import web"
    result = run_in_image(image, rootfs / "testkit", tmp_path, ["-c", sink], entrypoint=["python"])
    assert result.returncode == 0, result.stderr


# --- the SBOMs -----------------------------------------------------------------------------------


def _cdx_components(archive: ImageArchive, purl_type: str) -> dict[str, str]:
    components = archive.sbom("cdx").get("components", [])
    prefix = f"pkg:{purl_type}/"
    found: dict[str, str] = {}
    for c in components:
        if str(c.get("purl", "")).startswith(prefix):
            name = canonicalize_name(c["name"]) if purl_type == "pypi" else c["name"]
            found[name] = c.get("version", "")
    return found


@pytest.mark.parametrize("name", ["sidecar", "webhook"])
def test_the_sbom_names_exactly_the_python_and_debian_packages_in_the_image(
    archives: dict[str, ImageArchive], rootfs: Path, name: str
) -> None:
    archive = archives[name]
    sbom = archive.sbom("cdx")
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["name"].endswith(
        "/outrider" if name == "sidecar" else "/outrider-webhook"
    )
    tools = str(sbom["metadata"].get("tools"))
    assert "syft" in tools
    python = _cdx_components(archive, "pypi")
    assert python == _distributions(archive), "the SBOM's Python packages are not the image's"
    debian = {k.split("?")[0]: v for k, v in _cdx_components(archive, "deb").items()}
    assert debian == _dpkg_packages(rootfs / name), "the SBOM's Debian packages are not the image's"
    plan = SIDECAR if name == "sidecar" else WEBHOOK
    assert not (set(python) & plan.absent)
    assert "python3.11" in debian and ("iptables" in debian) == (name == "sidecar")
    # the SPDX document lists the same packages
    spdx = archive.sbom("spdx")
    assert spdx["spdxVersion"].startswith("SPDX-")
    spdx_names = {p["name"] for p in spdx["packages"]}
    assert set(debian) <= spdx_names
    assert set(python) <= {canonicalize_name(n) for n in spdx_names}
