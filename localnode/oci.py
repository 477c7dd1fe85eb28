"""A one-file OCI image archive (the pause image) written without any image tool.

`containerd`'s `ctr images import` reads the `io.containerd.image.name` annotation for the image name,
so the sandbox image the CRI config names exists locally and is never pulled.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def single_binary_image(
    binary: bytes, path_in_image: str, name: str, user: str = "65535:65535", arch: str = "amd64"
) -> bytes:
    """An OCI archive (tar bytes) of one image whose only file is `binary` at `path_in_image`."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer_tar:
        _add(layer_tar, path_in_image.lstrip("/"), binary, mode=0o755)
    layer = layer_buf.getvalue()
    config: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "config": {"Entrypoint": [path_in_image], "User": user},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config_bytes),
                "size": len(config_bytes),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _digest(layer),
                    "size": len(layer),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tar, "index.json", index)
        for blob in (layer, config_bytes, manifest):
            _add(tar, f"blobs/sha256/{_digest(blob).split(':', 1)[1]}", blob)
    return out.getvalue()


def write_pause_archive(pause_binary: Path, name: str, out: Path) -> Path:
    out.write_bytes(single_binary_image(pause_binary.read_bytes(), "/pause", name))
    return out
