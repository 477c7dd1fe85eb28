"""Rate limits as data: which budgets a call spends (per user, user+tool, tool, user+prompt, prompt,
pod), and their layering.

Pure: parsed from the policy configuration; `ratelimit` spends them against a `limits` storage.
A narrowing layer adds its limits to the ones above it: every limit applies, so a layer can only
lower what a caller may do, never raise it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from outrider.sidecar.inbound.jsonrpc import COMPLETE, McpMessage

SCOPES = ("per_pod", "per_prompt", "per_tool", "per_user", "per_user_prompt", "per_user_tool")
ANY_TOOL = "*"  # in `per_tool` every tool, in `per_prompt` every prompt, each its own budget
# The methods that spend budget: the ones that reach a tool, a prompt or a resource. A
# `completion/complete` spends too, as the `prompts/get` or `resources/read` of what its ref names.
METERED_METHODS = frozenset({"tools/call", "prompts/get", "resources/read"})

if TYPE_CHECKING:  # `limits` itself is imported only by a configuration that sets a rate limit
    from limits import RateLimitItem


class LimitsError(ValueError):
    """A rate limit is not usable; the message names the key, the value and the accepted form."""


def _items(value: Any, where: str) -> tuple[RateLimitItem, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise LimitsError(f"{where}: {value!r} must be a rate like '10/minute' or a list of them")
    from limits import parse_many  # here, not at the top: only configured rate limits load `limits`

    items: list[RateLimitItem] = []
    for text in value:
        try:
            items.extend(parse_many(text))
        except ValueError:
            raise LimitsError(
                f"{where}: {text!r} is not a rate; write '<count>/<second|minute|hour|day>', "
                "like '10/minute' or '100 per hour'"
            ) from None
    return tuple(items)


@dataclass(frozen=True)
class RateLimits:
    per_user: tuple[RateLimitItem, ...] = ()
    per_user_tool: tuple[RateLimitItem, ...] = ()  # each user, each tool
    per_pod: tuple[RateLimitItem, ...] = ()
    # tool name (or "*" for every tool) -> limits shared by all callers of that tool
    per_tool: Mapping[str, tuple[RateLimitItem, ...]] = field(default_factory=dict)
    # The same for prompts: `prompts/get` and the completions of a prompt's arguments spend them.
    per_user_prompt: tuple[RateLimitItem, ...] = ()
    per_prompt: Mapping[str, tuple[RateLimitItem, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (
            self.per_user
            or self.per_user_tool
            or self.per_pod
            or self.per_tool
            or self.per_user_prompt
            or self.per_prompt
        )

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> RateLimits:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise LimitsError(f"{where}: must be a mapping with keys {list(SCOPES)}")
        unknown = sorted(set(map(str, data)) - set(SCOPES))
        if unknown:
            raise LimitsError(f"{where}: unknown key(s) {unknown}; allowed: {list(SCOPES)}")
        return cls(
            per_user=_items(data.get("per_user") or [], f"{where}.per_user"),
            per_user_tool=_items(data.get("per_user_tool") or [], f"{where}.per_user_tool"),
            per_pod=_items(data.get("per_pod") or [], f"{where}.per_pod"),
            per_tool=_named(data.get("per_tool"), f"{where}.per_tool", "tool"),
            per_user_prompt=_items(data.get("per_user_prompt") or [], f"{where}.per_user_prompt"),
            per_prompt=_named(data.get("per_prompt"), f"{where}.per_prompt", "prompt"),
        )

    def narrowed(self, other: RateLimits) -> RateLimits:
        """Both layers' limits: every one of them applies."""
        return RateLimits(
            per_user=self.per_user + other.per_user,
            per_user_tool=self.per_user_tool + other.per_user_tool,
            per_pod=self.per_pod + other.per_pod,
            per_tool=_joined(self.per_tool, other.per_tool),
            per_user_prompt=self.per_user_prompt + other.per_user_prompt,
            per_prompt=_joined(self.per_prompt, other.per_prompt),
        )


