"""The import graph of embedpipe and stages/, read with `ast` (shared by the layout and DVC-deps tests)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Lowest first: a package may import its own modules and the packages before it, never one after it.
LAYERS = ("core", "documents", "sdg", "prep", "training", "evaluation", "serving")


def _module_file(dotted: str, root: Path) -> str | None:
    """`embedpipe.pkg.mod` -> its repo-relative file (a module or a package's __init__), if it exists."""
    rel = dotted.replace(".", "/")
    for candidate in (f"{rel}.py", f"{rel}/__init__.py"):
        if (root / candidate).is_file():
            return candidate
    return None


def module_imports(path: Path, root: Path = REPO) -> set[str]:
    """The embedpipe modules `path` imports (repo-relative files), anywhere in the file, in any form."""
    rel_parts = path.resolve().relative_to(root.resolve()).with_suffix("").parts
    package = rel_parts[:-1] if rel_parts[-1] != "__init__" else rel_parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..core.io import y
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}  # from embedpipe.pkg import module
    found = {_module_file(n, root) for n in names if n.split(".")[0] == "embedpipe"}
    return {f for f in found if f and f != "embedpipe/__init__.py" and not f.endswith("/__init__.py")}


def code_closure(script: str, root: Path = REPO) -> set[str]:
    """Every embedpipe module `script` runs, transitively."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        for module in module_imports(root / todo.pop(), root):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    return {
        str(p.relative_to(root)): module_imports(p, root)
        for p in sorted((root / "embedpipe").rglob("*.py"))
        if p.name != "__init__.py"
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> str:
    parts = Path(module).parts  # embedpipe/<layer>/<mod>.py
    return parts[1] if len(parts) > 2 else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer into a higher one (and any module outside the layers)."""
    bad = []
    for module, imports in graph.items():
        if layer_of(module) not in LAYERS:
            bad.append(f"{module} is in no layer of {LAYERS}")
            continue
        for target in imports:
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module)):
                bad.append(f"{module} imports the higher {target}")
    return sorted(bad)
