"""Each MCP server's own protected resource URI: the operator's template and allowed patterns, per pod.

Pure: expands `resource_template` / `resource_patterns` with a pod's facts and checks the app team's
`outrider.dev/resource` choice against the patterns. No I/O; the engine and the config parser call it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# Placeholders an operator may use. `{app}` is the pod's app.kubernetes.io/name label (else `app`).
PLACEHOLDERS = ("namespace", "service_account", "app", "base_url")
APP_LABELS = ("app.kubernetes.io/name", "app")
_TOKEN = re.compile(r"\{([^{}]*)\}|\*")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# Every value put into a URL is one DNS label: no dots or slashes, so one pod's facts can never
# spell another namespace's host name or path (`{app}` = "x.other-ns" would).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_WILDCARD = "[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
# Sample facts that make a template expand at load time, to check that it gives a URL.
_SAMPLE = {"namespace": "ns", "service_account": "sa", "app": "app"}


class ResourceError(ValueError):
    """A template, a pattern or a pod's facts do not give a resource URI; the message says which."""


@dataclass(frozen=True)
class PodFacts:
    namespace: str
    service_account: str
    labels: Mapping[str, str]


def placeholders(template: str) -> list[str]:
    """The placeholder names in `template` (`label:KEY` for `{label:KEY}`), `*` for wildcards."""
    return [m.group(1) if m.group(1) is not None else "*" for m in _TOKEN.finditer(template)]


def check_template(template: str, key: str, *, base_url: str | None, wildcards: bool) -> None:
    """Load-time check: known placeholders only, and a sample expansion is an absolute http(s) URL."""
    for name in placeholders(template):
        if name == "*":
            if not wildcards:
                raise ResourceError(f"{key}: {template!r} may not contain '*' (only resource_patterns may)")
            continue
        if name.startswith("label:"):
            if not _LABEL_KEY.match(name[len("label:") :]):
                raise ResourceError(f"{key}: {{{name}}} does not name a label key")
            continue
        if name not in PLACEHOLDERS:
            raise ResourceError(
                f"{key}: unknown placeholder {{{name}}} in {template!r}; allowed: "
                + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                + ", {label:KEY}"
            )
        if name == "base_url" and not base_url:
            raise ResourceError(f"{key}: {template!r} uses {{base_url}} but resource_base_url is not set")
    _check_url(sample(template, base_url), f"{key}: {template!r} expands to")


def sample(template: str, base_url: str | None) -> str:
    """`template` expanded with sample facts (to check a whole config at load time)."""
    return _substitute(template, lambda name: "sample" if name.startswith("label:") else None, base_url, "x")


def check_base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
        raise ResourceError(
            f"resource_base_url: {value!r} must be an absolute http(s) URL without query or fragment "
            "(for example https://mcp.example.com)"
        )
    return value.rstrip("/")


def expand(template: str, pod: PodFacts, base_url: str | None, key: str) -> str:
    """`template` with the pod's facts; ResourceError naming the fact when one is missing or unsafe."""

    def fact(name: str) -> str:
        return _fact(name, pod, key)

    url = _substitute(template, fact, base_url, None)
    _check_url(url, f"{key} gives")
    return url


def matches(value: str, pattern: str, pod: PodFacts, base_url: str | None, key: str) -> bool:
    """Whether `value` is one of the URIs `pattern` allows for this pod (`*`: one DNS label)."""
    try:
        regex = _substitute(pattern, lambda name: _fact(name, pod, key), base_url, _WILDCARD, escape=True)
    except ResourceError:
        return False  # the pattern needs a fact this pod lacks: it allows nothing here
    return re.fullmatch(regex, value) is not None


def describe(pattern: str, pod: PodFacts, base_url: str | None) -> str | None:
    """`pattern` with this pod's facts filled in and `*` kept (for messages); None if it cannot apply."""
    try:
        return _substitute(pattern, lambda name: _fact(name, pod, "resource_patterns"), base_url, "*")
    except ResourceError:
        return None


def _fact(name: str, pod: PodFacts, key: str) -> str:
    if name == "namespace":
        value, what = pod.namespace, "the pod's namespace"
    elif name == "service_account":
        value, what = pod.service_account, "the pod's service account"
    elif name == "app":
        found = next((pod.labels[k] for k in APP_LABELS if isinstance(pod.labels.get(k), str)), None)
        if found is None:
            raise ResourceError(
                f"{key} uses {{app}} but the pod has neither label {' nor '.join(APP_LABELS)}; "
                "add the label app.kubernetes.io/name"
            )
        value, what = found, f"label {next(k for k in APP_LABELS if k in pod.labels)}"
    else:  # label:KEY
        label = name[len("label:") :]
        found = pod.labels.get(label)
        if not isinstance(found, str):
            raise ResourceError(f"{key} uses {{{name}}} but the pod has no label {label}")
        value, what = found, f"label {label}"
    if not _DNS_LABEL.match(value):
        raise ResourceError(
            f"{key}: {what} is {value!r}, which cannot be part of the resource URI (a DNS label is needed: "
            "lowercase letters, digits and '-', at most 63 characters)"
        )
    return value


def _substitute(
    template: str,
    fact: Callable[[str], str | None],
    base_url: str | None,
    wildcard: str | None,
    *,
    escape: bool = False,
) -> str:
    out: list[str] = []
    position = 0
    for match in _TOKEN.finditer(template):
        literal = template[position : match.start()]
        out.append(re.escape(literal) if escape else literal)
        position = match.end()
        name = match.group(1)
        if name is None:  # '*'
            if wildcard is None:
                raise ResourceError(f"{template!r}: '*' is only allowed in resource_patterns")
            out.append(wildcard)
            continue
        if name == "base_url":
            if not base_url:
                raise ResourceError(f"{template!r} uses {{base_url}} but resource_base_url is not set")
            out.append(re.escape(base_url) if escape else base_url)
            continue
        value = fact(name) or _SAMPLE.get(name, "sample")
        out.append(re.escape(value) if escape else value)
    tail = template[position:]
    out.append(re.escape(tail) if escape else tail)
    return "".join(out)


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or parts.fragment
        or any(ch.isspace() or ch in "\"'<>\\" for ch in url)
    ):
        raise ResourceError(f"{where} {url!r}, which is not an absolute http(s) URL without a fragment")
