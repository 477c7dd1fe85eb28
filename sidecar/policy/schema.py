"""Policies checked against what the server offers: tool names and argument names from `tools/list`.

A policy that names a tool or an argument the server does not have would silently never match;
this finds them (pure, over the policies' JSON form) so the gate can report them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.policy.cedar_text import CompiledPolicies


@dataclass(frozen=True)
class ServerTools:
    """The server's tools and the argument names each takes (from its `inputSchema.properties`)."""

    tools: Mapping[str, frozenset[str]]

    @classmethod
    def from_list_result(cls, result: Any) -> ServerTools | None:
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return None
        tools: dict[str, frozenset[str]] = {}
        for tool in result["tools"]:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue
            schema = tool.get("inputSchema")
            props = schema.get("properties") if isinstance(schema, dict) else None
            tools[tool["name"]] = (
                frozenset(k for k in props if isinstance(k, str)) if isinstance(props, dict) else frozenset()
            )
        return cls(tools)


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