def _named(raw: Any, where: str, what: str) -> dict[str, tuple[RateLimitItem, ...]]:
    """`{name: rate}` (or `{"*": rate}`; a bare rate means `"*"`)."""
    raw = raw or {}
    if isinstance(raw, str | list):
        raw = {ANY_TOOL: raw}
    if not isinstance(raw, Mapping):
        raise LimitsError(f"{where}: must map {what} names (or '*') to rates")
    return {str(k): _items(v, f"{where}[{k!r}]") for k, v in raw.items() if v}


def _joined(
    first: Mapping[str, tuple[RateLimitItem, ...]], second: Mapping[str, tuple[RateLimitItem, ...]]
) -> dict[str, tuple[RateLimitItem, ...]]:
    joined = dict(first)
    for name, items in second.items():
        joined[name] = joined.get(name, ()) + items
    return joined


@dataclass(frozen=True)
class Budget:
    """One limit to spend for one call: the limit and the identifiers of the budget it draws from."""

    scope: str
    item: RateLimitItem
    key: tuple[str, ...]


def user_key(kind: str, issuer: str | None, subject: str) -> str:
    """One caller's budget identifier: kind, issuer and subject, each percent-encoded, joined by ':'.

    Encoded so that no part can hold the ':' between them nor the '/' that `limits` puts between the
    parts of a storage key: ("https://a:1", "x") and ("https://a", "1:x") are two callers, and so are
    subject "x/y" calling tool "z" and subject "x" calling tool "y/z".
    """
    return ":".join(_part(text) for text in (kind, issuer or "", subject))


def _part(text: str) -> str:
    return quote(text, safe="")


def budgets(limits: RateLimits, message: McpMessage, user: str, pod: str) -> tuple[Budget, ...]:
    """The budgets one request spends, pod-wide first (a refusal names the widest one it hit).

    `pod` is the server's identity (its SPIFFE ID): the same for every replica of a Deployment, so a
    shared store gives the replicas one budget. `user` comes from `user_key`; the pod and tool names
    are percent-encoded here, so no identifier holds the '/' `limits` joins them with.
    """
    # A notification counts too: `tools/call` without an `id` is still a call to a generic JSON-RPC server.
    # A completion draws from the budgets of the prompt or resource template it completes, under the
    # same keys (policy judges it as getting that prompt): a caller out of budget for a prompt must
    # not go on learning its argument values through completions, unmetered.
    completes = message.method == COMPLETE and message.completion_ref is not None
    if (
        limits.empty
        or message.kind not in ("request", "notification")
        or (message.method not in METERED_METHODS and not completes)
    ):
        return ()
    tool = message.tool_name if message.method == "tools/call" else None
    prompt = message.prompt_name if message.method == "prompts/get" else None
    if completes and message.completion_ref is not None and message.completion_ref[0] == "Prompt":
        prompt = message.completion_ref[1]
    pod = _part(pod)
    out: list[Budget] = [Budget("per_pod", i, ("pod", pod)) for i in limits.per_pod]
    for scope, kind, named, by_name in (
        ("per_tool", "tool", tool, limits.per_tool),
        ("per_prompt", "prompt", prompt, limits.per_prompt),
    ):
        if named is not None:
            for name in dict.fromkeys((named, ANY_TOOL)):  # once for a tool or prompt named "*"
                for item in by_name.get(name, ()):
                    out.append(Budget(scope, item, (kind, pod, _part(named), _part(name))))
    out.extend(Budget("per_user", i, ("user", pod, user)) for i in limits.per_user)
    if tool is not None:
        out.extend(
            Budget("per_user_tool", i, ("user_tool", pod, user, _part(tool))) for i in limits.per_user_tool
        )
    if prompt is not None:
        out.extend(
            Budget("per_user_prompt", i, ("user_prompt", pod, user, _part(prompt)))
            for i in limits.per_user_prompt
        )
    return tuple(out)
