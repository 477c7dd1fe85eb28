"""What a decision does to the wire: JSON-RPC errors for refused requests, filtered list answers.

Pure functions over decoded JSON values; the gate and the proxy apply them to bodies and SSE events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from outrider.sidecar.inbound.jsonrpc import JsonRpcId
from outrider.sidecar.policy.model import LIST_RESULTS

POLICY_DENIED = -32003
RATE_LIMITED = -32029
DENIED_MESSAGE = "denied by policy"


def denied_error(msg_id: JsonRpcId) -> dict[str, Any]:
    """The caller learns it was a policy decision, never which policy or what it says."""
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": POLICY_DENIED, "message": DENIED_MESSAGE}}


def limited_error(msg_id: JsonRpcId, retry_after_s: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": msg_id,
        "error": {
            "code": RATE_LIMITED,
            "message": f"rate limit exceeded; retry after {retry_after_s} s",
            "data": {"retryAfterSeconds": retry_after_s},
        },
    }


Visibility = Callable[[str, Sequence[str]], list[bool]]


def filter_list_result(obj: Any, visible: Visibility) -> tuple[Any, int]:
    """A response whose result lists tools, prompts, resources or resource templates, with the items
    the caller may not use removed; (the object, how many items were removed). Anything else comes
    back unchanged."""
    if not isinstance(obj, dict) or not isinstance(obj.get("result"), dict):
        return obj, 0
    result = obj["result"]
    removed = 0
    for key, (_, _, id_key) in LIST_RESULTS.items():
        items = result.get(key)
        if not isinstance(items, list):
            continue
        names = [_name(item, id_key) for item in items]
        shown = visible(key, names)
        kept = [item for item, ok, name in zip(items, shown, names, strict=True) if ok and name]
        if len(kept) != len(items):
            removed += len(items) - len(kept)
            result = {**result, key: kept}
    if not removed:
        return obj, 0
    return {**obj, "result": result}, removed


def listed_items(objects: Sequence[Any]) -> int:
    """How many items the list results among `objects` (decoded JSON-RPC answers) name together."""
    count = 0
    for obj in objects:
        result = obj.get("result") if isinstance(obj, dict) else None
        if isinstance(result, dict):
            for key in LIST_RESULTS:
                items = result.get(key)
                if isinstance(items, list):
                    count += len(items)
    return count


def _name(item: Any, key: str) -> str:
    value = item.get(key) if isinstance(item, dict) else None
    return value if isinstance(value, str) else ""


def may_hold_list(payload: bytes) -> bool:
    """Cheap pre-check before decoding an answer: only list results are ever rewritten."""
    return any(marker in payload for marker in _LIST_MARKERS)


_LIST_MARKERS = tuple(f'"{key}"'.encode() for key in LIST_RESULTS)
