"""`outrider inject`: offline injection of manifests, like `istioctl kube-inject`.

Pure part: `inject_document` injects one object's pod template; the shell reads multi-document
YAML from a file or stdin, prints the injected YAML and puts warnings and refusals on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from webhook import annotations as ann
from webhook.config import ConfigError, WebhookConfig, load_config_file
from webhook.engine import inject
from webhook.shape import as_map as _dict

# kind -> path of keys from the object to its pod template ([] means the object is the pod)
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class _PlainDumper(yaml.SafeDumper):
    # The engine shares objects (e.g. resources); YAML anchors and aliases would only confuse readers.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_all(documents: list[Any]) -> str:
    return yaml.dump_all(documents, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=100)


@dataclass(frozen=True)
class DocumentResult:
    document: Any
    warnings: tuple[str, ...] = ()
    error: str | None = None
    injected: bool = False


def describe(doc: Any) -> str:
    if not isinstance(doc, Mapping):
        return "document"
    name = doc.get("metadata", {}).get("name") if isinstance(doc.get("metadata"), Mapping) else None
    return f"{doc.get('kind', '?')}/{name or '?'}"


def inject_document(
    doc: Any,
    namespace_labels: Mapping[str, str],
    config: WebhookConfig,
    namespace_policy: Mapping[str, Any] | None = None,
) -> DocumentResult:
    """Inject one manifest object; kinds without a pod template come back unchanged."""
    if not isinstance(doc, dict):
        return DocumentResult(doc)
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        items, warnings, errors, injected = [], [], [], False
        for item in doc["items"]:
            sub = inject_document(item, namespace_labels, config, namespace_policy)
            items.append(sub.document)
            warnings += [f"{describe(item)}: {w}" for w in sub.warnings]
            errors += [f"{describe(item)}: {sub.error}"] if sub.error else []
            injected = injected or sub.injected
        return DocumentResult({**doc, "items": items}, tuple(warnings), "; ".join(errors) or None, injected)
    path = TEMPLATE_PATHS.get(str(kind))
    if path is None:
        return DocumentResult(doc)
    holder: Any = doc
    for key in path:
        holder = holder.get(key) if isinstance(holder, dict) else None
    if not isinstance(holder, dict):
        return DocumentResult(doc, error=f"{'.'.join(path)} is missing; cannot find the pod template")
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    pod = {"metadata": holder.get("metadata") or {}, "spec": holder.get("spec")}
    result = inject(pod, namespace_labels, config, namespace_policy, namespace=namespace)
    notes = (*_misplaced_annotations(doc, path), *result.warnings)
    if not result.allowed:
        return DocumentResult(doc, notes, result.message)
    if not result.injected:
        return DocumentResult(doc, notes)
    holder["metadata"] = result.pod["metadata"]
    holder["spec"] = result.pod["spec"]
    return DocumentResult(doc, notes, injected=True)


def _misplaced_annotations(doc: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    """`outrider.dev/*` annotations on the workload (or a CronJob's jobTemplate), not its pods."""
    if not path:
        return []
    job = _get(doc.get("spec"), "jobTemplate") if path[1:2] == ("jobTemplate",) else None
    places = [("metadata", doc.get("metadata")), ("spec.jobTemplate.metadata", _get(job, "metadata"))]
    template = ".".join((*path, "metadata", "annotations"))
    return [
        f"annotation {key} is on {where}.annotations, which Outrider does not read; move it to {template}"
        for where, metadata in places
        for key in _dict(_get(metadata, "annotations"))
        if isinstance(key, str) and key.startswith(ann.PREFIX) and key != ann.STATUS
    ]


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")
    parser.add_argument(
        "-o", "--output", default="-", help="where to write the injected YAML (default: stdout)"
    )
    parser.add_argument("--config", help="webhook config file (YAML); default: built-in defaults")
    parser.add_argument(
        "--namespace-labels",
        default=f"{ann.NAMESPACE_INJECT}={ann.NAMESPACE_ENABLED}",
        help="labels of the target namespace as k=v,k=v (default: %(default)s; use "
        f"{ann.NAMESPACE_INJECT}={ann.NAMESPACE_STRICT} to apply strict checks)",
    )
    parser.add_argument("--namespace-policy", help="the namespace's egress policy (YAML file), if any")


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"--namespace-labels: {part!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def _read(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    return Path(source).read_text()


def run(args: argparse.Namespace) -> int:
    try:
        labels = _labels(args.namespace_labels)
        config = load_config_file(args.config) if args.config else WebhookConfig()
        policy = yaml.safe_load(_read(args.namespace_policy)) if args.namespace_policy else None
        if policy is not None and not isinstance(policy, dict):
            raise ValueError(f"--namespace-policy {args.namespace_policy}: must hold a mapping")
        text = _read(args.filename)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"error: --namespace-policy is not valid YAML: {exc}", file=sys.stderr)
        return 2
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        where = "stdin" if args.filename == "-" else args.filename
        print(f"error: {where} is not valid YAML: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    out: list[Any] = []
    failed = False
    for doc in documents:
        result = inject_document(doc, labels, config, policy)
        for warning in result.warnings:
            print(f"warning: {describe(doc)}: {warning}", file=sys.stderr)
        if result.error:
            print(f"error: {describe(doc)}: {result.error}", file=sys.stderr)
            failed = True
        out.append(result.document)
    rendered = dump_all(out)
    if args.output == "-":
        sys.stdout.write(rendered)
    else:
        try:
            Path(args.output).write_text(rendered)
        except OSError as exc:
            print(f"error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
    return 1 if failed else 0
