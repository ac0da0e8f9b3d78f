"""The user's own questions (`eval.user_questions`, default `data/questions.jsonl`): read, resolve, judge.

One JSON object per line, a question and what answers it, either a document or a snippet of the answering text:

    {"question": "How often should the HX-200 seals be replaced?", "answer_file": "manuals/hx-200-product-manual.md"}
    {"question": "What does error E07 mean?", "answer_text": "E07 indicates a suction pressure below"}

Resolution against the chunked corpus (`data/chunks/corpus.jsonl`, whose passages record their source file,
relative to `chunk.docs_dir`, in `doc`):
- `answer_file`: every passage of that file is relevant;
- `answer_text`: every passage whose text contains the snippet (whitespace-normalised, case-insensitive) is
  relevant, provided they all come from at most MAX_ANSWER_FILES file(s): a snippet found in passages of several
  files (boilerplate, a sentence repeated across manuals) does not say which document answers, so it is an error
  asking for a longer snippet or `answer_file`.
Every problem is a FormatError naming the file and line. This module only reads and judges (standard library
and embedpipe.core.io); the eval stage searches the queries over the whole corpus with both models.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from embedpipe.core.io import FormatError, Qrels, read_json

MAX_ANSWER_FILES = 1  # answer_text must resolve to passages of one file; more is ambiguous (an error)
README_HINT = 'README "Your own questions: the way to know"'
METRICS = ("ndcg@10", "mrr@10", "recall@10")  # what the user_questions block reports
HEADLINE = "ndcg@10"  # a model worse than base on it is not shipped (export, deploy_check)


@dataclass
class UserQuestions:
    """Resolved questions: BEIR-style queries and qrels (ids `line<N>`), and how each was resolved."""

    path: str
    queries: dict[str, dict[str, Any]] = field(default_factory=dict)
    qrels: Qrels = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # query id -> line number in the file


def normalise(text: str) -> str:
    """Whitespace collapsed to single spaces, case folded: how snippets and passages are compared."""
    return " ".join(text.split()).casefold()


def _clean_path(value: str) -> str:
    return PurePosixPath(value.replace("\\", "/").strip()).as_posix().removeprefix("./")


def load_user_questions(path: str | Path, corpus: Mapping[str, Mapping[str, Any]]) -> UserQuestions:
    """Read and resolve the questions file against `corpus` (the chunked corpus, keyed by passage id).

    An empty file (or one of blank lines) gives no questions: that is how a DVC user switches them off while
    keeping the stage's dependency in place.
    """
    path = Path(path)
    by_file: dict[str, list[str]] = {}
    for pid, record in corpus.items():
        by_file.setdefault(_clean_path(str(record.get("doc") or "")), []).append(pid)
    texts = {pid: normalise(str(record.get("text") or "")) for pid, record in corpus.items()}
    result = UserQuestions(str(path))
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{where}: not valid JSON ({e.msg}); expected "
                                  '{"question": ..., "answer_file": ...} or {"question": ..., "answer_text": ...}') from None
            if not isinstance(record, dict):
                raise FormatError(f"{where}: expected a JSON object with 'question' and 'answer_file' or 'answer_text'")
            question = record.get("question")
            if not isinstance(question, str) or not question.strip():
                raise FormatError(f"{where}: 'question' is missing or empty")
            has_file, has_text = "answer_file" in record, "answer_text" in record
            if has_file == has_text:
                raise FormatError(f"{where}: give exactly one of 'answer_file' (a path in the documents folder) "
                                  "or 'answer_text' (a verbatim snippet of the answering passage)")
            if has_file:
                relevant = _resolve_file(where, record["answer_file"], by_file)
            else:
                relevant = _resolve_text(where, record["answer_text"], texts, corpus)
            qid = f"line{line_no}"
            result.queries[qid] = {"_id": qid, "text": question.strip(), "metadata": {"line": line_no}}
            result.qrels[qid] = {pid: 1 for pid in relevant}
            result.lines[qid] = line_no
    return result


def _resolve_file(where: str, value: Any, by_file: Mapping[str, list[str]]) -> list[str]:
    if not isinstance(value, str) or not value.strip():
        raise FormatError(f"{where}: 'answer_file' must be a non-empty path relative to the documents folder")
    wanted = _clean_path(value)
    if wanted in by_file:
        return by_file[wanted]
    close = difflib.get_close_matches(wanted, [f for f in by_file if f], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise FormatError(
        f"{where}: answer_file '{wanted}' has no passage in the chunked corpus: the file is missing from the "
        f"documents folder (chunk.docs_dir), was skipped by chunk (data/chunks/skipped.jsonl), or the path is not "
        f"relative to that folder{hint}. If this questions file was written for other documents, replace it with "
        f"questions on yours, or empty it to skip them ({README_HINT})"
    )


def _resolve_text(where: str, value: Any, texts: Mapping[str, str], corpus: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not isinstance(value, str) or not normalise(value):
        raise FormatError(f"{where}: 'answer_text' must be a non-empty snippet of the answering passage")
    snippet = normalise(value)
    hits = [pid for pid, text in texts.items() if snippet in text]
    if not hits:
        raise FormatError(
            f"{where}: answer_text '{_short(value)}' is in no passage of the chunked corpus (compared with "
            "whitespace collapsed and case ignored, on the passage text as chunk wrote it: markup removed). "
            "Copy a shorter snippet from within one passage, or give 'answer_file'"
        )
    files = sorted({str(corpus[pid].get("doc") or "?") for pid in hits})
    if len(files) > MAX_ANSWER_FILES:
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise FormatError(
            f"{where}: answer_text '{_short(value)}' is ambiguous: it is in passages of {len(files)} files "
            f"({shown}); at most {MAX_ANSWER_FILES} allowed. Use a longer snippet, or 'answer_file'"
        )
    return hits


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- the shipping gate (export, deploy_check) ----------------------------------------------------------


def shipping_verdict(eval_metrics_path: str | Path, allow_regression: bool, model: str | None = None) -> tuple[bool, str]:
    """(ship?, one-line reason) from the `user_questions` block of metrics/eval.json.

    Refuses when the fine-tuned model's mean nDCG@10 on the user's own questions is lower than the base
    model's, unless `allow_regression` (params `eval.user_questions_allow_regression`). No metrics file, or no
    block (no questions file, or an eval of one model only): nothing to judge, shipping goes on. `model`: the
    model about to ship; when eval judged another one, the block says nothing about it and is not applied.
    """
    path = Path(eval_metrics_path)
    if not path.is_file():
        return True, f"{path} not found: the user-question check is skipped"
    block = (read_json(path) or {}).get("user_questions")
    if not isinstance(block, dict) or "delta" not in block:
        return True, f"no user questions judged in {path} (add some: {README_HINT})"
    judged = block.get("finetuned_model")
    if model and judged and Path(str(judged)).resolve() != Path(str(model)).resolve():
        return True, f"{path} judged the user questions on {judged}, not on {model}: the check does not apply"
    d = float(block["delta"][HEADLINE])
    n = block.get("questions")
    said = (f"on your {n} questions ({block.get('file')}) the fine-tuned model's nDCG@10 is "
            f"{block['finetuned'][HEADLINE]:.4f} vs the base model's {block['base'][HEADLINE]:.4f} ({d:+.4f})")
    if not block.get("regression"):
        return True, said
    if allow_regression:
        return True, said + ": worse, shipped anyway (eval.user_questions_allow_regression: true)"
    return False, (said + ": worse than the model you started from, so it is not shipped. See the questions "
                   "that lost in data/eval/report.md; to ship it anyway set eval.user_questions_allow_regression: "
                   "true in params.yaml")
