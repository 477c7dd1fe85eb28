"""Read manifests the way kubectl reads them and write YAML that kubectl reads back unchanged.

kubectl splits a stream on `---` lines (apimachinery's YAMLReader) and converts each document with
sigs.k8s.io/yaml, i.e. go-yaml v2: YAML 1.1 booleans (`y`, `on`, `No`), Go's integer syntax (`0x1F`,
`0o17`, `012` is octal 10, `1_000`), no sexagesimal numbers, timestamps kept as strings, merge keys
applied in document order, and non-string keys turned into strings. PyYAML's YAML 1.1 rules differ
in each of these, so this module resolves plain scalars with go-yaml v2's rules and quotes every
string that go-yaml v2, YAML 1.1 or YAML 1.2 would read as anything but that string.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_LONG = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL = (_LONG + t for t in ("str", "int", "float", "bool", "null"))
TIMESTAMP, BINARY, MERGE, MAP, SEQ = (_LONG + t for t in ("timestamp", "binary", "merge", "map", "seq"))
_PLAIN = "tag:outrider.dev,2026:plain"  # an untagged plain scalar, resolved later by go-yaml's rules
_AMBIGUOUS = "tag:outrider.dev,2026:ambiguous"  # a string some YAML reader takes for something else
_RESOLVABLE = {STR, BOOL, INT, FLOAT, NULL, TIMESTAMP}
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1

_TRUE = ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")
_FALSE = ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")
_MAPPED: dict[str, tuple[str, Any]] = {
    **dict.fromkeys(_TRUE, (BOOL, True)),
    **dict.fromkeys(_FALSE, (BOOL, False)),
    **dict.fromkeys(("", "~", "null", "Null", "NULL"), (NULL, None)),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), (FLOAT, math.nan)),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), (FLOAT, math.inf)),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), (FLOAT, -math.inf)),
    "<<": (MERGE, "<<"),
}
_HINT = {**dict.fromkeys("+-", "S"), **dict.fromkeys("0123456789", "D"), **dict.fromkeys("yYnNtTfFoO~", "M")}
_HINT["."] = "."
_GO_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
# What Go's strconv.ParseFloat accepts from a scalar that starts with '.' (underscores need a base prefix).
_GO_PARSE_FLOAT = re.compile(r"^\.[0-9]+([eE][-+]?[0-9]+)?$")


class KubeYAMLError(ValueError):
    """A document kubectl could not turn into JSON (or that we cannot write so kubectl reads it back)."""


def _go_parse_uint(text: str, base: int) -> int | None:
    """strconv.ParseUint(text, base, 64) (underscores already removed); None on any error."""
    if base == 0:
        base = 10
        if text[:1] == "0":
            prefix = text[1:2].lower()
            if len(text) >= 3 and prefix in ("b", "o", "x"):
                base, text = {"b": 2, "o": 8, "x": 16}[prefix], text[2:]
            else:
                base, text = 8, text[1:]
                if not text:
                    return 0
    if not text:
        return None
    value = 0
    for ch in text:
        low = ch.lower()
        if "0" <= ch <= "9":
            digit = ord(ch) - 48
        elif "a" <= low <= "z":
            digit = ord(low) - 87
        else:
            return None
        if digit >= base:
            return None
        value = value * base + digit
    return value if value <= _UINT64_MAX else None


def _go_parse_int(text: str, base: int) -> int | None:
    """strconv.ParseInt(text, base, 64); None on any error."""
    if not text:
        return None
    negative = text[0] == "-"
    magnitude = _go_parse_uint(text[1:] if text[0] in "+-" else text, base)
    if magnitude is None:
        return None
    value = -magnitude if negative else magnitude
    return value if -(2**63) <= value <= _INT64_MAX else None


def _go_parse_float(text: str) -> float | None:
    """strconv.ParseFloat(text, 64) for decimal text; None when Go reports an error (overflow)."""
    value = float(text)
    return None if math.isinf(value) else value


def go_resolve(tag: str, text: str) -> tuple[str, Any]:
    """go-yaml v2's `resolve`: the tag and value a plain (or tagged) scalar decodes to."""
    if tag and tag not in _RESOLVABLE:
        return tag, text
    rtag, value = _resolve_plain(tag, text)
    if tag in ("", rtag, STR, BINARY):
        return rtag, value
    if tag == FLOAT and rtag == INT:
        return FLOAT, float(value)
    raise KubeYAMLError(f"cannot decode {_short(rtag)} `{text}` as a {_short(tag)}")


