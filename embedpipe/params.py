"""Reading `params.yaml`: every stage reads its own section plus the shared `model` section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """A params file is missing, unreadable or lacks a section."""


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    with path.open(encoding="utf-8") as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Return one section of the params, failing with a clear message when it is absent."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ParamsError(f"params has no '{name}' section")
    return value
