"""Every embedpipe module a stage runs is one of its DVC deps, so `dvc repro` reruns the stage when that code changes.

A module missing from `deps` is a silent bug: the stage's outputs stay cached while the code that made them
has changed (the sdg refactor into embedpipe/sdg_gates.py would have gone unnoticed). The imports are read
with `ast`, transitively, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUTPUT_NEUTRAL = {"embedpipe/console.py", "embedpipe/progress.py"}  # they only print


def embedpipe_imports(path: Path) -> set[str]:
    """The embedpipe modules `path` imports (as repo-relative file paths), anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "embedpipe":
            if node.module == "embedpipe":  # from embedpipe import sdg
                found |= {f"embedpipe/{alias.name}.py" for alias in node.names}
            else:
                found.add(node.module.replace(".", "/") + ".py")
        elif isinstance(node, ast.Import):
            found |= {a.name.replace(".", "/") + ".py" for a in node.names if a.name.startswith("embedpipe.")}
    return {p for p in found if (REPO / p).is_file()}


def code_closure(script: str) -> set[str]:
    seen: set[str] = set()
    todo = [script]
    while todo:
        for module in embedpipe_imports(REPO / todo.pop()):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def test_every_stage_depends_on_the_code_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        script = stage["cmd"].split()[1]
        assert script in stage["deps"], f"{name}: its own script {script} is not a dep"
        lacking = code_closure(script) - set(stage["deps"]) - OUTPUT_NEUTRAL
        if lacking:
            missing[name] = sorted(lacking)
    assert not missing, f"dvc.yaml deps lack modules the stages import: {missing}"


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from embedpipe import sdg\n\ndef f():\n    from embedpipe.io import passage_text\n")
    assert embedpipe_imports(module) == {"embedpipe/sdg.py", "embedpipe/io.py"}
