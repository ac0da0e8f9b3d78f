"""Every embedpipe module a stage runs is one of its DVC deps, so `dvc repro` reruns the stage when that code changes.

A module missing from `deps` is a silent bug: the stage's outputs stay cached while the code that made them
has changed. The imports are read with `ast` (tests/layout.py), transitively, including the ones inside functions,
relative imports and `from embedpipe.pkg import module`.
"""

from __future__ import annotations

import yaml
from layout import REPO, code_closure, module_imports

OUTPUT_NEUTRAL = {"embedpipe/core/console.py"}  # it only prints


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


def test_the_import_reader_sees_every_form_of_import(tmp_path):
    pkg = tmp_path / "embedpipe" / "sdg"
    pkg.mkdir(parents=True)
    for name in ("__init__", "rules", "gates", "jobs"):
        (pkg / f"{name}.py").write_text("")
    (tmp_path / "embedpipe" / "__init__.py").write_text("")
    (tmp_path / "embedpipe" / "core").mkdir()
    for name in ("__init__", "io", "models"):
        (tmp_path / "embedpipe" / "core" / f"{name}.py").write_text("")
    (pkg / "gates.py").write_text(
        "from embedpipe.sdg import rules\nfrom . import jobs\nfrom ..core.io import x\n\n"
        "def f():\n    import embedpipe.core.models\n"
    )
    assert module_imports(pkg / "gates.py", tmp_path) == {
        "embedpipe/sdg/rules.py", "embedpipe/sdg/jobs.py", "embedpipe/core/io.py", "embedpipe/core/models.py",
    }  # fmt: skip
