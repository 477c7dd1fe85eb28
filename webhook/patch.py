"""RFC 6902 JSON Patch construction: explicit operations from an original object to its mutation.

Lists are created once with `add` and extended with `/-` or index inserts (never two adds on one
missing list path), `null` fields are replaced, and keys are escaped per RFC 6901.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

JsonPatch = list[dict[str, Any]]
_SCALARS = frozenset({str, int, float, bool, type(None)})
_MISSING: Any = object()  # a key's absence (None is a value a key can hold)


def escape(key: str) -> str:
    """RFC 6901: '~' becomes '~0' and '/' becomes '~1' (order matters)."""
    if "~" not in key and "/" not in key:
        return key
    return key.replace("~", "~0").replace("/", "~1")


def pointer(*parts: str | int) -> str:
    return "".join("/" + escape(str(p)) for p in parts)


def diff(original: Any, modified: Any) -> JsonPatch:
    """Operations that turn `original` into `modified` when applied in order."""
    ops: JsonPatch = []
    _diff(original, modified, "", ops)
    return ops


def diff_into(original: Any, modified: Any, path: str, ops: JsonPatch) -> None:
    """`diff` of one subtree at `path` (an RFC 6901 pointer), appended to `ops`."""
    _diff(original, modified, path, ops)


def _diff(old: Any, new: Any, path: str, ops: JsonPatch) -> None:
    if old is new:  # the engine shares untouched subtrees: skip them without walking
        return
    old_type, new_type = type(old), type(new)
    # Plain dict/list first: ABC isinstance checks dominate the cost on big pods.
    # No deep `old != new` first: the engine shares what it did not touch, so walking the changed
    # containers finds the few new values faster than comparing the whole spec up front.
    if old_type is dict and new_type is dict:
        _diff_map(old, new, path, ops)
        return
    if old_type is list and new_type is list:
        _diff_list(old, new, path, ops)
        return
    if old_type in _SCALARS or new_type in _SCALARS:
        # JSON scalars (what a pod's leaves are): no ABC isinstance checks on this common path.
        if old_type is not new_type or old != new:
            ops.append({"op": "replace", "path": path, "value": new})
        return
    if old == new and old_type is new_type:
        return
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        _diff_map(old, new, path, ops)
    elif _is_list(old) and _is_list(new):
        _diff_list(old, new, path, ops)
    else:
        ops.append({"op": "replace", "path": path, "value": new})


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _diff_map(old: Mapping[str, Any], new: Mapping[str, Any], path: str, ops: JsonPatch) -> None:
    # The engine only adds and replaces keys: one C-level subset test instead of a loop per key.
    if not old.keys() <= new.keys():
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{escape(key)}"})
    missing = _MISSING
    get = old.get
    for key, value in new.items():
        before = get(key, missing)
        if before is value:
            continue
        if before is missing:
            ops.append({"op": "add", "path": f"{path}/{escape(key)}", "value": value})
        elif type(before) is dict and type(value) is dict:
            _diff_map(before, value, f"{path}/{escape(key)}", ops)  # `_diff`'s first case, one call less
        else:
            _diff(before, value, f"{path}/{escape(key)}", ops)


def _name(item: Any) -> Any:
    if type(item) is dict:
        return item.get("name")
    return item.get("name") if isinstance(item, Mapping) else None


def _diff_list(old: Sequence[Any], new: Sequence[Any], path: str, ops: JsonPatch) -> None:
    plan = _insertions(old, new)
    if plan is None:
        ops.append({"op": "replace", "path": path, "value": list(new)})
        return
    # Walk the new list left to right: each old element is matched in order, everything between is
    # an insertion at its final index (appends use '/-'), so indexes stay valid as we go.
    old_index = 0
    for new_index, item in enumerate(new):
        if old_index < len(old) and plan[new_index]:
            _diff(old[old_index], item, f"{path}/{new_index}", ops)
            old_index += 1
        elif old_index >= len(old):
            ops.append({"op": "add", "path": f"{path}/-", "value": item})
        else:
            ops.append({"op": "add", "path": f"{path}/{new_index}", "value": item})


def _insertions(old: Sequence[Any], new: Sequence[Any]) -> list[bool] | None:
    """For each element of `new`, True when it is the next element of `old` (matched), False when
    inserted; None when `new` is not `old` plus insertions (then the list is replaced whole)."""
    if len(new) < len(old):
        return None
    old_names = [_name(x) for x in old]
    new_names = [_name(x) for x in new]
    named = None not in old_names and None not in new_names
    matched: list[bool] = []
    i = 0
    extra = len(new) - len(old)
    for j, item in enumerate(new):
        if i < len(old) and ((old_names[i] == new_names[j]) if named else (old[i] == item or extra == 0)):
            matched.append(True)
            i += 1
        else:
            matched.append(False)
    return matched if i == len(old) else None
