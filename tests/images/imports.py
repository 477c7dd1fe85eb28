"""The static import closure of Outrider's modules, and which installed distribution owns an import.

Every `import` statement counts, also the ones inside functions (the lazy imports of optional
exporters), so the closure is what a command can import, not only what it imports at start-up.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.images.plan import ROOT


def module_file(module: str) -> Path | None:
    """The repository file of an `outrider.*` module (the outrider/ symlinks resolve into the folders)."""
    path = ROOT.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from x import y`: y may be a module of its own
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def closure(entries: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(outrider modules, third-party dotted import names) reachable from the entry modules."""
    own: set[str] = set()
    external: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in own or name in external:
            continue
        top = name.partition(".")[0]
        if top == "outrider":
            parts = name.split(".")
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
            path = module_file(name)
            if path is None:  # `from outrider.x import some_function`
                continue
            own.add(name)
            todo.extend(_imports(name, path))
        elif top not in sys.stdlib_module_names and top != "__future__":
            external.add(name)
    return frozenset(own), frozenset(external)


@cache
def _module_owners() -> dict[str, str]:
    """Dotted module name -> the canonical name of the installed distribution whose files hold it."""
    owners: dict[str, str] = {}
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or ():
            parts = list(file.parts)
            if not parts or ".." in parts or parts[0].endswith((".dist-info", ".data")):
                continue
            last = parts[-1]
            if last == "__init__.py":
                parts = parts[:-1]
            elif last.endswith(".py"):
                parts[-1] = last[:-3]
            elif ".cpython-" in last or last.endswith(".abi3.so"):
                parts[-1] = last.split(".")[0]
            else:
                continue
            if parts:
                owners.setdefault(".".join(parts), name)
    return owners


def owner(import_name: str) -> str | None:
    """The distribution of the longest installed module prefix of an import name (namespace packages)."""
    owners = _module_owners()
    parts = import_name.split(".")
    for i in range(len(parts), 0, -1):
        found = owners.get(".".join(parts[:i]))
        if found:
            return found
    return None


def requirement_lines(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def installed_with(requirements: Iterable[Requirement]) -> frozenset[str]:
    """Every distribution pip installs for these requirements (in this environment's versions)."""
    seen: set[str] = set()
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in requirements]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        seen.add(name)
        for line in md.requires(name) or ():
            req = Requirement(line)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return frozenset(seen)
