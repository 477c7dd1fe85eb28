"""The Cedar model of an MCP call: principal, action, resource and context from plain facts.

Pure: the validated principal, the pod and one parsed JSON-RPC message in, Cedar request dicts and
entities out. The entity types and actions are declared in `outrider.cedarschema` beside this module.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry.observer import Principal

# MCP method -> (Cedar action, resource entity type). The list methods act on the server itself.
METHOD_ACTIONS: Mapping[str, tuple[str, str]] = {
    "tools/call": ("call_tool", "Tool"),
    "resources/read": ("read_resource", "Resource"),
    "resources/subscribe": ("read_resource", "Resource"),
    "resources/unsubscribe": ("read_resource", "Resource"),
    "prompts/get": ("get_prompt", "Prompt"),
    "tools/list": ("list_tools", "McpServer"),
    "prompts/list": ("list_prompts", "McpServer"),
    "resources/list": ("list_resources", "McpServer"),
    "resources/templates/list": ("list_resources", "McpServer"),
}
# Any other request method (logging/setLevel, tasks/..., a future method).
OTHER_ACTION = "other"
# Session plumbing that grants no access to tools or data: never judged, so that a policy set that
# permits only some tools does not also have to spell out how to start a session.
UNJUDGED_METHODS = frozenset({"initialize", "server/discover", "ping"})
# List results filtered per caller: result key -> (action that must be possible, entity type, id key).
# A resource template is judged as reading the resource its template text names
# (`Resource::"file:///{path}"`): Cedar cannot expand a URI template, so a policy that permits only
# named URIs hides the template, and one that permits every resource (or the template by its text)
# shows it; reading through the template is judged on the concrete URI as any read is.
LIST_RESULTS: Mapping[str, tuple[str, str, str]] = {
    "tools": ("call_tool", "Tool", "name"),
    "prompts": ("get_prompt", "Prompt", "name"),
    "resources": ("read_resource", "Resource", "uri"),
    "resourceTemplates": ("read_resource", "Resource", "uriTemplate"),
}
# Cedar's JSON reads these record keys as entity references or extension calls: a caller must not be
# able to smuggle one in through tool arguments, so such keys are left out of the context.
_RESERVED_KEYS = frozenset({"__entity", "__extn", "__expr"})
_MAX_DEPTH = 32
_LONG = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Server:
    """The pod this sidecar guards: the `McpServer` every tool, prompt and resource belongs to."""

    id: str  # the pod's SPIFFE ID when known, else "<namespace>/<pod>"
    namespace: str = ""
    service_account: str = ""
    spiffe_id: str = ""

    @classmethod
    def from_facts(cls, spiffe_id: str | None, namespace: str | None, pod: str | None) -> Server:
        account = ""
        if spiffe_id and "/sa/" in spiffe_id:
            account = spiffe_id.rsplit("/sa/", 1)[1].split("/", 1)[0]
            if not namespace and "/ns/" in spiffe_id:
                namespace = spiffe_id.split("/ns/", 1)[1].split("/", 1)[0]
        return cls(
            id=spiffe_id or f"{namespace or 'default'}/{pod or 'unknown'}",
            namespace=namespace or "",
            service_account=account,
            spiffe_id=spiffe_id or "",
        )

    @property
    def uid(self) -> dict[str, str]:
        return {"type": "McpServer", "id": self.id}

    def entity(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "attrs": {
                "namespace": self.namespace,
                "service_account": self.service_account,
                "spiffe_id": self.spiffe_id,
            },
            "parents": [],
        }


def principal_uid(principal: Principal) -> dict[str, str]:
    if principal.kind == "spiffe":
        return {"type": "Workload", "id": principal.subject}
    if principal.kind == "anonymous":
        return {"type": "Anonymous", "id": "anonymous"}
    return {"type": "User", "id": principal.subject}


def principal_entities(principal: Principal) -> list[dict[str, Any]]:
    """The principal and its groups/roles (parents), as Cedar JSON entities."""
    uid = principal_uid(principal)
    if uid["type"] == "Workload":
        return [{"uid": uid, "attrs": {"spiffe_id": principal.subject}, "parents": []}]
    if uid["type"] == "Anonymous":
        return [{"uid": uid, "attrs": {}, "parents": []}]
    groups = [{"type": "Group", "id": g} for g in principal.groups]
    roles = [{"type": "Role", "id": r} for r in principal.roles]
    entities: list[dict[str, Any]] = [
        {
            "uid": uid,
            "attrs": {"sub": principal.subject, "iss": principal.issuer or ""},
            "parents": groups + roles,
        }
    ]
    entities.extend({"uid": p, "attrs": {}, "parents": []} for p in groups + roles)
    return entities


def cedar_value(value: Any, depth: int = 0) -> Any:
    """A JSON value as a Cedar context value (None when Cedar cannot hold it: null, deep nesting)."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if _LONG[0] <= value <= _LONG[1] else str(value)
    if isinstance(value, float):
        # Cedar has no floating point: the text keeps the value comparable with `==` and `like`.
        return repr(value)
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(value, dict):
        record: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str) or key in _RESERVED_KEYS:
                continue
            converted = cedar_value(item, depth + 1)
            if converted is not None:
                record[key] = converted
        return record
    if isinstance(value, list):
        items = [cedar_value(v, depth + 1) for v in value]
        return [i for i in items if i is not None]
    return None


