"""Policies checked against what the server offers: tool names and argument names from `tools/list`.

A policy that names a tool or an argument the server does not have would silently never match;
this finds them (over the policies' JSON form), and runs Cedar's validator with `outrider.cedarschema`,
its `Arguments` type derived from the server's tools, so the gate can report them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from outrider.sidecar.policy.cedar_text import CompiledPolicies

_ARGUMENTS_TYPE = "type Arguments = {};"
_JSON_TO_CEDAR = {"string": "String", "integer": "Long", "boolean": "Bool"}
_POLICY_ID = re.compile(r"policy `([^`]+)`")


@cache
def base_schema() -> str:
    """`outrider.cedarschema`, shipped beside this module."""
    return resources.files("outrider.sidecar.policy").joinpath("outrider.cedarschema").read_text()


def _cedar_type(prop: Any) -> str | None:
    if not isinstance(prop, dict):
        return None
    kind = prop.get("type")
    if kind in _JSON_TO_CEDAR:
        return _JSON_TO_CEDAR[kind]
    if kind == "array" and isinstance(prop.get("items"), dict):
        inner = _JSON_TO_CEDAR.get(prop["items"].get("type"))
        return f"Set<{inner}>" if inner else None
    return None  # objects, numbers (floats reach Cedar as text), unions: not typed


@dataclass(frozen=True)
class ServerTools:
    """The server's tools and the argument names each takes (from its `inputSchema.properties`)."""

    tools: Mapping[str, frozenset[str]]
    types: Mapping[str, str | None] = field(default_factory=dict)  # argument -> Cedar type (None: mixed)

    def schema(self) -> str:
        """The base schema with `Arguments` typed from the server's tools (one optional attribute each)."""
        attrs = ", ".join(f"{json.dumps(name)}?: {kind}" for name, kind in sorted(self.types.items()) if kind)
        return base_schema().replace(_ARGUMENTS_TYPE, f"type Arguments = {{ {attrs} }};")

    @classmethod
    def from_list_result(cls, result: Any) -> ServerTools | None:
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return None
        tools: dict[str, frozenset[str]] = {}
        types: dict[str, str | None] = {}
        for tool in result["tools"]:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue
            schema = tool.get("inputSchema")
            props = schema.get("properties") if isinstance(schema, dict) else None
            names: dict[Any, Any] = props if isinstance(props, dict) else {}
            tools[tool["name"]] = frozenset(k for k in names if isinstance(k, str))
            for name, prop in names.items():
                if not isinstance(name, str):
                    continue
                kind = _cedar_type(prop)
                # The same name with two types across tools cannot be one attribute type: untyped.
                types[name] = kind if types.get(name, kind) == kind else None
        return cls(tools, types)


def validate(layers: Iterable[CompiledPolicies], schema: str) -> list[str]:
    """Cedar's validator over each layer (entity types, actions, attributes, types), one line each."""
    import cedarpy  # here, not at the top: only a sidecar with policies loads it

    problems: list[str] = []
    for compiled in layers:
        try:
            result = cedarpy.validate_policies(compiled.text, schema)
        except ValueError as exc:
            problems.append(f"{compiled.origin}: cannot validate: {exc}")
            continue
        for error in result.errors:
            text = str(error)
            found = _POLICY_ID.search(text)
            shown = compiled.ids.get(found.group(1), found.group(1)) if found else "?"
            detail = text.split(", ", 1)[1] if ", " in text else text
            problems.append(f"{compiled.origin}: policy {shown!r}: {detail}")
    return problems


def _walk(node: Any) -> Iterable[Any]:
    stack = [node]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _is_context_arguments(node: Any) -> bool:
    if not isinstance(node, dict) or "." not in node:
        return False
    inner = node["."]
    return (
        isinstance(inner, dict)
        and inner.get("attr") == "arguments"
        and inner.get("left") == {"Var": "context"}
    )


def referenced(policy: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """(tool names, argument names) one policy (EST) refers to."""
    tools: set[str] = set()
    arguments: set[str] = set()
    for node in _walk(policy):
        if not isinstance(node, dict):
            continue
        ref = node.get("__entity")
        entity: dict[str, Any] = ref if isinstance(ref, dict) else node
        if entity.get("type") == "Tool" and isinstance(entity.get("id"), str):
            tools.add(entity["id"])
        for op in (".", "has"):
            inner = node.get(op)
            if isinstance(inner, dict) and _is_context_arguments(inner.get("left")):
                attr = inner.get("attr")
                if isinstance(attr, str):
                    arguments.add(attr)
    return tools, arguments


def mismatches(layers: Iterable[CompiledPolicies], server: ServerTools) -> list[str]:
    """One line per policy that names a tool or argument the server does not offer."""
    known_args = frozenset().union(*server.tools.values()) if server.tools else frozenset()
    problems: list[str] = []
    for compiled in layers:
        for cedar_id, policy in compiled.est.items():
            shown = compiled.ids.get(cedar_id, cedar_id)
            tools, arguments = referenced(policy)
            for tool in sorted(tools - set(server.tools)):
                problems.append(
                    f"{compiled.origin}: policy {shown!r} names tool {tool!r}, "
                    "which the server does not offer"
                )
            pinned = [server.tools[t] for t in tools if t in server.tools]
            allowed = frozenset().union(*pinned) if pinned else known_args
            for arg in sorted(arguments - allowed):
                problems.append(
                    f"{compiled.origin}: policy {shown!r} tests argument {arg!r}, which no "
                    f"{'named ' if pinned else ''}tool of the server takes"
                )
    return problems
