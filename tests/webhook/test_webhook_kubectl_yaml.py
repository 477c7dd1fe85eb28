"""`outrider inject` output means to kubectl exactly what its input meant, checked with kubectl's own reader.

`kubeyaml` (scripts/kubeyaml, built by `scripts/build-upstream.sh kubeyaml` from the Go module proxy)
is apimachinery's NewYAMLOrJSONDecoder over sigs.k8s.io/yaml at the versions k8s v1.34.4 uses: what
`kubectl apply -f` sends to the API server. Every fixture and a generated set of tricky scalars go
through it twice, as input and as `outrider inject` output, and the decoded JSON is compared.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webhook_support import GOLDEN_DIR, fixture_header, fixture_names

from outrider.webhook import kubeyaml
from outrider.webhook.config import WebhookConfig
from outrider.webhook.engine import PROBE_KINDS
from outrider.webhook.offline import TEMPLATE_PATHS, inject_document, render

pytestmark = pytest.mark.kubeyaml

REPO = Path(__file__).resolve().parents[2]
ENABLED = {"outrider.dev/inject": "enabled"}
STATUS = "outrider.dev/status"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"


@cache
def _binary() -> str:
    out = subprocess.run(
        [str(REPO / "scripts" / "build-upstream.sh"), "kubeyaml"], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.fail(f"scripts/build-upstream.sh kubeyaml failed (Go is needed):\n{out.stderr[-2000:]}")
    return str(Path(out.stdout.strip().splitlines()[-1]) / "kubeyaml")


def kubectl_reads(text: str) -> list[dict[str, Any]]:
    """What kubectl makes of a stream: per non-empty document {"json": ...} or {"error": ...}."""
    out = subprocess.run([_binary()], input=text.encode(), capture_output=True, check=True, timeout=60)
    # one JSON document a line: split on \n only (str.splitlines also splits on U+0085 inside strings)
    return [json.loads(line) for line in out.stdout.decode().split("\n") if line]


# --- the tricky scalars ---------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


BOOLS = [
    *_words("y Y yes Yes YES n N no No NO on On ON off Off OFF true True TRUE false False FALSE"),
    *_words("yEs nO oN oFF tRUE fALSE yeS"),  # not booleans to go-yaml: mixed case
]
NUMBERS = [
    *_words("0 -0 +0 00 012 0123 012345678901 08 09 0o17 0O17 0x1F 0X1f 0b101 -0b101 +0x1F -0x1F"),
    *_words("1e3 1E3 1e+3 1e-3 1. 1.5 -1.5 .5 -.5 +1 +.5 .5e3 1e400 -1e400 1e-400 1_000 1__0 _1 1_"),
    *_words("0x_1F 0_12 1_0.5 9223372036854775807 9223372036854775808 -9223372036854775808"),
    *_words("-9223372036854775809 18446744073709551615 18446744073709551616 99999999999999999999"),
    *_words("0.1 -0.0 0.1234567891 3.4e38 123abc 0x 0o 0b 1-2 1.2.3 1e3_0 12e 0.0.1"),
]
SEXAGESIMAL = ["12:30", "1:2:3", "-12:30", "190:20:30.15", "12:30:00", "0:30"]
NULLISH = ["~", "null", "Null", "NULL", "nULL", "None"]
SPECIAL_FLOATS = [".inf", ".Inf", "+.inf", "-.inf", ".nan", ".NaN", "nan", "inf", "NaN", "Infinity"]
DATES = [
    "2024-01-01",
    "2024-1-1",
    "2024-01-01T10:00:00Z",
    "2001-12-14t21:59:43.10-05:00",
    "2001-12-14 21:59:43.10",
]
WORDS = ["<<", "=", "a b", "x#y", "http://x:80", "a: b"]
MULTILINE = [
    "line one\nline two\n",
    "no trailing newline\nsecond",
    "trailing blank lines\n\n\n",
    "  leading spaces\nnext\n",
    "trailing spaces  \nnext  \n",
    "tab\there\nand\ttab\n",
    "yes\nno\n",
    "carriage\r\nreturn\n",
    "unicode é ✓ 🚀\nline\n",
]
PLAIN = BOOLS + NUMBERS + SEXAGESIMAL + NULLISH + DATES + WORDS
# written unquoted these are errors to kubectl as values (NaN and infinities have no JSON)
NOT_JSON = {".inf", ".Inf", "+.inf", "-.inf", ".nan", ".NaN"}
EVERY = PLAIN + SPECIAL_FLOATS + MULTILINE


def _plain(value: str) -> str:
    """`value` unquoted where YAML allows it, else in double quotes."""
    if value in WORDS[1:] or value == "<<":
        return json.dumps(value)
    return value


def _quoted(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _single(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _block(value: str, indent: str) -> str:
    chomp = "+" if value.endswith("\n\n") else ("" if value.endswith("\n") else "-")
    lead = "2" if value.startswith(" ") else ""
    body = value[:-1] if value.endswith("\n") else value
    if chomp == "+":
        body = value
    lines = body.split("\n")
    if chomp == "+":
        lines = lines[:-1]
    return f"|{lead}{chomp}\n" + "\n".join(indent + line if line else "" for line in lines)


def _safe_multiline(value: str) -> bool:
    return "\r" not in value


def tricky_stream() -> str:
    """One stream with every tricky scalar as labels, annotations, env values, ConfigMap data and keys."""
    plain_values = [v for v in PLAIN + SPECIAL_FLOATS if v not in NOT_JSON]
    labels = "\n".join(f"        t{i}: {_plain(v)}" for i, v in enumerate(plain_values))
    labels += "\n" + "\n".join(f"        q{i}: {_quoted(v)}" for i, v in enumerate(EVERY))
    annotations = "\n".join(f"        example.com/p{i}: {_plain(v)}" for i, v in enumerate(plain_values))
    annotations += "\n" + "\n".join(f"        example.com/s{i}: {_single(v)}" for i, v in enumerate(EVERY))
    annotations += "\n" + "\n".join(
        f"        example.com/b{i}: {_block(v, '          ')}"
        for i, v in enumerate(MULTILINE)
        if _safe_multiline(v)
    )
    env = (
        "\n".join(f"        - name: P{i}\n          value: {_plain(v)}" for i, v in enumerate(plain_values))
        + "\n"
        + "\n".join(f"        - name: Q{i}\n          value: {_quoted(v)}" for i, v in enumerate(EVERY))
    )
    data = "\n".join(f"  d{i}: {_plain(v)}" for i, v in enumerate(plain_values))
    data += "\n" + "\n".join(f"  e{i}: {_quoted(v)}" for i, v in enumerate(EVERY))
    data += "\n" + "\n".join(
        f"  m{i}: {_block(v, '    ')}" for i, v in enumerate(MULTILINE) if _safe_multiline(v)
    )
    # keys that look like booleans, numbers, nulls or dates: go-yaml resolves them, sigs.k8s.io/yaml
    # turns them back into strings (`on:` is "true", `0x1F:` is "31", `1e3:` is "1000")
    # (null keys and integers beyond int64 are errors to kubectl: they get documents of their own)
    too_big = ("9223372036854775808", "18446744073709551615")
    key_words = [
        v for v in PLAIN + SPECIAL_FLOATS if v not in ("<<", "~", "null", "Null", "NULL", "a: b", *too_big)
    ]
    # one key per mapping: `y:` and `on:` are both the key true, and two Go keys that print the same
    # (int 0 and float 0.0) would leave the winner to Go's random map order
    keys = "\n".join(
        f"  k{i}: {{{_plain(v)}: v{i}}}" for i, v in enumerate(key_words) if not v.startswith(("-", "+."))
    )
    deployment = f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: tricky
  namespace: tools
  labels: &labels
    app: tricky
    enabled: yes
    version: 012345678901
spec:
  selector:
    matchLabels:
      app: tricky
  template:
    metadata:
      labels:
{labels}
      annotations:
{annotations}
    spec:
      containers:
      - name: app
        image: ghcr.io/example/tricky:1.0
        ports:
        - containerPort: 8080
        env:
{env}
"""
    configmap = f"""\
# comments in documents outrider inject leaves alone survive byte for byte
apiVersion: v1
kind: ConfigMap
metadata:
  name: tricky-data  # a trailing comment
data:
{data}
"""
    keys_map = f"""\
apiVersion: example.com/v1
kind: KeyTest
metadata:
  name: tricky-keys
spec:
{keys}
"""
    anchors = """\
apiVersion: v1
kind: Pod
metadata:
  name: anchors
  labels: &base
    app: anchors
    tier: 0123
    on: off
  annotations:
    <<: *base
    app: overridden-after-merge
    extra: "1e3"
spec:
  containers:
  - &app
    name: app
    image: ghcr.io/example/anchors:1.0
    ports:
    - containerPort: 8080
    env:
    - &envy {name: A, value: y}
    - name: B
      value: 1_000
    - <<: *envy
      name: C
    resources:
      limits: &limits {cpu: 1e3m, memory: 0x10}
      requests:
        cpu: 1.5
        <<: *limits
        memory: 012
"""
    merge_order = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: merge-order