def more_values_than(value: Any, limit: int) -> bool:
    """Whether a JSON value holds more than `limit` values (every scalar, list and record counts
    one). A container's items are counted before they are walked, so a huge value costs at most
    `limit` steps, not its size."""
    seen = 1
    stack = [value]
    while stack and seen <= limit:
        item = stack.pop()
        if isinstance(item, dict):
            seen += len(item)
            if seen <= limit:
                stack.extend(item.values())
        elif isinstance(item, list):
            seen += len(item)
            if seen <= limit:
                stack.extend(item)
    return seen > limit


def action_for(message: McpMessage) -> tuple[str, str, str]:
    """(action, resource type, resource id) of a request; the resource id is "" for the server."""
    method = message.method or ""
    if message.completion_ref is not None:
        # completion/complete reveals a prompt's or a resource template's argument values: judged
        # as getting that prompt or reading that resource (a template by its text, as in lists).
        kind, named = message.completion_ref
        return ("get_prompt" if kind == "Prompt" else "read_resource"), kind, named
    action, kind = METHOD_ACTIONS.get(method, (OTHER_ACTION, "McpServer"))
    if kind == "Tool":
        return action, kind, message.tool_name or ""
    if kind == "Prompt":
        return action, kind, message.prompt_name or ""
    if kind == "Resource":
        return action, kind, message.resource_uri or ""
    return action, kind, ""


def context_for(message: McpMessage, principal: Principal, transport: str) -> dict[str, Any]:
    context: dict[str, Any] = {
        "method": message.method or "",
        "transport": transport,
        "act": list(principal.delegation),
        "scopes": list(principal.scopes),
        "client_id": principal.client_id or "",
    }
    # Always present (empty for methods without arguments), so `context.arguments has x` is safe.
    context["arguments"] = cedar_value(message.arguments) if message.arguments is not None else {}
    return context


def request_for(
    message: McpMessage, principal: Principal, server: Server, transport: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The Cedar request of one JSON-RPC request, and its resource entity (None for the server)."""
    action, kind, resource_id = action_for(message)
    if kind == "McpServer":
        resource_uid = server.uid
        resource = None
    else:
        resource_uid = {"type": kind, "id": resource_id}
        resource = {"uid": resource_uid, "attrs": {}, "parents": [server.uid]}
    request = {
        "principal": principal_uid(principal),
        "action": {"type": "Action", "id": action},
        "resource": resource_uid,
        "context": context_for(message, principal, transport),
    }
    return request, resource


def judged(message: McpMessage) -> bool:
    """Whether a message is put to the policy: every request except session plumbing, and every
    notification that names a request method (an MCP one is `notifications/…`; a server on a
    generic JSON-RPC library runs `tools/call` without an `id` and only drops the answer)."""
    method = message.method or ""
    if method in UNJUDGED_METHODS:
        return False
    if message.kind == "notification":
        return not method.startswith("notifications/")
    return message.kind == "request"


# Text Cedar writes unchanged in a string literal: printable ASCII but `"`, `'` and `\\`.
_PLAIN = re.compile(r"[ !#-&(-\[\]-~]*")


def cedar_string(text: str) -> str:
    """A Cedar string literal for `text`, exactly as Cedar itself writes it (for the textual entity
    UIDs partial evaluation takes, which must be in Cedar's normalised form: `"\\u{e9}"` for `é`
    is refused, and a refused UID ended in no decision, which the list filter read as "shown").

    Plain ASCII is written here; anything else as Cedar renders it (Rust's `escape_debug`, whose
    idea of a printable character is its own), once per distinct text.
    """
    if _PLAIN.fullmatch(text):
        return f'"{text}"'
    return _rendered(text)


@functools.lru_cache(maxsize=4096)
def _rendered(text: str) -> str:
    import cedarpy  # here, not at the top: only a sidecar with policies loads it

    scope = {"op": "==", "entity": {"type": "T", "id": text}}
    policy = {"effect": "permit", "principal": scope, "action": {"op": "All"}, "resource": {"op": "All"}}
    document = {"staticPolicies": {"p": {**policy, "conditions": []}}, "templates": {}, "templateLinks": []}
    written = cedarpy.policies_from_json_str(json.dumps(document))
    # `permit(principal == T::"<text>", action, resource);`: the text's own `, action, resource`
    # would be inside the literal, so the last one ends it.
    return written[written.index("T::") + 3 : written.rindex(", action, resource")]


def uid_text(uid: Mapping[str, str]) -> str:
    return f"{uid['type']}::{cedar_string(uid['id'])}"
