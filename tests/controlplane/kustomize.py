"""A minimal kustomize renderer for `manifests/`: `resources` (files, directories) and JSON 6902 `patches`.

Enough for the layout our manifests use, so the tests need no kustomize binary; anything else is
an error (not silently ignored). `test_manifests.py` compares it with `kubectl kustomize` when present.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

_SUPPORTED = {"apiVersion", "kind", "resources", "patches"}


class KustomizeError(ValueError):
    pass


def render(directory: Path) -> list[dict[str, Any]]:
    kfile = directory / "kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text()) or {}
    unsupported = sorted(set(spec) - _SUPPORTED)
    if unsupported:
        raise KustomizeError(f"{kfile}: fields {unsupported} are not supported by the test renderer")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in spec.get("patches", []):
        target = patch.get("target") or {}
        ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise KustomizeError(f"{kfile}: only JSON 6902 patches (a list of ops) are supported")
        hits = [o for o in objects if _matches(o, target)]
        if not hits:
            raise KustomizeError(f"{kfile}: patch target {target} matches no resource")
        for obj in hits:
            patched = jsonpatch.apply_patch(copy.deepcopy(obj), ops)
            objects[objects.index(obj)] = patched
    return objects


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    meta = obj.get("metadata", {})
    checks = {
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    return all(checks.get(k) == v for k, v in target.items() if k in checks)
