"""The policy gate the inbound proxy calls: judge a parsed body, filter answers, report state.

Thin: it holds the reloadable policy and the rate limiter and applies the pure modules
(`engine`, `answers`, `limits_config`, `schema`) to one request at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from outrider.sidecar.inbound import jsonrpc
from outrider.sidecar.inbound.jsonrpc import McpMessage, ParsedBody
from outrider.sidecar.policy import answers
from outrider.sidecar.policy.config import PolicyConfig
from outrider.sidecar.policy.engine import Decision, decide, may_use
from outrider.sidecar.policy.limits_config import budgets, user_key
from outrider.sidecar.policy.model import Server, judged, more_values_than
from outrider.sidecar.policy.ratelimit import RateLimiter, open_storage
from outrider.sidecar.policy.reload import PolicyHolder
from outrider.sidecar.policy.schema import ServerTools, mismatches
from outrider.sidecar.telemetry.observer import Principal

log = logging.getLogger("outrider.policy")

# A body whose judged calls hold more values than this (every argument value, plus one per call) is
# evaluated on the gate's worker thread: Cedar costs ~70 us per call plus ~4.5 us per value, so 100
# values hold the event loop ~0.5 ms, while a hand-over to a thread costs ~50-100 us, more than a
# small call's whole evaluation. Up to `max_argument_values` (~46 ms at 10,000) then runs off the loop.
INLINE_VALUES = 100
# A list answer naming more items than this (tools, prompts, resources, templates) is filtered on the
# same worker: each item is one Cedar partial evaluation (~70-100 us), so a server offering thousands
# of tools held every other caller for a quarter of a second or more. A JSON answer larger than
# INLINE_LIST_BYTES is decoded, filtered and encoded there too, without being counted first.
INLINE_LIST_ITEMS = 8
INLINE_LIST_BYTES = 65536
_MAX_LISTED = 64  # long lists' visibility kept per caller (cleared whole when full)


@dataclass(frozen=True)
class Verdict:
    """What happens to one message of a body."""

    forward: bool
    outcome: str = "ok"  # "ok" | "denied" | "limited" | "invalid"
    error: dict[str, Any] | None = None  # the JSON-RPC answer the proxy sends instead
    decision: Decision | None = None
    retry_after_s: int = 0
    limit_scope: str | None = None
    store_error: bool = False
    detail: str | None = None  # why an "invalid" message was refused, when it is a JSON-RPC message

    @property
    def reason(self) -> str:
        if self.outcome == "limited":
            return f"rate limit {self.limit_scope} exceeded; retry after {self.retry_after_s} s"
        if self.outcome == "invalid":
            return self.detail or "not a JSON-RPC message; refused unjudged"
        if self.decision is not None:
            return self.decision.reason
        return ""


PASS = Verdict(True)
# Methods that act on one named tool, prompt or resource: the param naming it, and the fact read.
_NAMED_PARAM = {
    "tools/call": "params.name",
    "prompts/get": "params.name",
    "resources/read": "params.uri",
    "resources/subscribe": "params.uri",
    "resources/unsubscribe": "params.uri",
}
_BAD_REF = (
    'completion/complete needs params.ref as {"type": "ref/prompt", "name": <string>} '
    'or {"type": "ref/resource", "uri": <string>}'
)


def unnamed(message: McpMessage) -> str | None:
    """Why a call of a named tool, prompt or resource names none as a string, or None when it does.

    Judged as the empty name, `{"name": ["delete"]}` passed a policy that forbids `delete` (and a
    per-tool budget); a server that coerces the value (JavaScript turns `["delete"]` into the key
    `"delete"`) would then run the forbidden tool. The `mcp` SDK refuses such params itself.
    """
    if message.kind not in ("request", "notification"):
        return None
    if message.method == jsonrpc.COMPLETE:
        # Judged as the prompt or resource template it completes for (a caller forbidden a prompt
        # must not learn its arguments' values): a ref of no known shape names nothing to judge.
        return None if message.completion_ref is not None else _BAD_REF
    param = _NAMED_PARAM.get(message.method or "")
    if param is None:
        return None
    named = {"tools/call": message.tool_name, "prompts/get": message.prompt_name}.get(
        message.method or "", message.resource_uri
    )
    if named is not None:
        return None
    return f"{message.method} needs {param} as a string"


@dataclass(frozen=True)
class Judgement:
    verdicts: tuple[Verdict, ...]

    @property
    def refused(self) -> bool:
        return any(not v.forward for v in self.verdicts)

    @property
    def nothing_to_forward(self) -> bool:
        return all(not v.forward for v in self.verdicts)

    @property
    def retry_after_s(self) -> int:
        return max((v.retry_after_s for v in self.verdicts if v.outcome == "limited"), default=0)


@dataclass
class GateStats:
    denied: int = 0
    limited: int = 0
    invalid: int = 0
    allowed: int = 0
    filtered_items: int = 0
    allowed_store_down: int = 0


@dataclass
class Gate:
    config: PolicyConfig
    holder: PolicyHolder
    limiter: RateLimiter
    server: Callable[[], Server]
    stats: GateStats = field(default_factory=GateStats)
    schema_problems: tuple[str, ...] = ()
    _schema_seen: object = None
    _evaluator: ThreadPoolExecutor | None = field(default=None, repr=False)
    # (principal, server, kind, names) -> (the policies judged with, visibility) for long lists
    _listed: dict[tuple[Any, ...], tuple[Any, tuple[bool, ...]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config: PolicyConfig, server: Callable[[], Server]) -> Gate:
        holder = PolicyHolder.from_config(config)
        # A shared store is opened now (a bad URI fails start-up); the in-memory one at the first
        # spend, so a sidecar without rate limits never loads `limits`.
        memory = config.storage.startswith("memory://")
        storage = config.storage if memory else open_storage(config.storage, config.store_timeout_s)
        limiter = RateLimiter(
            storage,
            on_store_error=config.on_store_error,
            timeout_s=config.store_timeout_s,
            shared=not config.storage.startswith("memory://"),
        )
        return cls(config, holder, limiter, server)

    @property
    def active(self) -> bool:
        """False with no policy and no limit: the proxy then behaves exactly as without a gate."""
        return self.holder.policies.enabled or not self.holder.limits.empty

    async def judge(self, principal: Principal, parsed: ParsedBody, transport: str) -> Judgement:
        messages = parsed.messages
        policies = self.holder.policies
        server = self.server()
        to_judge = [i for i, m in enumerate(messages) if judged(m)]
        calls = [messages[i] for i in to_judge]
        limit = self.config.max_argument_values
        if policies.enabled and more_values_than([m.arguments for m in calls], INLINE_VALUES):
            # On the worker (see `_worker`); the decisions are the same.
            loop = asyncio.get_running_loop()
            decisions = await loop.run_in_executor(
                self._worker(), decide, policies, principal, server, calls, transport, limit
            )
        else:
            decisions = decide(policies, principal, server, calls, transport, limit)
        by_index = dict(zip(to_judge, decisions, strict=True))
        verdicts: list[Verdict] = []
        user = user_key(principal.kind, principal.issuer, principal.subject)
        for index, message in enumerate(messages):
            if message.kind == "invalid":
                self.stats.invalid += 1
                error = jsonrpc.error_object(
                    message.id, jsonrpc.INVALID_REQUEST, "not a JSON-RPC 2.0 message"
                )
                verdicts.append(Verdict(False, "invalid", error))
                continue
            problem = unnamed(message)
            if problem is not None:
                self.stats.invalid += 1
                error = jsonrpc.error_object(message.id, jsonrpc.INVALID_PARAMS, problem)
                verdicts.append(Verdict(False, "invalid", error, detail=problem))
                continue
            decision = by_index.get(index)
            if decision is not None and not decision.allowed:
                self.stats.denied += 1
                if decision.errors:
                    log.info(
                        "policy evaluation errors for %s: %s", message.method, "; ".join(decision.errors)
                    )
                verdicts.append(Verdict(False, "denied", answers.denied_error(message.id), decision))
                continue
            spend = budgets(self.holder.limits, message, user, server.id)
            result = await self.limiter.spend(spend) if spend else None
            if result is not None and not result.allowed:
                self.stats.limited += 1
                verdicts.append(
                    Verdict(
                        False,
                        "limited",
                        answers.limited_error(message.id, result.retry_after_s),
                        decision,
                        result.retry_after_s,
                        result.scope,
                        result.store_error,
                    )
                )
                continue
            if result is not None and result.store_error:
                self.stats.allowed_store_down += 1
            self.stats.allowed += 1
            verdicts.append(
                Verdict(True, "ok", None, decision, store_error=bool(result and result.store_error))
            )
        return Judgement(tuple(verdicts))

    # -- answers ----------------------------------------------------------------------------------

    def _visible(self, principal: Principal) -> answers.Visibility:
        policies = self.holder.policies
        server = self.server()

        def visible(kind: str, names: Sequence[str]) -> list[bool]:
            if len(names) <= INLINE_LIST_ITEMS:
                return may_use(policies, principal, server, kind, names)
            # A long list costs one Cedar partial evaluation per item on the one worker: the same
            # caller asking for the same list again (a client re-listing, or one keeping the worker
            # busy on purpose) is answered from the last result, for as long as the policies are
            # the same object (a reload swaps them whole).
            key = (principal, server, kind, _names_digest(names))
            held = self._listed.get(key)
            if held is not None and held[0] is policies:
                return list(held[1])
            shown = may_use(policies, principal, server, kind, names)
            if len(self._listed) >= _MAX_LISTED or any(p is not policies for p, _ in self._listed.values()):
                # Full, or kept under policies since replaced (which it would keep alive): start afresh.
                self._listed.clear()
            self._listed[key] = (policies, tuple(shown))
            return shown

        return visible

    def filter_objects(self, principal: Principal, decoded: Any) -> tuple[Any, int]:
        items = decoded if isinstance(decoded, list) else [decoded]
        self._learn_schema(items)
        if not self.holder.policies.enabled:
            return decoded, 0
        filtered, removed = self._filtered(principal, decoded)
        self.stats.filtered_items += removed
        return filtered, removed

    def _filtered(self, principal: Principal, decoded: Any) -> tuple[Any, int]:
        """`decoded` with the items `principal` may not use removed, and how many; no state is touched
        (it may run on the worker thread)."""
        visible = self._visible(principal)
        items = decoded if isinstance(decoded, list) else [decoded]
        out = []
        removed = 0
        for item in items:
            kept, count = answers.filter_list_result(item, visible)
            out.append(kept)
            removed += count
        return (out if isinstance(decoded, list) else out[0]), removed

    async def filter_answer(self, principal: Principal, payload: bytes) -> bytes:
        """`filter_payload` for the event loop: a list of more than INLINE_LIST_ITEMS items (or an
        answer over INLINE_LIST_BYTES) is filtered on the gate's one worker thread, so small calls
        keep being answered meanwhile. The same bytes come back as `filter_payload` would give."""
        if not answers.may_hold_list(payload) or not self.holder.policies.enabled:
            return self.filter_payload(principal, payload)
        loop = asyncio.get_running_loop()
        if len(payload) > INLINE_LIST_BYTES:
            decoded = await loop.run_in_executor(self._worker(), _decode, payload)
        else:
            decoded = _decode(payload)
        if decoded is _UNDECODABLE:
            return payload
        items = decoded if isinstance(decoded, list) else [decoded]
        self._learn_schema(items)
        if len(payload) <= INLINE_LIST_BYTES and answers.listed_items(items) <= INLINE_LIST_ITEMS:
            filtered, removed = self._filtered(principal, decoded)
            encoded = _encode(filtered) if removed else payload
        else:
            filtered, removed, encoded = await loop.run_in_executor(
                self._worker(), self._filtered_encoded, principal, decoded, payload
            )
        self.stats.filtered_items += removed
        return encoded

    def _filtered_encoded(self, principal: Principal, decoded: Any, payload: bytes) -> tuple[Any, int, bytes]:
        filtered, removed = self._filtered(principal, decoded)
        return filtered, removed, _encode(filtered) if removed else payload

    def _worker(self) -> ThreadPoolExecutor:
        # One worker for evaluations and large lists alike: large work queues behind itself instead of
        # taking every core, and small calls keep being judged on the loop meanwhile.
        if self._evaluator is None:
            self._evaluator = ThreadPoolExecutor(1, thread_name_prefix="outrider-policy")
        return self._evaluator

    def filter_payload(self, principal: Principal, payload: bytes) -> bytes:
        """A JSON answer with list results filtered for `principal` (unchanged bytes when nothing is)."""
        if not answers.may_hold_list(payload):
            return payload
        try:
            decoded = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return payload
        filtered, removed = self.filter_objects(principal, decoded)
        if not removed:
            return payload
        return _encode(filtered)

    def _learn_schema(self, items: Sequence[Any]) -> None:
        for item in items:
            result = item.get("result") if isinstance(item, dict) else None
            tools = ServerTools.from_list_result(result)
            if tools is None or tools == self._schema_seen:
                continue
            self._schema_seen = tools
            self.check_schema()

    def check_schema(self) -> None:
        if not isinstance(self._schema_seen, ServerTools):
            return
        layers = [compiled for compiled, _ in self.holder.policies.layers]
        problems = tuple(mismatches(layers, self._schema_seen))
        if problems != self.schema_problems:
            for problem in problems:
                log.warning("policy does not match the server's tools: %s", problem)
        self.schema_problems = problems

    # -- state --------------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Always ready (a policy problem must not take the server out of rotation); the detail says why."""
        parts = [self.holder.policies.describe()]
        if self.holder.spec_errors:
            parts.append(
                f"pod-spec policy did not compile (deny-all in its place): {self.holder.spec_errors[0]}"
            )
        if self.holder.last_error:
            parts.append(f"last reload rejected, keeping the last good policy: {self.holder.last_error}")
        if self.schema_problems:
            parts.append(f"{len(self.schema_problems)} schema mismatch(es): {self.schema_problems[0]}")
        if not self.holder.limits.empty:
            if self.limiter.store_healthy:
                parts.append("rate-limit store ok")
            else:
                mode = "allowing" if self.limiter.fail_open else "refusing"
                parts.append(
                    f"rate-limit store unreachable ({self.limiter.last_store_error}): {mode} metered calls"
                )
        return True, "; ".join(parts)

    def metrics_text(self) -> bytes:
        s = self.stats
        lines = [
            "# HELP outrider_policy_decisions_total MCP requests judged by the policy gate, by outcome.",
            "# TYPE outrider_policy_decisions_total counter",
            f'outrider_policy_decisions_total{{outcome="allowed"}} {s.allowed}',
            f'outrider_policy_decisions_total{{outcome="denied"}} {s.denied}',
            f'outrider_policy_decisions_total{{outcome="rate_limited"}} {s.limited}',
            f'outrider_policy_decisions_total{{outcome="invalid"}} {s.invalid}',
            "# HELP outrider_policy_list_items_filtered_total List items hidden from callers by policy.",
            "# TYPE outrider_policy_list_items_filtered_total counter",
            f"outrider_policy_list_items_filtered_total {s.filtered_items}",
            "# HELP outrider_policy_count Cedar policies in force.",
            "# TYPE outrider_policy_count gauge",
            f"outrider_policy_count {self.holder.policies.count}",
            "# HELP outrider_policy_reloads_total Policy file loads that took effect.",
            "# TYPE outrider_policy_reloads_total counter",
            f"outrider_policy_reloads_total {self.holder.reloads}",
            "# HELP outrider_policy_reload_errors_total Policy file loads rejected (last good kept).",
            "# TYPE outrider_policy_reload_errors_total counter",
            f"outrider_policy_reload_errors_total {self.holder.reload_errors}",
            "# HELP outrider_policy_schema_mismatches Policies naming tools or arguments the server lacks.",
            "# TYPE outrider_policy_schema_mismatches gauge",
            f"outrider_policy_schema_mismatches {len(self.schema_problems)}",
            "# HELP outrider_ratelimit_store_up 1 while the rate-limit store answers.",
            "# TYPE outrider_ratelimit_store_up gauge",
            f"outrider_ratelimit_store_up {1 if self.limiter.store_healthy else 0}",
            "# HELP outrider_ratelimit_store_errors_total Rate-limit checks the store could not answer.",
            "# TYPE outrider_ratelimit_store_errors_total counter",
            f"outrider_ratelimit_store_errors_total {self.limiter.store_errors_total}",
            "# HELP outrider_ratelimit_allowed_store_down_total Calls allowed because the store was down.",
            "# TYPE outrider_ratelimit_allowed_store_down_total counter",
            f"outrider_ratelimit_allowed_store_down_total {s.allowed_store_down}",
        ]
        return ("\n".join(lines) + "\n").encode()


