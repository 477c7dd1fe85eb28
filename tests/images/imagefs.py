"""Reading a built image from its docker-archive: its config, its merged file list, a root filesystem
to run it from with runc (the OCI runtime containerd uses), and its SBOMs beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# Python 3.12+ (and patched 3.11) filter what extractall writes; 3.14 defaults to "data", which
# refuses the absolute symlinks every Debian root filesystem has
TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


@dataclass(frozen=True)
class ImageArchive:
    path: Path
    config: dict[str, Any]  # the image configuration's "config" object (Entrypoint, Cmd, Env, User)
    layers: tuple[str, ...]

    @staticmethod
    def open(path: Path) -> ImageArchive:
        with tarfile.open(path) as tar:
            manifest = json.load(_member(tar, "manifest.json"))[0]
            config = json.load(_member(tar, manifest["Config"]))
        return ImageArchive(path, config.get("config") or {}, tuple(manifest["Layers"]))

    def files(self) -> dict[str, tarfile.TarInfo]:
        """Path (no leading /) -> entry, for the image's merged filesystem (whiteouts applied)."""
        merged: dict[str, tarfile.TarInfo] = {}
        with tarfile.open(self.path) as outer:
            for layer in self.layers:
                with tarfile.open(fileobj=_member(outer, layer)) as tar:
                    for info in tar:
                        name = str(PurePosixPath("/", info.name))[1:]
                        base = PurePosixPath(name).name
                        parent = str(PurePosixPath(name).parent)
                        prefix = "" if parent == "." else parent + "/"
                        if base == OPAQUE:
                            for key in [k for k in merged if k.startswith(prefix) and k != parent]:
                                del merged[key]
                        elif base.startswith(WHITEOUT):
                            gone = prefix + base[len(WHITEOUT) :]
                            for key in [k for k in merged if k == gone or k.startswith(gone + "/")]:
                                del merged[key]
                        elif name:
                            merged[name] = info
        return merged

    def extract(self, dest: Path) -> None:
        """The merged root filesystem under dest (numeric owners and modes kept: we are root)."""
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(self.path) as outer:
            for layer in self.layers:
                with tarfile.open(fileobj=_member(outer, layer)) as tar:
                    members = []
                    for info in tar:
                        path = PurePosixPath(info.name)
                        if path.name == OPAQUE:
                            _clear(dest / path.parent)
                        elif path.name.startswith(WHITEOUT):
                            _remove(dest / path.parent / path.name[len(WHITEOUT) :])
                        else:
                            members.append(info)
                    # our own archive, just built: links that point at absolute paths are the image's
                    tar.extractall(dest, members=members, numeric_owner=True, **TRUSTED)  # noqa: S202

    def sbom(self, kind: str) -> dict[str, Any]:
        """The SBOM make images wrote beside the archive: kind "cdx" (CycloneDX) or "spdx"."""
        return dict(json.loads(Path(f"{self.path}.{kind}.json").read_text()))


def _member(tar: tarfile.TarFile, name: str) -> Any:
    handle = tar.extractfile(name)
    assert handle is not None, f"{name} is not a file in the archive"
    return handle


def _clear(directory: Path) -> None:
    if directory.is_dir():
        for child in directory.iterdir():
            _remove(child)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def run_in_image(
    image: ImageArchive,
    rootfs: Path,
    work: Path,
    args: list[str],
    *,
    user: str | None = None,
    entrypoint: list[str] | None = None,
    capabilities: tuple[str, ...] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Runs the image's entrypoint with args under runc, in fresh namespaces (its own network too).

    As containerd would: the image's Env, User (unless user is given) and WorkingDir; the root
    filesystem read-only, as the manifests set it.
    """
    bundle = work / f"bundle-{uuid.uuid4().hex[:8]}"
    bundle.mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    uid, _, gid = (user or image.config.get("User") or "0:0").partition(":")
    process = spec["process"]
    process["terminal"] = False
    process["args"] = [*(image.config.get("Entrypoint") or [] if entrypoint is None else entrypoint), *args]
    process["env"] = list(image.config.get("Env") or [])
    process["cwd"] = image.config.get("WorkingDir") or "/"
    process["user"] = {"uid": int(uid), "gid": int(gid or uid)}
    for kind in ("bounding", "effective", "permitted"):
        process["capabilities"][kind] = sorted({*process["capabilities"].get(kind, []), *capabilities})
    process["capabilities"].pop("ambient", None)
    process["capabilities"].pop("inheritable", None)
    spec["root"] = {"path": str(rootfs), "readonly": True}
    (bundle / "config.json").write_text(json.dumps(spec))
    state = work / "runc-state"
    name = f"outrider-imgtest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        return subprocess.run(
            ["runc", "--root", str(state), "run", "--bundle", str(bundle), name],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    finally:
        subprocess.run(
            ["runc", "--root", str(state), "delete", "--force", name], capture_output=True, check=False
        )
