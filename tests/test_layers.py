"""The layering rule (STYLE.md, docs/architecture.md): imports point down only.

adapters → plugins → the core service → engines → foundation. Every import counts:
module-level, function-level and ``TYPE_CHECKING`` ones. Engines may import each other as
long as the graph stays acyclic; the whole import graph must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "taskbox"

FOUNDATION = {"errors", "models", "events", "config", "git", "files", "confine", "hookspecs", "faults",
              "output", "migrations", "results", "liveness"}
ENGINES = {"registry", "sandbox", "engine", "images", "workspace", "memory", "snapshots", "checkpoints",
           "checkpoint_archive", "archive", "policy", "audit", "risk", "network", "pressure", "doctor", "quota",
           "secrets", "plugins", "guard", "ultrawork", "agents", "merge", "jobs", "trash", "backup", "execagent", "projects",
           "caches", "pool", "live_output"}
CORE = {"service"}
PLUGINS = {"default_plugins"}
ADAPTERS = {"cli", "mcp_server", "mcp_stdio", "mcp_instructions", "web", "integrate", "docgen", "__main__", "__init__"}
RANK = {**{m: 0 for m in FOUNDATION}, **{m: 1 for m in ENGINES}, **{m: 2 for m in CORE},
        **{m: 3 for m in PLUGINS}, **{m: 4 for m in ADAPTERS}}
NAMES = {0: "foundation", 1: "engine", 2: "core", 3: "plugin", 4: "adapter"}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts)


def layer_of(module: str) -> str:
    return module.split(".")[0]


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every taskbox module ``path`` imports, anywhere in the file (relative imports resolved)."""
    mod = module_name(path, root).split(".")
    package = mod[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "taskbox":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import x` imports module x when it is one
                candidate = [*target, alias.name]
                if root.joinpath(*candidate).with_suffix(".py").exists() or root.joinpath(*candidate).is_dir():
                    found.add(".".join(candidate))
                elif target:
                    found.add(".".join(target))
                else:
                    found.add("__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "taskbox":
                    found.add(".".join(parts[1:]) or "__init__")
    return found


def graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        out[name] = {m for m in imports_of(path) if m != name}
    return out


def test_every_module_has_a_layer() -> None:
    unknown = sorted({layer_of(m) for m in graph()} - set(RANK))
    assert not unknown, f"modules with no layer (add them to docs/architecture.md and here): {unknown}"


def test_imports_point_down_only() -> None:
    upward = []
    for src, targets in graph().items():
        for dst in targets:
            if layer_of(src) == "__init__" and not src.startswith("default_plugins"):
                continue  # the package root is the public facade: it re-exports from every layer
            a, b = RANK[layer_of(src)], RANK[layer_of(dst)]
            if b > a:
                upward.append(f"{src} ({NAMES[a]}) -> {dst} ({NAMES[b]})")
    assert not upward, "imports pointing up:\n" + "\n".join(sorted(upward))


def test_the_import_graph_has_no_cycle() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if layer_of(nxt) == "__init__" and "." not in nxt:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt in g and not state.get(nxt):
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if layer_of(node) == "__init__":
            continue
        if not state.get(node):
            cycle = visit(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, expected", [
    ("from .service import TaskService\n", {"service"}),
    ("from . import files, git\n", {"files", "git"}),
    ("def f():\n    from .checkpoints import Store\n", {"checkpoints"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .service import TaskService\n", {"service"}),
    ("import taskbox.registry\n", {"registry"}),
])
def test_the_checker_sees_every_kind_of_import(tmp_path: Path, source: str, expected: set[str]) -> None:
    # The rule is only as good as its parser: a probe module in a copy of the layout is read
    # like any other, and an engine importing the core is reported as pointing up.
    fake = tmp_path / "taskbox"
    fake.mkdir()
    for name in ("service.py", "files.py", "git.py", "checkpoints.py", "registry.py"):
        (fake / name).write_text("")
    (fake / "pressure.py").write_text(source)
    assert imports_of(fake / "pressure.py", fake) == expected
    up = [d for d in expected if RANK[layer_of(d)] > RANK["pressure"]]
    assert up == (["service"] if "service" in expected else [])
