"""Cedar policy text: parse once into a `cedarpy.PolicySet`, with errors that name line and column.

cedarpy reports a syntax error without a position; the position is found here by asking the parser
about prefixes of the text (an LR parser fails at the first bad token), which costs only on error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# A prefix of valid Cedar text fails only with one of these (it ran out of input, it did not go wrong).
_EOF_ERRORS = ("unexpected end of input",)
_TOKEN_ERRORS = ("unexpected token", "invalid token")
_ID_ANNOTATION = "id"


class CedarError(ValueError):
    """Cedar text is not usable; the message names where (origin, line, column) and what is wrong."""


@dataclass(frozen=True)
class CompiledPolicies:
    """One layer's policies, parsed: the handle for evaluation and the facts about each policy."""

    origin: str  # where the text came from: "cluster default", "annotation outrider.dev/policy", ...
    text: str
    policy_set: Any  # cedarpy.PolicySet
    # Cedar's own ids (policy0, ...) -> the id operators see: the `@id("...")` annotation when given.
    ids: dict[str, str]
    effects: dict[str, str]  # Cedar id -> "permit" | "forbid"
    est: dict[str, Any]  # Cedar id -> the policy as JSON (EST), for schema checks

    @property
    def permits(self) -> int:
        return sum(1 for e in self.effects.values() if e == "permit")

    def __len__(self) -> int:
        return len(self.effects)


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    start = text.rfind("\n", 0, offset) + 1
    return line, offset - start + 1


def _parse_error(text: str) -> str | None:
    import cedarpy  # here, not at the top: only a sidecar with policies loads it

    try:
        cedarpy.policies_to_json_str(text)
    except ValueError as exc:
        return str(exc) or "cannot parse"
    return None


def _statement_ends(text: str) -> list[int]:
    """Offsets just past each top-level `;`, skipping strings and `//` comments."""
    ends: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch == "/" and text.startswith("//", i):
            newline = text.find("\n", i)
            i = n if newline == -1 else newline
        elif ch == ";":
            ends.append(i + 1)
        i += 1
    return ends


def locate_error(text: str) -> tuple[int, int, str]:
    """(line, column, message) of the first error in `text` (which does not parse)."""
    message = _parse_error(text) or "cannot parse"
    ends = _statement_ends(text)
    # The first statement whose end makes the text fail: everything before it is fine.
    lo, hi = 0, len(ends)
    while lo < hi:
        mid = (lo + hi) // 2
        if _parse_error(text[: ends[mid]]) is None:
            lo = mid + 1
        else:
            hi = mid
    start = ends[lo - 1] if lo > 0 else 0
    stop = ends[lo] if lo < len(ends) else len(text)
    first = _parse_error(text[:stop]) or message
    # Inside that statement: the longest prefix that only ran out of input; the error is just after.
    good, bad = start, stop
    while bad - good > 1:
        mid = (good + bad) // 2
        error = _parse_error(text[:mid])
        if error is None or error in _EOF_ERRORS:
            good = mid
        else:
            bad = mid
    offset = good
    while offset < len(text) and text[offset].isspace():
        offset += 1
    if not first.startswith(_TOKEN_ERRORS) or offset >= stop:
        # Not a token-level error (an unknown effect, a bad function): point at the statement.
        offset = start
        while offset < len(text) and text[offset].isspace():
            offset += 1
    line, column = _line_col(text, min(offset, len(text)))
    return line, column, first


def compile_policies(text: str, origin: str, *, forbid_only: bool = False) -> CompiledPolicies:
    """Parse `text`; raise `CedarError` naming line/column for syntax, or the policy for `permit`s."""
    import cedarpy  # here, not at the top: only a sidecar with policies loads it

    if not isinstance(text, str):
        raise CedarError(f"{origin}: Cedar policies must be text, not {type(text).__name__}")
    try:
        est = json.loads(cedarpy.policies_to_json_str(text))
        policy_set = cedarpy.PolicySet.from_str(text)
    except ValueError:
        line, column, message = locate_error(text)
        raise CedarError(f"{origin}: line {line}, column {column}: {message}") from None
    if est.get("templates"):
        raise CedarError(f"{origin}: policy templates (?principal/?resource slots) are not supported")
    static: dict[str, Any] = est.get("staticPolicies") or {}
    ids: dict[str, str] = {}
    effects: dict[str, str] = {}
    seen: dict[str, str] = {}
    positions = _statement_starts(text)
    for index, (cedar_id, policy) in enumerate(static.items()):
        annotations = policy.get("annotations") or {}
        shown = annotations.get(_ID_ANNOTATION) or cedar_id
        if shown in seen:
            raise CedarError(f"{origin}: two policies share @id({shown!r}); policy ids must be unique")
        seen[shown] = cedar_id
        ids[cedar_id] = shown
        effects[cedar_id] = str(policy.get("effect"))
        if forbid_only and policy.get("effect") == "permit":
            line, column = positions[index] if index < len(positions) else (1, 1)
            raise CedarError(
                f"{origin}: line {line}, column {column}: policy {shown!r} is a `permit`; this source may "
                "only narrow the operators' policies, so it may hold `forbid` policies only"
            )
    return CompiledPolicies(origin, text, policy_set, ids, effects, static)


def _statement_starts(text: str) -> list[tuple[int, int]]:
    """(line, column) of each statement's first token, in order (annotations included)."""
    starts: list[tuple[int, int]] = []
    begin = 0
    for end in _statement_ends(text):
        chunk = text[begin:end]
        stripped = re.sub(r"//[^\n]*", lambda m: " " * len(m.group(0)), chunk)
        skip = len(stripped) - len(stripped.lstrip())
        starts.append(_line_col(text, begin + skip))
        begin = end
    return starts


PERMIT_ALL = "permit(principal, action, resource);"
