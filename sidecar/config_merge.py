"""How configuration layers combine: one deep merge for every layer of the sidecar's config.

Kept free of other imports so the webhook can build OUTRIDER_CONFIG with exactly the sidecar's rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`, mappings merged key by key; the one merge every config layer uses.

    The webhook builds OUTRIDER_CONFIG with it, so a pod's config means what the sidecar reads.
    """
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
