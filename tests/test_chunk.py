"""The chunk stage: bad inputs are reported not fatal, passages are bounded, ids are stable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stage_env

from embedpipe.chunking import chunk_document, passage_id, token_counter
from embedpipe.documents import Document, DocumentsError, discover, read_document
from embedpipe.models import ModelNotAvailable, load_model, resolve_model


def run_chunk(repo_root: Path, docs: Path, out: Path, extra_params: str = "") -> subprocess.CompletedProcess:
    params = out / "params.yaml"
    out.mkdir(parents=True, exist_ok=True)
    params.write_text(
        "model: {base_model: all-MiniLM-L6-v2}\n"
        f"chunk: {{docs_dir: '{docs}', target_tokens: 64, overlap_tokens: 12, min_tokens: 20, max_file_mb: 0.01{extra_params}}}\n"
    )
    return subprocess.run(
        [sys.executable, "stages/chunk.py", "--params", str(params), "--out", str(out / "chunks"),
         "--metrics", str(out / "chunk.json")],
        cwd=repo_root, env=stage_env(), capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def counter():
    return token_counter(resolve_model("all-MiniLM-L6-v2"))


def test_each_bad_input_is_skipped_with_its_reason(tmp_path: Path, repo_root: Path, tiny_docs_dir: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text((tiny_docs_dir / "kettle-k1.md").read_text())
    (docs / "binary.txt").write_bytes(b"header\x00\x01\x02 binary payload")
    (docs / "empty.md").write_text("")
    (docs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (docs / "huge.txt").write_text("word " * 5000)  # over the 0.01 MB limit of the test params
    (docs / "image.png").write_bytes(b"\x89PNG")
    (docs / "loop").symlink_to(docs, target_is_directory=True)
    (docs / "dangling.md").symlink_to(docs / "missing.md")
    (docs / "emptydir").mkdir()

    result = run_chunk(repo_root, docs, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    skipped = {r["path"]: r["reason"] for r in map(json.loads, (tmp_path / "out/chunks/skipped.jsonl").open())}
    assert skipped["binary.txt"].startswith("binary file")
    assert skipped["empty.md"] == "empty file"
    assert skipped["latin1.txt"].startswith("not valid UTF-8")
    assert skipped["huge.txt"].startswith("larger than the size limit")
    assert skipped["image.png"].startswith("unsupported file type")
    assert skipped["loop/"].startswith("symlink loop")
    assert skipped["dangling.md"].startswith("broken or looping symlink")
    for name in skipped:  # every skipped file is also named on stderr
        assert name in result.stderr
    metrics = json.loads((tmp_path / "out/chunk.json").read_text())
    assert metrics["files_read"] == 1 and metrics["files_skipped"] == len(skipped)
    assert metrics["passages"] >= 3


@pytest.mark.parametrize("make", ["missing", "empty", "all_bad"])
def test_unusable_folder_is_a_clear_error(tmp_path: Path, repo_root: Path, make: str):
    docs = tmp_path / "docs"
    if make != "missing":
        docs.mkdir()
    if make == "all_bad":
        (docs / "a.txt").write_bytes(b"\x00\x00")
    result = run_chunk(repo_root, docs, tmp_path / "out")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "Error:" in result.stderr and str(docs) in result.stderr


def test_passages_respect_size_and_structure(tiny_docs_dir: Path, counter):
    for path in sorted(tiny_docs_dir.iterdir()):
        doc = read_document(path, tiny_docs_dir, 10**6)
        assert isinstance(doc, Document), doc
        records = chunk_document(doc, counter, target_tokens=48, overlap_tokens=8, min_tokens=16)
        assert records, path
        for r in records:
            assert 0 < counter(r["text"]) <= 48 + 8, r  # a heading line may join a small section
            assert r["title"].startswith(doc.sections[0].headings[0])
            assert r["doc"] == path.name
        assert [r["position"] for r in records] == list(range(len(records)))


def test_html_text_is_extracted_without_boilerplate(tiny_docs_dir: Path):
    doc = read_document(tiny_docs_dir / "grinder-g3.html", tiny_docs_dir, 10**6)
    text = " ".join(p for s in doc.sections for p in s.paragraphs)
    assert "40 grind settings" in text and "GB-310" in text
    assert "tracking" not in text and "Products" not in text and "Copyright" not in text
    assert doc.sections[0].headings == ["Brewline G3 Burr Grinder", "Grind settings"]


def test_markdown_heading_path_becomes_title(tiny_docs_dir: Path):
    doc = read_document(tiny_docs_dir / "kettle-k2.md", tiny_docs_dir, 10**6)
    assert ["Brewline K2 Kettle Manual", "Descaling"] in [s.headings for s in doc.sections]


def test_long_sentences_are_cut_and_overlap_is_carried(counter):
    doc = Document("x.md", [])
    from embedpipe.documents import Section

    sentences = [f"Sentence number {i} talks about pump model HX-{i} and its seal." for i in range(40)]
    doc.sections = [Section(["X", "Long"], [" ".join(sentences)]), Section(["X", "Run-on"], ["word " * 300])]
    records = chunk_document(doc, counter, target_tokens=60, overlap_tokens=20, min_tokens=10)
    assert all(counter(r["text"]) <= 60 + 20 for r in records)
    long_parts = [r["text"] for r in records if r["title"] == "X > Long"]
    assert len(long_parts) > 3
    first_tail = long_parts[0].split(". ")[-1]
    assert first_tail.rstrip(".") in long_parts[1]  # the last sentence is repeated as overlap


def test_ids_are_stable_and_duplicates_removed(tmp_path: Path, repo_root: Path, tiny_docs_dir: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("kettle-k1.md", "warranty.md"):
        (docs / name).write_text((tiny_docs_dir / name).read_text())
    (docs / "copy-of-warranty.md").write_text((tiny_docs_dir / "warranty.md").read_text())
    first = run_chunk(repo_root, docs, tmp_path / "a")
    second = run_chunk(repo_root, docs, tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0
    a = (tmp_path / "a/chunks/corpus.jsonl").read_bytes()
    assert a == (tmp_path / "b/chunks/corpus.jsonl").read_bytes()
    ids = [json.loads(line)["_id"] for line in a.splitlines()]
    assert len(ids) == len(set(ids))
    assert json.loads((tmp_path / "a/chunk.json").read_text())["duplicate_passages_removed"] >= 1
    assert passage_id("T", "x") == passage_id("T", "x") != passage_id("T", "y")


def test_discover_refuses_missing_and_non_folder(tmp_path: Path):
    with pytest.raises(DocumentsError, match="not found"):
        discover(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DocumentsError, match="not a folder"):
        discover(tmp_path / "f.txt")


def test_special_files_are_skipped_not_read(tmp_path: Path):
    """A FIFO would block a naive reader forever; it is refused on sight."""
    (tmp_path / "pipe.md").parent.mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "pipe.md")
    (tmp_path / "ok.md").write_text("# T\n\ntext")
    files, skipped = discover(tmp_path)
    assert [f.name for f in files] == ["ok.md"]
    assert [(s.path, s.reason) for s in skipped] == [("pipe.md", "not a regular file")]


def test_embedded_model_resolves_offline():
    path = Path(resolve_model("all-MiniLM-L6-v2"))
    assert (path / "config.json").is_file()
    model = load_model("all-MiniLM-L6-v2", device="cpu")
    assert model.get_embedding_dimension() == 384


def test_unknown_model_fails_with_a_fix_it_message():
    with pytest.raises(ModelNotAvailable) as info:
        load_model("no-such-org/no-such-model-xyz", device="cpu")
    message = str(info.value)
    assert "no-such-org/no-such-model-xyz" in message and "params.yaml" in message


def test_pdf_text_is_read_and_a_broken_pdf_is_skipped(tmp_path: Path, counter):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.text(0.1, 0.8, "The HX-200 pump is rated at 10 bar.")
    fig.text(0.1, 0.6, "Inspect the seal every 500 hours.")
    fig.savefig(tmp_path / "spec-sheet.pdf")
    plt.close(fig)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")

    doc = read_document(tmp_path / "spec-sheet.pdf", tmp_path, 10**6)
    assert isinstance(doc, Document)
    records = chunk_document(doc, counter)
    assert "rated at 10 bar" in records[0]["text"] and "500 hours" in records[0]["text"]
    skipped = read_document(tmp_path / "broken.pdf", tmp_path, 10**6)
    assert not isinstance(skipped, Document) and "PDF" in skipped.reason
