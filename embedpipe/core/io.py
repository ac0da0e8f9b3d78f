"""File formats shared by the stages: JSONL records, JSON metrics, BEIR evaluation folders.

Every write is atomic (temporary file + rename), so a killed stage never leaves half a file.
The formats themselves are documented once, in README.md ("File formats").
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO


class FormatError(ValueError):
    """An input file does not follow its documented format; the message names file and line."""


@contextmanager
def atomic_open(path: str | Path) -> Iterator[TextIO]:
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise FormatError(f"{path}:{line_no}: expected a JSON object")
            yield record


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically, one JSON object per line; return how many were written."""
    count = 0
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record and flush it to disk, for logs that must survive a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def load_corpus(path: str | Path) -> dict[str, dict[str, Any]]:
    """Load a BEIR corpus (`_id`, `title`, `text`, ...) keyed by id, in file order."""
    corpus: dict[str, dict[str, Any]] = {}
    for line_no, record in enumerate(iter_jsonl(path), 1):
        doc_id = record.get("_id")
        if not isinstance(doc_id, str) or not doc_id:
            raise FormatError(f"{path}:{line_no}: record has no '_id'")
        if not isinstance(record.get("text"), str):
            raise FormatError(f"{path}:{line_no}: record '{doc_id}' has no 'text'")
        corpus[doc_id] = record
    return corpus


STRUCTURE_QUERY_TYPES = ("headings", "anchors", "definitions")
"""Query types read from the documents' structure (`embedpipe.sdg.structure`): a heading, a link's text, a term."""
LLM_FREE_QUERY_TYPES = ("inverse_cloze", *STRUCTURE_QUERY_TYPES)
"""Query types made without an LLM: a sentence cut from a passage, and the structure ones."""


def is_llm_written(record: dict[str, Any]) -> bool:
    """A question record an LLM wrote (not an inverse-cloze sentence, heading or anchor text): the human-like ones."""
    return record.get("query_type") not in LLM_FREE_QUERY_TYPES


def without_structure(record: dict[str, Any]) -> dict[str, Any]:
    """A corpus record without the chunker's `structure` field (only sdg reads it)."""
    return {k: v for k, v in record.items() if k != "structure"} if "structure" in record else record


def positive_passage_text(corpus_record: dict[str, Any], positive: dict[str, Any]) -> str:
    """What a model sees for a training positive: the corpus passage, with the text and title sdg gave it in its
    place when there is one (`pos_doc[].text` / `.title`: inverse cloze without its sentence, a heading or anchor
    pair without the heading)."""
    override = {k: positive[k] for k in ("text", "title") if positive.get(k) is not None}
    return passage_text({**corpus_record, **override} if override else corpus_record)


def passage_text(record: dict[str, Any]) -> str:
    """The text a model sees for a passage: title and body, as BEIR does."""
    title = (record.get("title") or "").strip()
    text = record.get("text") or ""
    return f"{title}\n{text}" if title else text


# --- BEIR folders: corpus.jsonl, queries.jsonl, qrels/test.tsv ---------------------------------

Qrels = dict[str, dict[str, int]]


def write_beir(
    folder: str | Path,
    corpus: Iterable[dict[str, Any]],
    queries: Iterable[dict[str, Any]],
    qrels: Qrels,
    split: str = "test",
) -> None:
    folder = Path(folder)
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", queries)
    with atomic_open(folder / "qrels" / f"{split}.tsv") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["query-id", "corpus-id", "score"])
        for query_id, docs in qrels.items():
            for doc_id, score in docs.items():
                writer.writerow([query_id, doc_id, score])


def load_beir(
    folder: str | Path, split: str = "test"
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], Qrels]:
    """Load and validate a BEIR folder; every problem names the file and line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: BEIR folder not found")
    paths = {
        "corpus": folder / "corpus.jsonl",
        "queries": folder / "queries.jsonl",
        "qrels": folder / "qrels" / f"{split}.tsv",
    }
    for path in paths.values():
        if not path.is_file():
            raise FormatError(f"{path}: missing (a BEIR folder needs corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    corpus = load_corpus(paths["corpus"])
    if not corpus:
        raise FormatError(f"{paths['corpus']}: no passages")
    queries: dict[str, dict[str, Any]] = {}
    for line_no, record in enumerate(iter_jsonl(paths["queries"]), 1):
        query_id = record.get("_id")
        if not isinstance(query_id, str) or not query_id:
            raise FormatError(f"{paths['queries']}:{line_no}: record has no '_id'")
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            raise FormatError(f"{paths['queries']}:{line_no}: query '{query_id}' has empty text")
        queries[query_id] = record
    qrels: Qrels = {}
    with paths["qrels"].open(encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (line_no == 1 and row[0] == "query-id"):
                continue
            if len(row) != 3:
                raise FormatError(f"{paths['qrels']}:{line_no}: expected 3 tab-separated columns")
            query_id, doc_id, score = row
            if query_id not in queries:
                raise FormatError(f"{paths['qrels']}:{line_no}: unknown query id '{query_id}'")
            if doc_id not in corpus:
                raise FormatError(f"{paths['qrels']}:{line_no}: unknown corpus id '{doc_id}'")
            try:
                qrels.setdefault(query_id, {})[doc_id] = int(score)
            except ValueError:
                raise FormatError(f"{paths['qrels']}:{line_no}: score '{score}' is not an integer") from None
    if not qrels:
        raise FormatError(f"{paths['qrels']}: no judgements")
    queries = {qid: q for qid, q in queries.items() if qid in qrels}
    return corpus, queries, qrels