def _short(tag: str) -> str:
    return "!!" + tag[len(_LONG) :] if tag.startswith(_LONG) else tag


def _resolve_plain(tag: str, text: str) -> tuple[str, Any]:
    hint = _HINT.get(text[:1], "") if text else "N"
    if not hint or tag in (STR, BINARY):
        return STR, text
    if text in _MAPPED:
        return _MAPPED[text]
    if hint == "." and _GO_PARSE_FLOAT.match(text):
        number = _go_parse_float(text)
        if number is not None:
            return FLOAT, number
    if hint in ("D", "S"):
        # go-yaml first tries a timestamp (YYYY-...), which decodes to its text: no number looks like one
        if tag == TIMESTAMP:
            return TIMESTAMP, text
        plain = text.replace("_", "")
        signed = _go_parse_int(plain, 0)
        if signed is not None:
            return INT, signed
        unsigned = _go_parse_uint(plain, 0)
        if unsigned is not None:
            return INT, unsigned
        if _GO_FLOAT.match(plain):
            number = _go_parse_float(plain)
            if number is not None:
                return FLOAT, number
        if plain.startswith("0b"):
            binary = _go_parse_int(plain[2:], 2)
            if binary is None:
                binary = _go_parse_uint(plain[2:], 2)
            if binary is not None:
                return INT, binary
        elif plain.startswith("-0b"):
            binary = _go_parse_int("-" + plain[3:], 2)
            if binary is not None:
                return INT, binary
    return STR, text


# --- reading -------------------------------------------------------------------------------------