_UNDECODABLE = object()


def _names_digest(names: Sequence[str]) -> bytes:
    """A list's names as a fixed-size key (each length-prefixed, so no two lists share one): keeping
    the names themselves would hold every long list a caller was shown."""
    digest = hashlib.sha256()
    for name in names:
        encoded = name.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.digest()


def _decode(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _UNDECODABLE


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


STORE_PROBE_INTERVAL_S = 5.0


async def reload_loop(gate: Gate) -> None:
    # Polling the bytes is the reliable way to see ConfigMap volume updates (the kubelet swaps a
    # `..data` symlink, which inotify on the file itself does not report).
    loop = asyncio.get_running_loop()
    probed = loop.time()
    while True:
        await asyncio.sleep(gate.config.reload_interval_s)
        if gate.holder.check():
            gate.check_schema()
        if (
            gate.limiter.shared
            and not gate.holder.limits.empty
            and loop.time() - probed >= STORE_PROBE_INTERVAL_S
        ):
            # A shared store that went away (or came back) shows in /readyz and /metrics without
            # waiting for the next metered call.
            probed = loop.time()
            await gate.limiter.check_store()


def refusal_body(parsed: ParsedBody, judgement: Judgement) -> bytes:
    """The answer when nothing is forwarded: every refused request's error, batch-shaped as sent."""
    errors = [
        v.error
        for m, v in zip(parsed.messages, judgement.verdicts, strict=True)
        if v.error is not None and (m.kind in ("request", "invalid"))
    ]
    if parsed.batch:
        return json.dumps(errors).encode()
    return json.dumps(errors[0] if errors else None).encode()


def forwarded_document(parsed: ParsedBody, judgement: Judgement) -> Any:
    kept = [o for o, v in zip(parsed.objects, judgement.verdicts, strict=True) if v.forward]
    if parsed.batch and len(kept) == 1 and judgement.refused:
        # One survivor of a batch goes alone: servers of the 2025-06-18 revision and later refuse
        # batches, and the caller still gets one array (the proxy adds the refusals to the answer).
        return kept[0]
    return kept if parsed.batch else kept[0]


def refused_errors(parsed: ParsedBody, judgement: Judgement) -> list[dict[str, Any]]:
    return [
        v.error
        for m, v in zip(parsed.messages, judgement.verdicts, strict=True)
        if not v.forward and v.error is not None and m.kind in ("request", "invalid")
    ]
