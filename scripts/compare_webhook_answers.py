"""Compare the webhook's answers from this tree with another tree's (a baseline export), byte for byte.

For every pod of a corpus (the benchmark's distinct pods, the golden fixtures' inputs, Hypothesis
pods from the unit tests' strategy and a few malformed AdmissionReviews), four configs and three
namespace modes, each tree decodes the AdmissionReview, runs the engine and encodes the answer as
`/mutate` does; the answer bytes (patch, warnings, refusal) and the injected pod must be identical.
Usage: python scripts/compare_webhook_answers.py BASELINE_TREE [--pods N]   (e.g. an export of a tag:
`git archive TAG | tar -x -C /tmp/base`). Each tree runs in its own process with its own PYTHONPATH.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CONFIGS: list[dict[str, Any]] = [
    {},
    {"egress_default_policy": {"allow": ["api.github.com:443", "*.example.com:443"]}},
    {
        "native_sidecar": False,
        "egress_default_policy": {"allow": ["10.0.0.0/8:5432", "*.example.com:443"]},
        "image_pull_secrets": ["regcred"],
    },
    {
        "token_audiences": ["mcp", "other"],
        "default_audience": "mcp",
        "resource_template": "https://{app}.{namespace}.mcp.example.com/mcp",
        "sidecar_env": {"OTEL_SERVICE_NAME": "search"},
    },
]
NAMESPACES: list[dict[str, str]] = [
    {"outrider.dev/inject": "enabled"},
    {"outrider.dev/inject": "strict"},
    {},
]
MALFORMED = [
    b"",
    b"[]",
    b"{not json",
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}',
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u"}}',
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":'
    b'{"kind":"Pod"},"operation":"CREATE","object":[]}}',
    b"[" * 2000 + b"]" * 2000,
]


def _review(pod: Any, uid: str) -> bytes:
    document = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "tools",
            "operation": "CREATE",
            "object": pod,
            "dryRun": False,
        },
    }
    return json.dumps(document, separators=(",", ":")).encode()


def corpus(pods: int) -> list[bytes]:
    """AdmissionReview bodies, made with this tree's code (both trees then read the same bytes)."""
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "webhook"), str(ROOT)]
    import bench_webhook
    import yaml
    from hypothesis import HealthCheck, given, settings
    from test_webhook_units import pod_like
    from webhook_support import load_fixture, pod_template, templated_fixture_names

    bodies = list(MALFORMED)
    template = yaml.safe_load(bench_webhook.POD_FILE.read_text())
    for i in range(pods):
        pod = copy.deepcopy(template)
        bench_webhook._vary(pod, i)
        bodies.append(_review(pod, f"bench-{i}"))
    for name in templated_fixture_names():
        doc = load_fixture(name)[0]
        pod = doc if doc.get("kind") == "Pod" else pod_template(doc)
        bodies.append(_review(pod, f"fixture-{name}"))
    drawn: list[Any] = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(pod=pod_like)
    def draw(pod: Any) -> None:
        drawn.append(copy.deepcopy(pod))

    draw()
    bodies += [_review(pod, f"hypothesis-{i}") for i, pod in enumerate(drawn)]
    return bodies


def run(bodies_file: Path, out_file: Path) -> None:
    """In a tree's own process: one line per (body, config, namespace mode): what `/mutate` answers."""
    import orjson

    import outrider
    from outrider.webhook import admission
    from outrider.webhook.config import parse_config
    from outrider.webhook.engine import inject

    print(f"answers from {Path(outrider.__file__).resolve().parent.parent}", file=sys.stderr)
    bodies = [bytes.fromhex(h) for h in json.loads(bodies_file.read_text())]
    configs = [parse_config(c) for c in CONFIGS]
    with out_file.open("w") as out:
        for body in bodies:
            for config in configs:
                for labels in NAMESPACES:
                    try:
                        review = admission.decode(body)
                    except admission.BadReview as exc:
                        out.write(json.dumps([exc.uid, "bad review", str(exc)]) + "\n")
                        continue
                    result = inject(review.object, labels, config, None, review.namespace, {})
                    answer = admission.with_uid(review.uid, admission.encode_result(result))
                    pod = orjson.dumps(result.pod, option=orjson.OPT_SORT_KEYS)
                    digest = hashlib.sha256(answer + b"\0" + pod).hexdigest()
                    out.write(json.dumps([review.uid, admission.outcome(result), digest]) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", nargs="?", type=Path, help="the other tree (an export with outrider/)")
    parser.add_argument("--pods", type=int, default=5000, help="distinct benchmark pods in the corpus")
    parser.add_argument("--run", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(*args.run)
        return 0
    if args.baseline is None:
        parser.error("name the baseline tree")
    with tempfile.TemporaryDirectory(prefix="outrider-compare-") as tmp:
        bodies_file = Path(tmp) / "bodies.json"
        bodies = corpus(args.pods)
        bodies_file.write_text(json.dumps([b.hex() for b in bodies]))
        lines: dict[str, list[str]] = {}
        for name, tree in (("baseline", args.baseline.resolve()), ("this tree", ROOT)):
            out = Path(tmp) / f"{name}.txt"
            env = {**os.environ, "PYTHONPATH": str(tree)}
            subprocess.run(
                [sys.executable, __file__, "--run", str(bodies_file), str(out)], env=env, check=True
            )
            lines[name] = out.read_text().splitlines()
    base, this = lines["baseline"], lines["this tree"]
    differ = [i for i, (a, b) in enumerate(zip(base, this, strict=True)) if a != b]
    outcomes: dict[str, int] = {}
    for line in this:
        outcome = json.loads(line)[1]
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(
        f"{len(bodies)} AdmissionReviews x {len(CONFIGS)} configs x {len(NAMESPACES)} namespace modes = "
        f"{len(this)} answers; outcomes {dict(sorted(outcomes.items()))}; differing: {len(differ)}"
    )
    for i in differ[:10]:
        print(f"  differs: baseline {base[i]}  this tree {this[i]}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
