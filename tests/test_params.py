"""The params schema: one clear error per bad key, every key documented and read, params.yaml kept short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from pydantic import BaseModel

from embedpipe.core import params as schema
from embedpipe.core.params import Params, ParamsError, load_params, markdown, validate


def leaf_keys(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, key) for every leaf field of the schema."""
    out = []
    for name, field in cls.model_fields.items():
        key = field.alias or name
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += leaf_keys(field.annotation, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", key))
    return out


def count_leaves(data: dict) -> int:
    return sum(count_leaves(v) if isinstance(v, dict) and k not in ("floors",) else 1 for k, v in data.items())


def test_params_yaml_is_valid_short_and_commented():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params["finetune"]["cpu"]["max_steps"] == 20 and params["sdg"]["gates"]["dedup"]["threshold"] == 0.9
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert count_leaves(raw) <= 80
    for line in (REPO_ROOT / "params.yaml").read_text().splitlines():  # every value line says what it is for
        if re.match(r"\s*\w+: \S", line) and not line.strip().startswith("#") and "epochs" not in line:
            assert "#" in line or re.match(r"\s*(seed|port|global_batch_size|learning_rate):", line), line


def test_a_bad_value_an_unknown_key_and_a_removed_key_each_name_the_key(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ParamsError, match=r"'finetune\.cpu\.learning_rate': Input should be greater than 0"):
        validate({"finetune": {"cpu": {"learning_rate": -1}}})
    with pytest.raises(ParamsError, match=r"'serve\.prot' is not a known key"):
        validate({"serve": {"prot": 8000}})
    with pytest.raises(ParamsError, match=r"'prep\.group_by': Input should be 'document', 'passage' or 'none'"):
        validate({"prep": {"group_by": "chapter"}})
    monkeypatch.setitem(schema.RENAMED, "finetune.old_budget", "use finetune.max_minutes")
    with pytest.raises(ParamsError, match=r"'finetune\.old_budget' was renamed or removed: use finetune\.max_minutes"):
        validate({"finetune": {"old_budget": 3}})


def test_defaults_fill_what_params_yaml_leaves_out(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("serve:\n  port: 9000\nfinetune:\n  cpu: {}\n")
    params = load_params(path)
    assert params["serve"]["port"] == 9000 and params["serve"]["host"] == "127.0.0.1"
    assert params["finetune"]["cpu"] == {}  # `cpu: {}` keeps the recipe's settings on a CPU
    assert load_params(tmp_path.joinpath("none.yaml").write_text("{}") and tmp_path / "none.yaml")["finetune"]["cpu"][
        "max_steps"] == 20  # fmt: skip
    assert params["sdg"]["llm"]["schema"] == "auto"  # the aliased key keeps its YAML name


def test_every_schema_key_is_read_by_some_code_and_documented():
    code = "\n".join(
        p.read_text() for p in [*(REPO_ROOT / "embedpipe").rglob("*.py"), *(REPO_ROOT / "stages").glob("*.py")]
        if p.name != "params.py"
    )
    unread = [dotted for dotted, key in leaf_keys(Params) if not re.search(rf"[\"']{key}[\"']", code)]
    assert not unread, f"schema keys no code reads: {unread}"
    assert (REPO_ROOT / "docs" / "params.md").read_text() == markdown(), "regenerate: python -m embedpipe.core.params --markdown > docs/params.md"
