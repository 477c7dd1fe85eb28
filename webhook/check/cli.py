"""`outrider check [--pre]`: gather facts from the cluster, evaluate them, print a report.

Exit status: 0 when no check failed (warnings allowed), 1 on any failure, 2 when the kubeconfig is unusable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from kubernetes_asyncio import config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from outrider.webhook.check.evaluate import FAIL, PASS, WARN, Result, evaluate, evaluate_pre, failed
from outrider.webhook.check.facts import Names
from outrider.webhook.check.gather import gather

MARKS = {PASS: "√", WARN: "‼", FAIL: "x"}


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = Names()
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current context)")
    parser.add_argument(
        "--namespace",
        help="Outrider's namespace (default: the namespace of the Service that MutatingWebhookConfiguration "
        f"{defaults.webhook_config} calls, e.g. a Helm release's; {defaults.namespace} when there is none)",
    )
    parser.add_argument("--pre", action="store_true", help="check the install prerequisites only")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text", help="report format")


def render_text(results: Sequence[Result], out: TextIO) -> None:
    group = None
    for r in results:
        if r.group != group:
            if group is not None:
                out.write("\n")
            out.write(f"{r.group}\n{'-' * len(r.group)}\n")
            group = r.group
        out.write(f"{MARKS[r.status]} {r.name}: {r.message}\n")
        if r.status != PASS and r.hint:
            out.write(f"    hint: {r.hint}\n")
        for d in r.details:
            out.write(f"    {d}\n")
    counts = {s: sum(r.status == s for r in results) for s in (PASS, WARN, FAIL)}
    status = "failed" if counts[FAIL] else "passed"
    out.write(
        f"\nStatus check results are {MARKS[FAIL] if counts[FAIL] else MARKS[PASS]} ({status}: "
        f"{counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail)\n"
    )


def render_json(results: Sequence[Result], out: TextIO) -> None:
    doc = {
        "success": not failed(results),
        "checks": [r.to_mapping() for r in results],
    }
    out.write(json.dumps(doc, indent=2) + "\n")


async def check(
    kubeconfig: str | None, context: str | None, names: Names, *, pre: bool, discover: bool = False
) -> list[Result]:
    api = await config.new_client_from_config(config_file=kubeconfig, context=context)
    try:
        facts = await gather(api, names, pre=pre, discover=discover)
    finally:
        await api.close()
    return evaluate_pre(facts) if pre else evaluate(facts)


def run(args: argparse.Namespace) -> int:
    names = Names(namespace=args.namespace) if args.namespace else Names()
    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        print(f"outrider check: --kubeconfig {args.kubeconfig}: no such file", file=sys.stderr)
        return 2
    try:
        results = asyncio.run(
            check(args.kubeconfig, args.context, names, pre=args.pre, discover=not args.namespace)
        )
    except (ConfigException, OSError) as exc:
        print(f"outrider check: cannot use the kubeconfig: {exc}", file=sys.stderr)
        return 2
    except ApiException as exc:  # a call gather does not expect to fail; no body (may echo objects)
        print(
            f"outrider check: the Kubernetes API refused a request: HTTP {exc.status} {exc.reason}",
            file=sys.stderr,
        )
        return 2
    (render_json if args.output == "json" else render_text)(results, sys.stdout)
    return 1 if failed(results) else 0
