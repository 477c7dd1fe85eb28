"""The policy decision: layered Cedar policy sets evaluated for each JSON-RPC request, and list filtering.

Layering as for egress: each operator layer is a ceiling (default deny, `permit` and `forbid`); the
app team's layers are forbid-only narrowings. A call is allowed when every ceiling allows it and no
narrowing forbids it. Cedar's deny-overrides makes that one evaluation per ceiling: the narrowings'
`forbid`s are evaluated together with the first ceiling. No layer at all means no policy: allow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.policy.cedar_text import PERMIT_ALL, CedarError, CompiledPolicies, compile_policies
from outrider.sidecar.policy.config import MAX_ARGUMENT_VALUES, LayerSource
from outrider.sidecar.policy.model import (
    LIST_RESULTS,
    Server,
    action_for,
    cedar_string,
    more_values_than,
    principal_entities,
    principal_uid,
    request_for,
    uid_text,
)
from outrider.sidecar.telemetry.observer import Principal

IMPLICIT_PERMIT = "outrider-default-permit"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # Ids of the determining policies: the permits that allowed, or the forbids that denied (empty
    # for a default deny: nothing permitted the call).
    policies: tuple[str, ...] = ()
    reason: str = ""  # one line for the audit log and span, never the policy text
    errors: tuple[str, ...] = ()  # policies that failed to evaluate (logged, not shown to callers)


ALLOW_NO_POLICY = Decision(True, (), "no policy configured")


@dataclass(frozen=True)
class _Group:
    """One Cedar evaluation: a ceiling (or the implicit permit-all) plus, for the first, the narrowings."""

    policy_set: Any  # cedarpy.PolicySet
    ids: dict[str, tuple[str, str]]  # Cedar id -> (layer origin, shown id)
    origin: str
    forbids: frozenset[str]  # Cedar ids of the `forbid` policies
    est: dict[str, Any] = field(default_factory=dict)  # Cedar id -> the policy as JSON
    # (action, resource type, resource id) -> the policies whose scope can match it. Cedar evaluates
    # every policy of a set; a slice keeps a call from paying for policies about other tools.
    slices: dict[tuple[str, str, str], Any] = field(default_factory=dict, compare=False, repr=False)

    def slice(self, action: str, kind: str, resource: str) -> Any:
        import cedarpy  # here, not at the top: only a sidecar with policies loads it

        key = (action, kind, resource)
        found = self.slices.get(key)
        if found is not None:
            return found
        chosen = {i: p for i, p in self.est.items() if _scope_may_match(p, action, kind, resource)}
        if len(chosen) == len(self.est):
            found = self.policy_set
        else:
            document = {"staticPolicies": chosen, "templates": {}, "templateLinks": []}
            found = cedarpy.PolicySet.from_json_str(json.dumps(document))
        if len(self.slices) >= _MAX_SLICES:
            self.slices.clear()
        self.slices[key] = found
        return found


_MAX_SLICES = 4096
_ALL = {"effect": "permit", "principal": {"op": "All"}, "action": {"op": "All"}, "resource": {"op": "All"}}


def _scope_may_match(policy: Any, action: str, kind: str, resource: str) -> bool:
    """False only when the policy's scope provably excludes the request (kept when unsure)."""
    scope_action = policy.get("action") or {}
    op = scope_action.get("op")
    if op in ("==", "in") and isinstance(scope_action.get("entity"), dict):
        # No action groups are defined, so `in Action::"a"` is `== Action::"a"`.
        if scope_action["entity"] != {"type": "Action", "id": action}:
            return False
    elif (
        op == "in"
        and isinstance(scope_action.get("entities"), list)
        and {"type": "Action", "id": action} not in scope_action["entities"]
    ):
        return False
    scope_resource = policy.get("resource") or {}
    op = scope_resource.get("op")
    if op == "==" and isinstance(scope_resource.get("entity"), dict):
        return bool(scope_resource["entity"] == {"type": kind, "id": resource})
    if op == "is":
        return bool(scope_resource.get("entity_type") == kind)
    return True