data:
  base: &m {a: "1", b: "2"}
  first:
    a: explicit-before-merge
    <<: *m
  seq:
    <<: [*m, {b: "3", c: "4"}]
  quoted-merge-key:
    "<<": not a merge
"""
    big = """\
apiVersion: v1
kind: Pod
metadata:
  name: big-numbers
  annotations:
    example.com/n: "1"
spec:
  containers:
  - name: app
    image: ghcr.io/example/big:1.0
    ports:
    - containerPort: 8080
    resources:
      limits:
        cpu: 1e3
        memory: 18446744073709551615
        ephemeral-storage: 99999999999999999999
    terminationMessagePath: -0
    workingDir: 12:30
    env:
    - name: NEG_ZERO
      value: -0.0
    - name: NANISH
      value: .NaN-not
"""
    list_doc = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: in-a-list
    labels: {on: y, off: n, "y": "n"}
  spec:
    containers:
    - name: app
      image: ghcr.io/example/list:1.0
      ports: [{containerPort: 8080}]
      env: [{name: X, value: 0o17}, {name: Y, value: "0o17"}]
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: list-data}
  data: {a: 1e3, b: "1e3", c: ~, d: 2024-01-01}
"""
    not_json = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: not-json
data:
  x: .nan
"""
    null_key = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: null-key
data:
  ~: nothing
"""
    uint_key = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: uint-key
