"""The chunk stage: bad inputs are reported not fatal, passages are bounded, ids are stable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stage_env

from embedpipe.core.models import ModelNotAvailable, load_model, resolve_model
from embedpipe.documents.chunking import chunk_document, passage_id, token_counter
from embedpipe.documents.reading import Document, DocumentsError, discover, fence_code, is_code_block, read_document


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
    from embedpipe.documents.reading import Section

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


# --- clean text: markup rendered away, code fenced (see embedpipe.documents.reading.fence_code) -----------------

MARKUP = Path(__file__).parent / "data" / "markup"


def _paragraphs(doc: Document) -> list[str]:
    return [p for s in doc.sections for p in s.paragraphs]


def _prose(doc: Document) -> str:
    return "\n".join(p for p in _paragraphs(doc) if not is_code_block(p))


def test_rst_is_rendered_to_clean_text_with_sphinx_roles_and_directives(tmp_path: Path, monkeypatch, capfd):
    (tmp_path / "csv.rst").write_text((MARKUP / "csv.rst").read_text())
    (tmp_path / "secret.txt").write_text("TOPSECRET must never be read through include, raw or csv-table")
    monkeypatch.chdir(tmp_path)  # where a relative `.. include:: secret.txt` would find the file
    doc = read_document(tmp_path / "csv.rst", tmp_path, 10**6)
    assert isinstance(doc, Document), doc
    prose = _prose(doc)
    paragraphs = _paragraphs(doc)

    assert [s.headings for s in doc.sections] == [["csv --- CSV File I/O"], ["csv --- CSV File I/O", "Module contents"]]
    # roles: the visible text only; `text <target>` gives the text, `~a.b` gives b, unknown roles too
    assert paragraphs[0] == (
        "The csv module's writerow method writes one row. Put the package name in setup.py, read the dialect "
        "notes, call reader, set CSV_STRICT and look up dialect. An unknown role shows its text: visible words."
    )
    for markup in (":meth:", ":file:", ":frob:", "``", "::", ".. ", "`", "*", "|undefined", "orphan", "synopsis"):
        assert markup not in prose, markup
    assert "toctree-entry" not in prose and "csv-module" not in prose and "html" not in paragraphs
    # code: `::` blocks, code-block and signatures are fenced, verbatim with their indentation
    assert "A literal block follows:" in paragraphs
    assert (
        "```\nimport csv\nwith open('eggs.csv', newline='') as f:\n    csv.writer(f).writerow(['Spam', 'Eggs'])\n```"
        in paragraphs
    )
    assert "```\ndef sniff(sample):\n    return Sniffer().sniff(sample)\n```" in paragraphs
    assert "```\nclass Dialect(delimiter=',')\n```" in paragraphs
    # version notes and admonitions are prose with their label
    for expected in (
        "New in version 3.1: The strict attribute.", "Changed in version 3.2: delimiter must be one character.",
        "Deprecated since version 4.0.", "Note: Open files with newline=''.", "Warning: Never trust the input.",
        "See also: PEP 305 - CSV File API", "- first item with inline code", "- second item",
        "dialect: A set of formatting parameters.", "Parameter | Default", "delimiter | ,",
        "The body of a directive nobody knows survives, with Writer rendered.",
        "Broken markup and unterminated and an undefined substitution.", "Escapes join words: many Dialects exist.",
        "Shown only in HTML builds, kept here.",
        "Deprecated since version 3.4, will be removed in version 3.6: Use writer().",
    ):
        assert expected in paragraphs, expected
    # no file is ever read, and docutils says nothing
    assert all("TOPSECRET" not in p for p in paragraphs)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_broken_rst_keeps_its_text_without_error_messages():
    from embedpipe.documents.reading import _parse_rst

    text = (
        "Title\n=====\n\nBad table:\n\n+---+---+\n| a | b\n+---+\n\n.. unknown-thing::\n\n   body words\n\n"
        ".. code-block::\n\n.. image:: nowhere.png\n\nA `link <broken\n\n* list\n  without blank\n*  line\n\n"
        "Section\n---\n\n.. [#] orphan footnote\n\nTitle\n=====\n"
    )
    sections = _parse_rst(text, "fallback")
    text_out = " ".join(p for s in sections for p in s.paragraphs)
    assert "body words" in text_out and "a b" in text_out  # the words of a malformed table are kept
    for noise in ("ERROR", "WARNING", "System Message", "Unknown directive", "Malformed table", "docutils"):
        assert noise not in text_out, noise


def test_markdown_is_parsed_with_fenced_and_indented_code():
    doc = read_document(MARKUP / "guide.md", MARKUP, 10**6)  # front matter is metadata: not text, not a heading
    assert [s.headings for s in doc.sections] == [["Kettle guide"], ["Kettle guide", "Install"]]
    assert _paragraphs(doc) == [
        "Intro with inline code, a link and bold text.",
        "```\n# not a heading: a comment inside code\npip install kettle\n```",
        "```\nindented code\n  keeps its indent\n```",
        "- Fill the kettle.",
        "- Press START.",
        "Model | Litres",
        "K1 | 1.7",
        "Raw HTML block.",
        "```\ntilde fence\n```",
    ]


def test_html_pre_follows_the_code_convention():
    doc = read_document(MARKUP / "page.html", MARKUP, 10**6)
    assert _paragraphs(doc) == [
        "Call grind() to start.",
        "```\ndef grind(setting):\n    if setting > 40:\n        raise ValueError(setting)\n```",
        "After the code.",
        "stop()",
        "Stops the grinder.",  # once: the <p> inside the <dd> is not read a second time
        "```\ngrinder.stop()\n```",
    ]


def test_a_code_line_that_looks_like_a_fence_is_indented():
    block = fence_code("\n\tprint('x')\n\t```\n\t```python\n\n")  # tabs expanded, common indent removed
    assert block == "```\nprint('x')\n ```\n ```python\n```"
    assert is_code_block(block) and [line for line in block.split("\n") if line == "```"] == ["```", "```"]
    assert fence_code(" \n\n") == "" and not is_code_block("``` inline ```")


def _fences_balanced(text: str) -> bool:
    """Every fence opens then closes, and no passage starts or ends inside a block."""
    inside = False
    for line in text.split("\n"):
        if line == "```":
            inside = not inside
    return not inside


def test_chunks_never_cut_a_code_block_that_fits(counter):
    from embedpipe.documents.reading import Section

    code = fence_code("\n".join(f"value_{i} = compute({i}, retries=3)" for i in range(3)))
    prose = [f"Sentence {i} explains how the HX-{i} pump reads its configuration file." for i in range(8)]
    doc = Document("x.md", [Section(["X", "Config"], [" ".join(prose[:5]), code, " ".join(prose[5:])])])
    n_code = counter(code)
    assert 30 < n_code < 64
    for target in (64, 80, 100, 130):
        records = chunk_document(doc, counter, target_tokens=target, overlap_tokens=16, min_tokens=10)
        holders = [r["text"] for r in records if "```" in r["text"]]
        assert len(holders) == 1 and code in holders[0], target  # whole, exactly once
        assert all(_fences_balanced(r["text"]) for r in records)
        assert all(counter(r["text"]) <= target + 16 for r in records)


def test_a_code_block_longer_than_a_passage_is_cut_into_fenced_pieces(counter):
    from embedpipe.documents.reading import Section

    lines = [f"    step_{i} = pipeline.run(stage={i}, workers=4)" for i in range(40)]
    doc = Document("x.md", [Section(["X", "Long code"], ["Intro sentence.", fence_code("def main():\n" + "\n".join(lines))])])
    records = chunk_document(doc, counter, target_tokens=60, overlap_tokens=10, min_tokens=10)
    pieces = [r["text"][r["text"].index("```") :] for r in records if "```" in r["text"]]
    assert len(pieces) > 3
    for piece in pieces:
        assert is_code_block(piece) and _fences_balanced(piece)
        assert counter(piece) <= 60
    body = [line for piece in pieces for line in piece.split("\n") if line != "```"]
    assert body == ["def main():", *lines]  # every line, in order, exactly once
