"""The layout shows the architecture: packages by recipe step over a small core, no cycles, no upward import,
stages that never import one another."""

from __future__ import annotations

import ast

from layout import LAYERS, REPO, find_cycle, import_graph, upward_imports


def test_embedpipe_has_no_import_cycle_and_no_upward_import():
    graph = import_graph()
    assert {m.split("/")[1] for m in graph} <= set(LAYERS), "every module lives in a recipe-step package or core"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert upward_imports(graph) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {
        "embedpipe/core/io.py": {"embedpipe/serving/server.py"},
        "embedpipe/serving/server.py": {"embedpipe/core/io.py"},
    }
    assert find_cycle(graph) == ["embedpipe/core/io.py", "embedpipe/serving/server.py", "embedpipe/core/io.py"]
    assert upward_imports(graph) == ["embedpipe/core/io.py imports the higher embedpipe/serving/server.py"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_stage_imports_another_stage():
    for script in sorted((REPO / "stages").glob("*.py")):
        tree = ast.parse(script.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "stages" or n.startswith("stages.") for n in names), f"{script.name} imports a stage"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "spec_from_file_location":
                raise AssertionError(f"{script.name} loads another script by path")