data:
  18446744073709551615: too big for a key
"""
    json_like = (
        '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "flow"}, "data": {"a": "yes"}}\n'
    )
    return "---\n".join(
        [
            deployment,
            configmap,
            keys_map,
            anchors,
            merge_order,
            big,
            list_doc,
            not_json,
            null_key,
            uint_key,
            json_like,
        ]
    )


# --- the comparison -------------------------------------------------------------------------------


def as_sent(value: Any) -> Any:
    """`value` as kubectl's JSON spells it and Python reads that back: Go writes floats below 1e21
    without an exponent, so 1.8446744073709552e19 is sent as the integer 18446744073709552000."""
    if isinstance(value, float):
        if value == 0 or 1e-6 <= abs(value) < 1e21:
            return json.loads(format(Decimal(repr(value)), "f"))
        return value
    if isinstance(value, dict):
        return {k: as_sent(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_sent(v) for v in value]
    return value


def _templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") == "List":
        return [t for item in doc.get("items") or [] for t in _templates(item)]
    path = TEMPLATE_PATHS.get(str(doc.get("kind")))
    if path is None:
        return []
    holder: Any = doc
    for key in path:
        holder = holder.get(key) if isinstance(holder, dict) else None
    return [holder] if isinstance(holder, dict) else []


def strip_injected(output: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """`output` without what injection added, to compare with `original` field by field."""
    out, orig = copy.deepcopy(output), copy.deepcopy(original)  # orig: probes popped below
    for template, before in zip(_templates(out), _templates(orig), strict=True):
        annotations = template.get("metadata", {}).get("annotations") or {}
        if STATUS not in annotations or STATUS in (before.get("metadata", {}).get("annotations") or {}):
            continue
        status = json.loads(annotations.pop(STATUS))
        if DEFAULT_CONTAINER not in (before.get("metadata", {}).get("annotations") or {}):
            annotations.pop(DEFAULT_CONTAINER, None)
        _as_before(template["metadata"], "annotations", before.get("metadata", {}))
        spec = template["spec"]
        ours = {*status["initContainers"], *status["containers"]}
        for key in ("initContainers", "containers"):
            spec[key] = [c for c in spec.get(key) or [] if c["name"] not in ours]
            _as_before(spec, key, before["spec"])
        spec["volumes"] = [v for v in spec.get("volumes") or [] if v["name"] not in status["volumes"]]
        _as_before(spec, "volumes", before["spec"])
        pulls = set(status.get("imagePullSecrets") or [])  # the operator's image_pull_secrets
        spec["imagePullSecrets"] = [
            s for s in spec.get("imagePullSecrets") or [] if s.get("name") not in pulls
        ]
        _as_before(spec, "imagePullSecrets", before["spec"])
        for init in spec.get("initContainers") or []:  # a native sidecar may serve the MCP port
            for kind in PROBE_KINDS:
                if (init.get(kind) or {}).get("httpGet", {}).get("port") == 15020:
                    init.pop(kind)
        for container, old in zip(spec["containers"], before["spec"]["containers"], strict=True):
            names = {e.get("name") for e in old.get("env") or []}
            if container.get("env") != old.get("env") and isinstance(container.get("env"), list):
                # Outrider appends its own variables (explicit egress mode) after the app's
                container["env"] = [e for e in container["env"] if e.get("name") in names]
                _as_before(container, "env", old)
            for kind in PROBE_KINDS:  # probes on the MCP port now go through the sidecar's admin port
                if (container.get(kind) or {}).get("httpGet", {}).get("port") == 15020:
                    container.pop(kind)
                    old.pop(kind, None)
            delay = status.get("appStopDelaySeconds")
            lifecycle = container.get("lifecycle") or {}
            if (
                delay
                and lifecycle.get("preStop") == {"sleep": {"seconds": delay}}
                and not ((old.get("lifecycle") or {}).get("preStop"))
            ):  # the app's SIGTERM held back while the endpoints drain
                lifecycle.pop("preStop")
                if not lifecycle:
                    container.pop("lifecycle")
                    _as_before(container, "lifecycle", old)
    return out


def check_stream(
    text: str, labels: dict[str, str], config: WebhookConfig, ns_annotations: dict[str, str]
) -> int:
    """Assert the output of `outrider inject` means to kubectl what the input meant; return #injected."""
    # our reader agrees with kubectl's, document by document (errors included)
    ours = kubeyaml.read_stream(text)
    theirs = kubectl_reads(text)
    assert len(ours) == len(theirs), (len(ours), theirs)
    for mine, real in zip(ours, theirs, strict=True):
        if "error" in real:
            assert mine.error is not None, (
                f"kubectl refuses this document ({real['error']}), we read {mine.value}"
            )
        else:
            assert mine.error is None, f"kubectl reads {real['json']}, we fail: {mine.error}"
            assert as_sent(mine.value) == real["json"]
    output, _ = render(ours, labels, config, None, ns_annotations, err=io.StringIO())
    printed = kubectl_reads(output)
    assert all("json" in p for p in printed), [p for p in printed if "error" in p]
    # expected: kubectl's reading of each input document, injected by the engine, refusals left out
    expected: list[Any] = []
    originals: list[Any] = []
    injected = 0
    for real in theirs:
        if "error" in real:
            continue
        result = inject_document(copy.deepcopy(real["json"]), labels, config, None, ns_annotations)
        if result.document is not None:
            expected.append(json.loads(json.dumps(result.document)))
            originals.append(real["json"])
            injected += result.injected
    assert [p["json"] for p in printed] == expected
    # and independently of the engine: everything injection did not add is what the input said
    for out, original in zip(printed, originals, strict=True):
        assert strip_injected(out["json"], original) == _without_rewritten_probes(original, out["json"])
    return injected