class _Resolver(yaml.resolver.BaseResolver):
    """Marks untagged plain scalars for go-yaml's rules; everything else keeps its own tag."""

    def resolve(self, kind: type[Node], value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is ScalarNode:
            return _PLAIN if implicit[0] else STR
        return SEQ if kind is SequenceNode else MAP


if yaml.__with_libyaml__:  # libyaml (which go-yaml v2 is a port of) parses and composes
    from yaml.cyaml import CParser as _CParser  # type: ignore[attr-defined]

    class _Composer(_CParser, _Resolver):  # type: ignore[misc]
        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            _Resolver.__init__(self)

else:  # pragma: no cover - PyYAML built without libyaml

    class _Composer(  # type: ignore[no-redef]
        yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _Resolver
    ):
        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            _Resolver.__init__(self)


@dataclass(frozen=True)
class Document:
    """One document of a manifest stream: its text (None for JSON streams) and what kubectl reads."""

    text: str | None
    value: Any = None  # JSON-shaped: dict with str keys, list, str, int, float, bool, None
    error: str | None = None


def split_documents(text: str) -> Iterator[str]:
    """apimachinery's YAMLReader: a line starting with `---` ends a document (only a comment may follow)."""
    chunk: list[str] = []
    # only "\n" ends a line for kubectl's LineReader (str.splitlines would also split on \r, U+2028...)
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    for number, line in enumerate(filter(None, lines), 1):
        if line.startswith("---"):
            rest = line[3:].strip()
            if rest and not rest.startswith("#"):
                raise KubeYAMLError(
                    f"line {number}: {line.rstrip()!r}: kubectl allows only a comment after a --- "
                    "document separator; put the content on the next line"
                )
            if chunk:
                yield "".join(chunk)
            chunk = []
            continue
        chunk.append(line)
    if chunk:
        yield "".join(chunk)


def read_stream(text: str) -> list[Document]:
    """Every non-empty document of a manifest stream as kubectl reads it, in order."""
    if text.lstrip(" \t\r\n")[:1] == "{":
        return _read_json_stream(text)
    return _read_yaml_stream(text)


def _read_yaml_stream(text: str) -> list[Document]:
    documents = []
    for chunk in split_documents(text):
        try:
            value = load(chunk)
        except KubeYAMLError as exc:
            documents.append(Document(chunk, error=str(exc)))
            continue
        if value is not None:
            documents.append(Document(chunk, value))
    return documents


def _read_json_stream(text: str) -> list[Document]:
    """kubectl's JSON path: concatenated JSON values; after at most one, a stream may turn to YAML."""
    decoder = json.JSONDecoder()
    documents: list[Document] = []
    count = 0
    consumed = 0  # just after the last JSON value decoded
    while True:
        position = consumed
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position == len(text):
            return documents
        try:
            value, consumed = decoder.raw_decode(text, position)
        except ValueError as exc:
            if count > 1:
                return [*documents, Document(None, error=f"not valid JSON: {exc}")]
            # apimachinery rewinds, drops white space up to the first line break and reads YAML on
            rest = text[consumed:]
            stripped = rest.lstrip(" \t\r")
            rest = stripped[1:] if stripped.startswith("\n") else stripped
            return [*documents, *_read_yaml_stream(rest)]
        count += 1
        if value is not None:
            documents.append(Document(None, value))


def load(text: str) -> Any:
    """The first YAML document in `text` as sigs.k8s.io/yaml turns it into JSON (None when empty)."""
    composer = None
    try:
        composer = _Composer(text)
        node = composer.get_node() if composer.check_node() else None
    except yaml.YAMLError as exc:
        raise KubeYAMLError(f"not valid YAML: {' '.join(str(exc).split())}") from None
    finally:
        if composer is not None:
            composer.dispose()
    if node is None:
        return None
    try:
        return _Builder().value(node)
    except RecursionError:
        raise KubeYAMLError("the document is nested too deeply") from None


class _Builder:
    """go-yaml v2's decoder into interface{} followed by sigs.k8s.io/yaml's conversion to JSON."""

    def __init__(self) -> None:
        self.decodes = 0
        self.aliased = 0
        self.alias_depth = 0
        self.seen: set[int] = set()
        self.active: set[int] = set()

    def value(self, node: Node, key: bool = False) -> Any:
        if id(node) in self.active:
            raise KubeYAMLError(f"anchor value contains itself (line {node.start_mark.line + 1})")
        if id(node) in self.seen:
            # An alias (PyYAML shares the anchored node): go-yaml counts its expansion against the
            # excessive-aliasing limit. Inside an expansion every node was seen before, so only the
            # outermost alias counts as a node of its own (nested ones are counted as expanded nodes).
            if self.alias_depth == 0:
                self.decodes += 1
            self.alias_depth += 1
            try:
                return self._value(node, key)
            finally:
                self.alias_depth -= 1
        self.seen.add(id(node))
        return self._value(node, key)

    def _value(self, node: Node, key: bool) -> Any:
        self._count()
        if isinstance(node, ScalarNode):
            return self._scalar(node, key)
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [self.value(item) for item in node.value]
            assert isinstance(node, MappingNode)
            return self._mapping(node)
        finally:
            self.active.discard(id(node))

    def _count(self) -> None:
        self.decodes += 1
        if self.alias_depth > 0:
            self.aliased += 1
        if (
            self.aliased > 100
            and self.decodes > 1000
            and self.aliased / self.decodes > _alias_ratio(self.decodes)
        ):
            raise KubeYAMLError("document contains excessive aliasing")

    def _scalar(self, node: ScalarNode, key: bool) -> Any:
        text = node.value
        if node.tag == _PLAIN:
            tag, value = go_resolve("", text)
        elif node.tag == STR:
            return text
        else:
            tag, value = go_resolve(node.tag, text)
        if tag == BINARY:
            try:
                raw = base64.b64decode(text.replace("\n", "").replace("\r", ""), validate=True)
            except (binascii.Error, ValueError):
                raise KubeYAMLError("!!binary value contains invalid base64 data") from None
            return raw.decode("utf-8", "replace")
        if tag in (TIMESTAMP, MERGE) or tag not in _RESOLVABLE:
            return text  # timestamps stay strings in interface{}; unknown tags keep the text
        if isinstance(value, float) and not math.isfinite(value) and not key:
            raise KubeYAMLError(
                f"json: unsupported value: {text} (line {node.start_mark.line + 1}); quote it to mean "
                "a string"
            )
        return value

    def _mapping(self, node: MappingNode) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if _is_merge(key_node):
                self._merge(value_node, out)
                continue
            key = self._key(key_node)
            out[key] = self.value(value_node)
        return out

    def _merge(self, node: Node, out: dict[str, Any]) -> None:
        # go-yaml v2 writes merged keys when it meets `<<`: they replace keys set before it
        if isinstance(node, MappingNode):
            out.update(self.value(node))
        elif isinstance(node, SequenceNode):
            for item in reversed(node.value):  # earlier mappings take precedence
                if not isinstance(item, MappingNode):
                    raise KubeYAMLError("map merge requires map or sequence of maps as the value")
                out.update(self.value(item))
        else:
            raise KubeYAMLError("map merge requires map or sequence of maps as the value")

    def _key(self, node: Node) -> str:
        if not isinstance(node, ScalarNode):
            self.value(node)
            raise KubeYAMLError(f"invalid map key at line {node.start_mark.line + 1}: a map or list")
        key = self.value(node, key=True)
        if isinstance(key, str):
            return key
        if isinstance(key, bool):
            return "true" if key else "false"
        if isinstance(key, int) and key <= _INT64_MAX:
            return str(key)
        if isinstance(key, float):
            return go_float32_key(key)
        raise KubeYAMLError(
            f"unsupported map key {node.value!r} at line {node.start_mark.line + 1} (kubectl cannot "
            "convert it to a JSON key); quote it"
        )


def _is_merge(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.value == "<<" and node.tag in (_PLAIN, MERGE)


def _alias_ratio(decodes: int) -> float:
    low, high = 400_000, 4_000_000
    if decodes <= low:
        return 0.99
    if decodes >= high:
        return 0.10
    return 0.99 - 0.89 * ((decodes - low) / (high - low))


def go_float32_key(value: float) -> str:
    """strconv.FormatFloat(value, 'g', -1, 32): how sigs.k8s.io/yaml spells a float map key."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    try:  # Go converts to float32 first; what rounds beyond float32's range is infinite
        single = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        single = value * math.inf
    if math.isinf(single):
        return ".inf" if value > 0 else "-.inf"
    if single == 0:
        return "-0" if math.copysign(1, single) < 0 else "0"
    for digits in range(1, 10):
        text = f"{single:.{digits - 1}e}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == single:
            break
    mantissa, _, exponent = text.partition("e")
    exp = int(exponent)
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    if exp < -4 or exp >= 6:
        sign = "-" if exp < 0 else "+"
        return f"{mantissa}e{sign}{abs(exp):02d}"
    return format(Decimal(f"{mantissa}e{exp}"), "f")


# --- writing -------------------------------------------------------------------------------------

_YAML11: Any = yaml.resolver.Resolver()
_CORE12 = (
    re.compile(r"^(null|Null|NULL|~|true|True|TRUE|false|False|FALSE)$"),
    re.compile(r"^[-+]?[0-9]+$|^0o[0-7]+$|^0x[0-9a-fA-F]+$"),
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
)


def plain_means_string(text: str) -> bool:
    """Whether `text` written plain reads back as this string to go-yaml v2, YAML 1.1 and YAML 1.2."""
    tag, _ = _resolve_plain("", text)
    if tag != STR:
        return False
    if _YAML11.resolve(ScalarNode, text, (True, False)) != STR:
        return False
    return not any(pattern.match(text) for pattern in _CORE12)


# libyaml's emitter when present (several times faster); the representing and resolving stay ours
_BaseDumper: Any = yaml.CSafeDumper if yaml.__with_libyaml__ else yaml.SafeDumper


class _Dumper(_BaseDumper):  # type: ignore[misc]
    """SafeDumper whose idea of 'this plain scalar is a string' is `plain_means_string`."""

    def resolve(self, kind: type[Node], value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is ScalarNode and implicit[0]:
            tag, _ = _resolve_plain("", value)
            if tag == STR and not plain_means_string(value):
                return _AMBIGUOUS
            return tag
        return STR if kind is ScalarNode else (SEQ if kind is SequenceNode else MAP)

    def ignore_aliases(self, data: Any) -> bool:
        # The engine shares objects (e.g. resources); anchors and aliases would only confuse readers.
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> ScalarNode:
    # Literal blocks for multi-line text, unless it holds breaks YAML 1.1 and 1.2 disagree about.
    style = "|" if "\n" in data.rstrip("\n") else None
    if any(ch in data for ch in "\r\x85\u2028\u2029"):
        style = '"'
    return dumper.represent_scalar(STR, data, style=style)


def _represent_int(dumper: yaml.SafeDumper, data: int) -> ScalarNode:
    if not -(2**63) <= data <= _UINT64_MAX:
        raise KubeYAMLError(f"the integer {data} has no YAML spelling kubectl reads back as that integer")
    return dumper.represent_int(data)


def _represent_float(dumper: yaml.SafeDumper, data: float) -> ScalarNode:
    if not math.isfinite(data):
        raise KubeYAMLError(f"{data} cannot be sent as JSON by kubectl")
    text = repr(data)
    if "e" in text and "." not in text.split("e")[0]:
        text = text.replace("e", ".0e", 1)
    elif "." not in text and "e" not in text:
        text += ".0"
    return dumper.represent_scalar(FLOAT, text)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(int, _represent_int)
_Dumper.add_representer(float, _represent_float)


def dump(document: Any) -> str:
    """One document as YAML that kubectl (and any YAML 1.1 or 1.2 reader) reads back as `document`."""
    return yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=2**31 - 1,
    )