@dataclass(frozen=True)
class Policies:
    """The compiled layers in force; immutable, swapped whole on reload."""

    layers: tuple[tuple[CompiledPolicies, bool], ...]  # (policies, narrowing)
    groups: tuple[_Group, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    @property
    def count(self) -> int:
        return sum(len(c) for c, _ in self.layers)

    def describe(self) -> str:
        if not self.layers:
            return "no policy (every authenticated caller may call every tool)"
        parts = [f"{c.origin}: {len(c)}" for c, _ in self.layers]
        return f"{self.count} Cedar policies ({'; '.join(parts)})"


def build(layers: Sequence[tuple[CompiledPolicies, bool]]) -> Policies:
    """Group compiled layers for evaluation (see the module docstring)."""
    if not layers:
        return Policies((), ())
    import cedarpy  # here, not at the top: only a sidecar with policies loads it

    ceilings = [c for c, narrowing in layers if not narrowing]
    narrowings = [c for c, narrowing in layers if narrowing]
    groups: list[_Group] = []
    firsts: list[CompiledPolicies | None] = list(ceilings) if ceilings else [None]
    for index, ceiling in enumerate(firsts):
        members: list[tuple[str, CompiledPolicies | None]] = []
        if ceiling is None:
            members.append((PERMIT_ALL, None))
        else:
            members.append((ceiling.text, ceiling))
        if index == 0:
            members.extend((n.text, n) for n in narrowings)
        text = "\n".join(t for t, _ in members)
        ids: dict[str, tuple[str, str]] = {}
        forbids: set[str] = set()
        est: dict[str, Any] = {}
        position = 0
        for _, compiled in members:
            if compiled is None:
                ids[f"policy{position}"] = ("implicit", IMPLICIT_PERMIT)
                est[f"policy{position}"] = {**_ALL, "conditions": []}
                position += 1
                continue
            for cedar_id in compiled.ids:
                ids[f"policy{position}"] = (compiled.origin, compiled.ids[cedar_id])
                est[f"policy{position}"] = compiled.est[cedar_id]
                if compiled.effects.get(cedar_id) == "forbid":
                    forbids.add(f"policy{position}")
                position += 1
        origin = ceiling.origin if ceiling else "no ceiling"
        groups.append(_Group(cedarpy.PolicySet.from_str(text), ids, origin, frozenset(forbids), est))
    return Policies(tuple(layers), tuple(groups))


def compile_layers(sources: Iterable[LayerSource]) -> tuple[list[tuple[CompiledPolicies, bool]], list[str]]:
    """Compile each source; a bad layer is reported. Callers decide what a bad layer means."""
    compiled: list[tuple[CompiledPolicies, bool]] = []
    errors: list[str] = []
    for source in sources:
        try:
            compiled.append(
                (
                    compile_policies(source.cedar, source.source, forbid_only=source.narrowing),
                    source.narrowing,
                )
            )
        except CedarError as exc:
            errors.append(str(exc))
    return compiled, errors


def _entities(principal: Principal, server: Server, resources: Iterable[dict[str, Any] | None]) -> list[Any]:
    entities = principal_entities(principal)
    entities.append(server.entity())
    seen: set[str] = set()
    for resource in resources:
        if resource is None:
            continue
        key = resource["uid"]["type"] + "\x00" + resource["uid"]["id"]
        if key not in seen:
            seen.add(key)
            entities.append(resource)
    return entities


# Parsed entity graphs by (principal, server, resources): a caller's next call reuses the handle
# instead of re-parsing the same JSON (about half of an evaluation's cost). Bounded, cleared whole.
_ENTITY_HANDLES: dict[tuple[Any, ...], Any] = {}
_MAX_ENTITY_HANDLES = 4096


def _entity_handle(principal: Principal, server: Server, resources: Sequence[dict[str, Any] | None]) -> Any:
    import cedarpy  # here, not at the top: only a sidecar with policies loads it

    key = (principal, server, tuple((r["uid"]["type"], r["uid"]["id"]) for r in resources if r is not None))
    handle = _ENTITY_HANDLES.get(key)
    if handle is None:
        handle = cedarpy.Entities.from_json_str(json.dumps(_entities(principal, server, resources)))
        if len(_ENTITY_HANDLES) >= _MAX_ENTITY_HANDLES:
            _ENTITY_HANDLES.clear()
        _ENTITY_HANDLES[key] = handle
    return handle


def decide(
    policies: Policies,
    principal: Principal,
    server: Server,
    messages: Sequence[McpMessage],
    transport: str,
    max_argument_values: int = MAX_ARGUMENT_VALUES,
) -> list[Decision]:
    """One decision per message (all judged requests evaluated in one batch per group).

    A message whose arguments hold more than `max_argument_values` values is denied unjudged: its
    conversion and evaluation would hold the event loop every caller shares for seconds. So is one
    whose tool, prompt or resource is not valid Unicode (a lone surrogate), which Cedar cannot hold.
    """
    if not policies.enabled or not messages:
        return [ALLOW_NO_POLICY for _ in messages]
    refusals = [_unjudgeable(m, max_argument_values) for m in messages]
    if any(refusals):
        rest = iter(
            decide(
                policies,
                principal,
                server,
                [m for m, refusal in zip(messages, refusals, strict=True) if refusal is None],
                transport,
                max_argument_values,
            )
        )
        return [refusal or next(rest) for refusal in refusals]
    import cedarpy  # here, not at the top: only a sidecar with policies loads it

    built = [request_for(m, principal, server, transport) for m in messages]
    try:
        entities = _entity_handle(principal, server, [r for _, r in built])
    except ValueError:
        # Cedar takes only valid Unicode: a principal whose claims hold a lone surrogate (JSON
        # `\ud800`, which Python's decoder accepts) cannot be judged, so none of its calls is allowed.
        return [UNJUDGEABLE_PRINCIPAL for _ in messages]
    requests = [r for r, _ in built]
    # The slice key is the request's own resource (the server itself for server-level methods): a
    # policy scoped `resource == McpServer::"…"` must stay in the slice of a `tools/list`.
    keys = [(r["action"]["id"], r["resource"]["type"], r["resource"]["id"]) for r, _ in built]
    verdicts: list[list[Any]] = []
    for group in policies.groups:
        # One batch per slice (usually one: a body holds one call, or calls of the same tools).
        results: list[Any] = [None] * len(requests)
        for key in dict.fromkeys(keys):
            indexes = [i for i, k in enumerate(keys) if k == key]
            answered = cedarpy.is_authorized_batch(
                [requests[i] for i in indexes], group.slice(*key), entities
            )
            for i, result in zip(indexes, answered, strict=True):
                results[i] = result
        verdicts.append(results)
    decisions: list[Decision] = []
    for index in range(len(messages)):
        decisions.append(_combine(policies.groups, [v[index] for v in verdicts]))
    return decisions


UNJUDGEABLE_PRINCIPAL = Decision(
    False, (), "the caller's token names it with text that is not valid Unicode: it cannot be judged"
)
_NOT_UNICODE = Decision(
    False, (), "the call names its tool, prompt or resource with text that is not valid Unicode"
)


def valid_unicode(text: str) -> bool:
    """False for text holding a lone surrogate: JSON can spell one (`\\ud800`), Cedar cannot hold it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unjudgeable(message: McpMessage, max_argument_values: int) -> Decision | None:
    """The refusal of a message Cedar cannot be asked about, or None: its arguments are too many to
    convert and evaluate on the event loop every caller shares, or its resource id is not Unicode
    (Cedar would refuse the whole entity set, every other call of the batch with it)."""
    if message.arguments is not None and more_values_than(message.arguments, max_argument_values):
        return Decision(
            False, (), f"the arguments hold more than {max_argument_values} values: too many to judge"
        )
    if not valid_unicode(action_for(message)[2]):
        return _NOT_UNICODE
    return None


_ERROR_POLICY = re.compile(r"policy `([^`]+)`")


def _combine(groups: Sequence[_Group], results: Sequence[Any]) -> Decision:
    permits: list[str] = []
    errors: list[str] = []
    for group, result in zip(groups, results, strict=True):
        diagnostics = result.diagnostics
        reasons = [group.ids.get(r, ("?", r))[1] for r in diagnostics.reasons]
        errors.extend(str(e)[:200] for e in diagnostics.errors)
        # Cedar skips a policy whose evaluation fails. For a `forbid` that would let a caller slip past
        # it with an argument of the wrong type (a number where the policy compares text): a forbid
        # that cannot be evaluated denies instead.
        failed = [
            group.ids.get(m.group(1), ("?", m.group(1)))[1]
            for e in diagnostics.errors
            if (m := _ERROR_POLICY.search(str(e))) is not None and m.group(1) in group.forbids
        ]
        if failed:
            return Decision(False, tuple(failed), "a forbid policy could not be evaluated", tuple(errors))
        if not result.allowed:
            if reasons:
                return Decision(False, tuple(reasons), "forbidden by policy", tuple(errors))
            return Decision(False, (), f"no policy in {group.origin} permits this call", tuple(errors))
        permits.extend(r for r in reasons if r != IMPLICIT_PERMIT)
    return Decision(True, tuple(permits), "permitted by policy", tuple(errors))


def may_use(
    policies: Policies, principal: Principal, server: Server, kind: str, names: Sequence[str]
) -> list[bool]:
    """For a list answer: could the caller use each item with *some* arguments (partial evaluation)?

    An item is hidden only when the policies deny it whatever the context holds; a `permit` with an
    argument condition keeps the tool visible (the call itself is still judged with its arguments).
    """
    if not policies.enabled:
        return [True for _ in names]
    import cedarpy  # here, not at the top: only a sidecar with policies loads it

    action, entity_type, _ = next(v for k, v in LIST_RESULTS.items() if k == kind)
    if not valid_unicode(principal_uid(principal)["id"]):
        # Cedar cannot hold the caller's name (a lone surrogate in the token): none of its calls is
        # allowed (UNJUDGEABLE_PRINCIPAL), so nothing is shown.
        return [False for _ in names]
    base = _entities(principal, server, ())
    who = uid_text(principal_uid(principal))
    visible: list[bool] = []
    for name in names:
        if not valid_unicode(name):
            # Cedar cannot hold it and partial evaluation of it ends in no Deny: hidden, as a call
            # naming it is refused.
            visible.append(False)
            continue
        uid = {"type": entity_type, "id": name}
        resource = {"uid": uid, "attrs": {}, "parents": [server.uid]}
        request = {
            "principal": who,
            "action": f"Action::{cedar_string(action)}",
            "resource": uid_text(uid),
        }
        # The action entity too: partial evaluation reads a missing one as unknown (`action in [...]`).
        entities = json.dumps(
            [*base, resource, {"uid": {"type": "Action", "id": action}, "attrs": {}, "parents": []}]
        )
        shown = True
        for group in policies.groups:
            result = cedarpy.is_authorized_partial(request, group.slice(action, entity_type, name), entities)
            # An evaluation error hides the item, as a forbid that cannot be evaluated denies the call:
            # a request Cedar could not read used to end in no decision, and so in "shown".
            if result.decision == cedarpy.Decision.Deny or result.diagnostics.errors:
                shown = False
                break
        visible.append(shown)
    return visible