def _as_before(holder: dict[str, Any], key: str, before: dict[str, Any]) -> None:
    """An emptied list or map goes back to what the input had there: absent, null or empty."""
    if holder.get(key):
        return
    if key not in before:
        holder.pop(key, None)
    elif before[key] is None:
        holder[key] = None


def _without_rewritten_probes(original: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
    orig = copy.deepcopy(original)
    for template, after in zip(_templates(orig), _templates(output), strict=True):
        annotations = after.get("metadata", {}).get("annotations") or {}
        if STATUS not in annotations or STATUS in (template.get("metadata", {}).get("annotations") or {}):
            continue  # not injected by this run
        status = json.loads(annotations[STATUS])
        ours = {*status["initContainers"], *status["containers"]}
        for key in ("containers", "initContainers"):  # app containers and native sidecars
            app = [c for c in after["spec"].get(key) or [] if c["name"] not in ours]
            for container, new in zip(template["spec"].get(key) or [], app, strict=False):
                for kind in PROBE_KINDS:
                    if (new.get(kind) or {}).get("httpGet", {}).get("port") == 15020 and kind in container:
                        container.pop(kind)
    return orig


@pytest.mark.parametrize("name", fixture_names())
def test_golden_fixture_means_the_same_to_kubectl(name: str) -> None:
    labels, ns_annotations, config = fixture_header(name)
    check_stream((GOLDEN_DIR / f"{name}.yaml").read_text(), labels, config, ns_annotations)


def test_tricky_scalars_mean_the_same_to_kubectl() -> None:
    injected = check_stream(tricky_stream(), ENABLED, WebhookConfig(), {})
    assert injected >= 4  # the Deployment, both Pods and the Pod inside the List were injected


def test_tricky_scalars_are_read_as_kubectl_reads_them() -> None:
    """Spot checks that name the difference from PyYAML's YAML 1.1 rules."""
    read = [d.value for d in kubeyaml.read_stream(tricky_stream()) if d.error is None]
    docs = {d["metadata"]["name"]: d for d in read if "metadata" in d}
    docs.update({i["metadata"]["name"]: i for d in read for i in d.get("items") or []})
    pod = docs["anchors"]
    assert pod["metadata"]["labels"] == {"app": "anchors", "tier": 83, "true": False}  # 0123 is octal
    # go-yaml applies `<<` where it stands: keys after it win, keys before it lose
    assert pod["metadata"]["annotations"]["app"] == "overridden-after-merge"
    assert docs["merge-order"]["data"]["first"] == {"a": "1", "b": "2"}
    assert docs["merge-order"]["data"]["seq"] == {"a": "1", "b": "2", "c": "4"}
    assert docs["merge-order"]["data"]["quoted-merge-key"] == {"<<": "not a merge"}
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env == {"A": True, "B": 1000, "C": True}
    big = docs["big-numbers"]["spec"]["containers"][0]
    assert big["workingDir"] == "12:30"  # no sexagesimal in go-yaml (PyYAML: 750)
    assert big["resources"]["limits"]["memory"] == 18446744073709551615
    assert isinstance(big["resources"]["limits"]["ephemeral-storage"], float)
    assert docs["in-a-list"]["metadata"]["labels"] == {"true": True, "false": False, "y": "n"}
    assert docs["list-data"]["data"] == {"a": 1000.0, "b": "1e3", "c": None, "d": "2024-01-01"}
    keys = {k: v for one in docs["tricky-keys"]["spec"].values() for k, v in one.items()}
    assert "true" in keys and "false" in keys and "on" not in keys and "y" not in keys
    assert "31" in keys and "83" in keys and "1000" in keys and "12:30" in keys and "0.12345679" in keys


def test_output_quotes_what_any_yaml_reader_would_retype(tmp_path: Path) -> None:
    """A string that YAML 1.1 or 1.2 reads as another type is quoted even where go-yaml would not."""
    values = {"a": "12:30", "b": "0o17", "c": "2024-01-01", "d": "1_000", "e": "yEs", "f": "plain"}
    text = kubeyaml.dump(values)
    assert "a: '12:30'" in text and "b: '0o17'" in text and "c: '2024-01-01'" in text
    assert "d: '1_000'" in text and "f: plain" in text
    assert kubectl_reads(text) == [{"json": values}]


def test_alias_bombs_are_refused_as_kubectl_refuses_them() -> None:
    """A billion-laughs document: kubectl (go-yaml) refuses it, and so does inject, quickly."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
    bomb = "\n".join(levels) + "\n"
    assert "excessive aliasing" in kubectl_reads(bomb)[0]["error"]
    [document] = kubeyaml.read_stream(bomb)
    assert document.error == "document contains excessive aliasing"
    # ordinary reuse of an anchor is fine for both
    reuse = "a: &a {x: 1, y: [1, 2, 3]}\n" + "".join(f"b{i}: *a\n" for i in range(50))
    assert kubeyaml.read_stream(reuse)[0].value == kubectl_reads(reuse)[0]["json"]


def test_deep_nesting_is_a_clear_error_not_a_crash() -> None:
    deep = "x: " + "[" * 600 + "]" * 600 + "\n"
    [document] = kubeyaml.read_stream(deep)
    assert document.error is not None and "nested too deeply" in document.error
    blocks = "x:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 1200))
    assert kubeyaml.read_stream(blocks)[0].error is not None


# random scalars made of the characters that decide a plain scalar's type, one per document (so a
# scalar kubectl cannot read fails only its own document), as a value and as a key
_SCALAR_CHARS = "0123456789+-._eExXoObBaAfFyYnNlLsStTrRuU~:"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(_SCALAR_CHARS, min_size=1, max_size=12), min_size=1, max_size=120))
def test_random_plain_scalars_read_and_write_like_kubectl(scalars: list[str]) -> None:
    docs = [f"v: {s}\n" for s in scalars] + [
        f"{s}: k\n" for s in scalars if not s.startswith(("-", "?", ":"))
    ]
    stream = "---\n".join(docs)
    ours = kubeyaml.read_stream(stream)
    theirs = kubectl_reads(stream)
    assert len(ours) == len(theirs)
    readable = []
    for mine, real, text in zip(ours, theirs, docs, strict=True):
        assert (mine.error is None) == ("json" in real), (text, mine.error, real)
        if mine.error is None:
            assert as_sent(mine.value) == real["json"], text
            readable.append(mine.value)
    if readable:
        written = "---\n".join(kubeyaml.dump(v) for v in readable)
        assert [r["json"] for r in kubectl_reads(written)] == [as_sent(v) for v in readable]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=40), min_size=1, max_size=60))
def test_any_string_is_written_so_kubectl_reads_it_back(strings: list[str]) -> None:
    """Control characters, line breaks of every kind, leading/trailing spaces, unicode: still strings."""
    documents = [{"data": {"k": s, s: "key"}} for s in strings]
    written = "---\n".join(kubeyaml.dump(d) for d in documents)
    assert [r.get("json") for r in kubectl_reads(written)] == documents
    assert [d.value for d in kubeyaml.read_stream(written)] == documents
    # and read the way kubectl reads them when written as double-quoted YAML (JSON escapes)
    quoted = "---\n".join(f"data:\n  k: {json.dumps(s, ensure_ascii=False)}\n" for s in strings)
    ours = [d.value if d.error is None else "error" for d in kubeyaml.read_stream(quoted)]
    assert ours == [r.get("json", "error") for r in kubectl_reads(quoted)]


@pytest.mark.parametrize(
    "stream",
    [
        '{"kind": "ConfigMap", "data": {"a": "yes"}}{"kind": "Secret"}',
        '{"a": 1}\n---\nb: 2\n',
        '{"a": 1e3, "b": 12345678901234567890123, "c": "x\\/y"}',
        '{"a": 1}\n{"b": yes}\n',  # one JSON value, then kubectl reads the rest as YAML
        '{"a": 1}  \n  c: on\n',
        '{"a": 1}\nnull\n{"b": 1}\nx: 1\n',  # two JSON values: the stream stays JSON, `x: 1` is an error
        '  {"a": [1, 2,}\nx: y\n',
    ],
)
def test_json_and_mixed_streams_are_read_like_kubectl(stream: str) -> None:
    ours = [as_sent(d.value) if d.error is None else "error" for d in kubeyaml.read_stream(stream)]
    theirs = [r.get("json", "error") for r in kubectl_reads(stream)]
    if "error" in ours:  # kubectl stops at the first error; our helper keeps reporting it
        theirs = theirs[: ours.index("error") + 1]
    assert ours == theirs


def test_float_keys_are_spelt_as_sigs_yaml_spells_them() -> None:
    """Float keys go through float32 formatting in sigs.k8s.io/yaml (`0.1234567891:` is "0.12345679")."""
    keys = ["3.4028235e38", "3.4028236e38", "3.45e38", "-3.45e38", "1e-50", "-0.0", "1e300", "123456.7"]
    keys += ["1234567.8", "0.0001", "0.00001", "1.5e-7", ".5", "1e6", "999999.9", "1_0.25", "0.1234567891"]
    stream = "---\n".join(f"{k}: v\n" for k in keys)
    assert [as_sent(d.value) for d in kubeyaml.read_stream(stream)] == [
        r["json"] for r in kubectl_reads(stream)
    ]


@pytest.mark.parametrize(
    "stream",
    [
        'a: "1\u2028---"\nb: 2\n',  # only \n ends a line for kubectl's reader
        "a: 1\r---\r\nb: 2\n",
        "a: 1\r\n---\r\nb: 2\r\n",
        "a: |\n  x\n---\nb: 2",
        "a: 1\n--- # a comment may follow\nb: 2\n---\n",
        "---\n---\na: 1\n...\n---\nb: 2\n",
    ],
)
def test_document_separators_split_like_kubectl(stream: str) -> None:
    ours = [as_sent(d.value) if d.error is None else "error" for d in kubeyaml.read_stream(stream)]
    assert ours == [r.get("json", "error") for r in kubectl_reads(stream)]
