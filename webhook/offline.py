"""`outrider inject`: offline injection of manifests, like `istioctl kube-inject`.

Pure part: `inject_document` injects one object's pod template; the shell reads multi-document
YAML from a file or stdin the way kubectl does (`outrider.webhook.kubeyaml`), prints the injected YAML, copies
documents it leaves alone byte for byte, and puts warnings and refusals on stderr. A refused
workload is never printed, so `outrider inject -f x.yaml | kubectl apply -f -` cannot apply it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from outrider.webhook import annotations as ann
from outrider.webhook import kubeyaml
from outrider.webhook.config import ConfigError, WebhookConfig, load_config_file
from outrider.webhook.engine import inject
from outrider.webhook.shape import as_list as _list
from outrider.webhook.shape import as_map as _dict

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


def dump_all(documents: list[Any]) -> str:
    """YAML documents that kubectl reads back exactly as `documents` (see `outrider.webhook.kubeyaml`)."""
    return "---\n".join(kubeyaml.dump(d) for d in documents)


@dataclass(frozen=True)
class DocumentResult:
    document: Any  # None when the whole document was refused: it must not be printed
    warnings: tuple[str, ...] = ()
    error: str | None = None
    injected: bool = False
    changed: bool = False  # injected, or refused items left out of a List


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
    namespace_annotations: Mapping[str, str] | None = None,
) -> DocumentResult:
    """Inject one manifest object; kinds without a pod template come back unchanged.

    A refused object comes back as None with the reason in `error`; a List keeps its other items.
    """
    if not isinstance(doc, dict):
        return DocumentResult(doc)
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        items, warnings, errors, injected = [], [], [], False
        for item in doc["items"]:
            sub = inject_document(item, namespace_labels, config, namespace_policy, namespace_annotations)
            if sub.document is not None:
                items.append(sub.document)
            warnings += [f"{describe(item)}: {w}" for w in sub.warnings]
            errors += [f"{describe(item)}: {sub.error}"] if sub.error else []
            injected = injected or sub.injected
        changed = injected or len(items) != len(doc["items"])
        kept = {**doc, "items": items} if items or not doc["items"] else None
        return DocumentResult(kept, tuple(warnings), "; ".join(errors) or None, injected, changed)
    path = TEMPLATE_PATHS.get(str(kind))
    if path is None:
        found = _pod_template_path(doc) if ann.namespace_mode(namespace_labels) else None
        if found is None:
            return DocumentResult(doc)
        return DocumentResult(
            doc,
            (
                f"kind {kind} ({doc.get('apiVersion')}) carries a pod template at {found}, which outrider "
                "inject does not inject "
                f"(it injects {', '.join(TEMPLATE_PATHS)}); its pods get the sidecar only from the "
                "webhook at admission, so check that the webhook runs where they are created",
            ),
        )
    holder: Any = doc
    for key in path:
        holder = holder.get(key) if isinstance(holder, dict) else None
    if not isinstance(holder, dict):
        return DocumentResult(
            None, error=f"{'.'.join(path)} is missing; cannot find the pod template", changed=True
        )
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    pod = {"metadata": holder.get("metadata") or {}, "spec": holder.get("spec")}
    result = inject(
        pod,
        namespace_labels,
        config,
        namespace_policy,
        namespace=namespace,
        namespace_annotations=namespace_annotations,
    )
    notes = (*_misplaced_annotations(doc, path), *result.warnings)
    if not result.allowed:
        return DocumentResult(None, notes, result.message, changed=True)
    if not result.injected:
        return DocumentResult(doc, notes)
    holder["metadata"] = result.pod["metadata"]
    holder["spec"] = result.pod["spec"]
    return DocumentResult(doc, notes, injected=True, changed=True)


def _pod_template_path(doc: dict[str, Any], depth: int = 6) -> str | None:
    """Where a kind outrider inject does not know keeps a pod template (`....template.spec.containers`)."""

    def walk(value: Any, path: tuple[str, ...]) -> str | None:
        if not isinstance(value, dict) or len(path) > depth:
            return None
        containers = _list(_dict(value.get("spec")).get("containers"))
        if path and path[-1] == "template" and any(isinstance(c, dict) for c in containers):
            return ".".join(path)
        for key, child in value.items():
            if isinstance(key, str) and key not in ("metadata", "status"):
                found = walk(child, (*path, key))
                if found:
                    return found
        return None

    return walk(doc.get("spec"), ("spec",))


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
    parser.add_argument(
        "--namespace-annotations",
        default="",
        help="annotations of the target namespace as k=v,k=v (e.g. linkerd.io/inject=enabled)",
    )
    parser.add_argument("--namespace-policy", help="the namespace's egress policy (YAML file), if any")


def _labels(text: str, flag: str = "--namespace-labels") -> dict[str, str]:
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: {part!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def _read(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    return Path(source).read_text()


def run(args: argparse.Namespace) -> int:
    try:
        labels = _labels(args.namespace_labels)
        ns_annotations = _labels(args.namespace_annotations, "--namespace-annotations")
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
    where = "stdin" if args.filename == "-" else args.filename
    try:
        documents = kubeyaml.read_stream(text)
    except kubeyaml.KubeYAMLError as exc:
        print(f"error: {where} is not valid YAML: {exc}", file=sys.stderr)
        return 2
    unreadable = [(i, d.error) for i, d in enumerate(documents, 1) if d.error is not None]
    if unreadable:
        # kubectl would stop at such a document too: print nothing rather than half a manifest
        for index, error in unreadable:
            what = "is not valid YAML" if error.startswith("not valid YAML") else "cannot be read by kubectl"
            print(
                f"error: {where} document {index} {what}: {error.removeprefix('not valid YAML: ')}",
                file=sys.stderr,
            )
        return 2
    rendered, failed = render(documents, labels, config, policy, ns_annotations, where)
    if args.output == "-":
        sys.stdout.write(rendered)
    else:
        try:
            Path(args.output).write_text(rendered)
        except OSError as exc:
            print(f"error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
    return 1 if failed else 0


def render(
    documents: list[kubeyaml.Document],
    labels: Mapping[str, str],
    config: WebhookConfig,
    policy: Mapping[str, Any] | None = None,
    namespace_annotations: Mapping[str, str] | None = None,
    where: str = "stdin",
    err: Any = None,
) -> tuple[str, bool]:
    """The output stream and whether any document was left out (refused, or unreadable).

    Injected documents are written by `kubeyaml.dump`; the others are copied as they came, comments
    and all. Warnings and errors go to `err` (stderr by default).
    """
    err = err or sys.stderr
    out: list[str] = []
    failed = False
    for index, doc in enumerate(documents, 1):
        if doc.error is not None:
            print(f"error: {where}: document {index}: {doc.error}; left out of the output", file=err)
            failed = True
            continue
        result = inject_document(doc.value, labels, config, policy, namespace_annotations)
        for warning in result.warnings:
            print(f"warning: {describe(doc.value)}: {warning}", file=err)
        if result.error:
            print(f"error: {describe(doc.value)}: {result.error}", file=err)
            print(
                f"error: {describe(doc.value)}: refused, so it is left out of the output"
                if result.document is None
                else f"error: {describe(doc.value)}: the refused items are left out of the output",
                file=err,
            )
            failed = True
        if result.document is None:
            continue
        if not result.changed and doc.text is not None:
            out.append(doc.text if doc.text.endswith("\n") else doc.text + "\n")
            continue
        try:
            out.append(kubeyaml.dump(result.document))
        except kubeyaml.KubeYAMLError as exc:
            print(f"error: {describe(doc.value)}: {exc}; left out of the output", file=err)
            failed = True
    return "---\n".join(out), failed
