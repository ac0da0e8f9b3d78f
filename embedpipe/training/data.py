"""Prep records -> what the trainer reads: the training table (anchor, positive, negative_1..k and the teacher's
scores when a distillation loss needs them), LLM-question oversampling, and the validation set.

Passages are `passage_text(record)` (title + body, as BEIR does); an inverse-cloze positive is the passage without
its query sentence (`pos_doc[].text`, written by sdg).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from embedpipe.core.io import FormatError, is_llm_written, passage_text, positive_passage_text


@dataclass
class TrainingTable:
    """Columns for the trainer (`anchor`, `positive`, `negative_1..k`, and `label` = teacher scores when a
    distillation loss needs them) and what was dropped or padded on the way."""

    columns: dict[str, list[Any]]
    examples: int
    padded: int = 0  # examples with fewer mined negatives than wanted (padded by repetition)
    no_negatives: int = 0  # examples dropped because they had no negative at all
    missing_passages: int = 0  # examples dropped because their positive is not in the corpus
    negatives_wanted: int = 0
    no_teacher_scores: int = 0  # examples dropped because prep's teacher did not score them (its passages cap)
    llm_examples: int = 0  # examples whose question an LLM wrote (repeats included)
    llm_repeats: int = 1  # times each LLM-written record appears (oversample_llm_questions)


def pick_negatives(neg_doc: Sequence[dict[str, Any]], k: int, known: set[str] | dict[str, Any]) -> list[str]:
    """The k top-ranked negatives (highest score first), padded by repeating them in order when fewer exist.

    Returns [] when there is no usable negative (the caller decides what to do with such an example).
    """
    return [n["id"] for n in pick_negative_records(neg_doc, k, known)]


def pick_negative_records(
    neg_doc: Sequence[dict[str, Any]], k: int, known: set[str] | dict[str, Any]
) -> list[dict[str, Any]]:
    """`pick_negatives` returning the records (id, score, teacher_score when prep wrote one)."""
    ranked = sorted((n for n in neg_doc if n.get("id") in known), key=lambda n: -float(n.get("score", 0.0)))[:k]
    if not ranked:
        return []
    return [ranked[i % len(ranked)] for i in range(k)]


def oversample_llm_questions(records: Sequence[dict[str, Any]], share: float) -> tuple[list[dict[str, Any]], int]:
    """Repeat the LLM-written records until they are at least `share` of all records; returns (records, repeats).

    Why: under a CPU time budget the trainer sees ~1,300 of ~6,000 examples, and with ~25 LLM questions among
    thousands of inverse-cloze sentences only a handful of the human-like questions are ever trained on.
    `share` 0 (or a set without LLM or without inverse-cloze records) leaves the records as they are.
    """
    if not 0 <= share < 1:
        raise ValueError(f"finetune.llm_share must be in [0, 1), got {share}")
    llm = [r for r in records if is_llm_written(r)]
    other = len(records) - len(llm)
    if share <= 0 or not llm or not other or len(llm) >= share * len(records):
        return list(records), 1
    repeats = math.ceil(share * other / ((1 - share) * len(llm)))
    return list(records) + llm * (repeats - 1), repeats


def teacher_scored(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The records prep's teacher labelled (their positive has a `teacher_score`), and how many it did not."""
    kept = [r for r in records if (r.get("pos_doc") or [{}])[0].get("teacher_score") is not None]
    return kept, len(records) - len(kept)


def build_training_table(
    records: Sequence[dict[str, Any]],
    corpus: dict[str, dict[str, Any]],
    passages_per_query: int,
    teacher_labels: bool = False,
) -> TrainingTable:
    """Prep records (one per question x positive) -> text columns. Passages are `passage_text(record)`.

    With `teacher_labels`, a `label` column holds the teacher's scores [positive, negative_1..k] (padded
    negatives repeat their score), as sentence-transformers' MarginMSELoss / DistillKLDivLoss expect.
    """
    if passages_per_query < 1:
        raise ValueError(f"passages_per_query must be >= 1, got {passages_per_query}")
    k = passages_per_query - 1
    cols: dict[str, list[Any]] = {"anchor": [], "positive": [], **{f"negative_{i + 1}": [] for i in range(k)}}
    if teacher_labels:
        cols["label"] = []
    table = TrainingTable(columns=cols, examples=0, negatives_wanted=k)
    for n, rec in enumerate(records, 1):
        try:
            question, pos = rec["question"], rec["pos_doc"][0]
            pos_id = pos["id"]
            neg_doc = rec.get("neg_doc") or []
        except (KeyError, IndexError, TypeError):
            raise FormatError(f"train record {n}: needs 'question', 'pos_doc': [{{'id': ...}}] and 'neg_doc'") from None
        if pos_id not in corpus:
            table.missing_passages += 1
            continue
        negatives = pick_negative_records(neg_doc, k, corpus) if k else []
        if k and not negatives:
            table.no_negatives += 1
            continue
        if teacher_labels:
            scores = [pos.get("teacher_score"), *(neg.get("teacher_score") for neg in negatives)]
            if any(s is None for s in scores):
                table.no_teacher_scores += 1
                continue
            cols["label"].append([float(s) for s in scores])
        if k and len({n["id"] for n in neg_doc if n.get("id") in corpus}) < k:
            table.padded += 1
        cols["anchor"].append(question)
        # sdg's positive_texts / positive_titles (inverse cloze without its sentence, headings without the heading)
        cols["positive"].append(positive_passage_text(corpus[pos_id], pos))
        for i, neg in enumerate(negatives):
            cols[f"negative_{i + 1}"].append(passage_text(corpus[neg["id"]]))
        table.examples += 1
        table.llm_examples += is_llm_written(rec)
    return table


def validation_queries(
    records: Sequence[dict[str, Any]], corpus: dict[str, Any]
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Unrolled val records -> (queries, relevant docs): grouping by source_id gives every positive of a question."""
    queries: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    for rec in records:
        qid = str(rec.get("source_id") or rec["question_id"])
        queries[qid] = rec["question"]
        relevant.setdefault(qid, set()).update(p["id"] for p in rec.get("pos_doc", []) if p["id"] in corpus)
    keep = {q for q, docs in relevant.items() if docs}
    return {q: queries[q] for q in keep}, {q: relevant[q] for q in keep}


@dataclass
class ValidationSet:
    """Val questions over a bounded sub-corpus, so each validation costs the same whatever the corpus size."""

    queries: dict[str, str]
    relevant: dict[str, set[str]]
    corpus: dict[str, str]  # passage id -> passage text (what the evaluator encodes)
    positives: int
    negatives: int  # mined negatives of the val questions (not positives)
    sampled: int  # random fill-up passages
    corpus_total: int  # passages of train_corpus.jsonl
    max_passages: int  # the cap (0 = the whole corpus)
    llm_questions: int = 0  # val questions written by an LLM (not inverse cloze)
    inverse_cloze_left_out: int = 0  # inverse-cloze val questions not used (val_prefer_llm_questions)

    def describe(self) -> dict[str, int]:
        return {"passages": len(self.corpus), "positives": self.positives, "mined_negatives": self.negatives,
                "random_sample": self.sampled, "corpus_passages": self.corpus_total, "max_passages": self.max_passages,
                "questions": len(self.queries), "llm_questions": self.llm_questions,
                "inverse_cloze_left_out": self.inverse_cloze_left_out}


def prefer_llm_questions(records: Sequence[dict[str, Any]], min_llm: int) -> tuple[list[dict[str, Any]], int, int]:
    """Val records without the inverse-cloze ones when at least `min_llm` LLM-written questions remain.

    Why: an inverse-cloze query is a sentence cut from its own positive, so it rewards string overlap and
    predicts gains on human questions poorly; LLM questions are closer to them. Too few LLM questions make a
    noisy validation, so below `min_llm` every question is kept. Returns (records, llm questions, left out).
    """
    def source(r: dict[str, Any]) -> str:
        return str(r.get("source_id") or r["question_id"])

    llm = {source(r) for r in records if is_llm_written(r)}
    ict = {source(r) for r in records} - llm
    if len(llm) < max(1, min_llm) or not ict:
        return list(records), len(llm), 0
    return [r for r in records if source(r) in llm], len(llm), len(ict)


def validation_set(
    records: Sequence[dict[str, Any]], corpus: dict[str, dict[str, Any]], max_passages: int, seed: int,
    min_llm_questions: int = 0,
) -> ValidationSet:
    """The val questions' positives + their mined negatives + a fixed random sample of the rest, up to
    `max_passages` (0 = whole corpus). Positives and negatives are always kept (even past the cap): they are
    what the ranking is about; the random sample only adds distractors so the task is not trivially small.
    `min_llm_questions` > 0: see `prefer_llm_questions`."""
    from embedpipe.core.retrieval import bounded_corpus

    kept, llm, left_out = prefer_llm_questions(records, min_llm_questions)
    if min_llm_questions > 0:
        records = kept
    else:
        left_out = 0
    queries, relevant = validation_queries(records, corpus)
    positives = {p for docs in relevant.values() for p in docs}
    negatives = {n["id"] for r in records for n in r.get("neg_doc") or [] if n.get("id") in corpus} - positives
    chosen, sampled = bounded_corpus(list(corpus), positives | negatives, max_passages, seed)
    texts = {pid: passage_text(corpus[pid]) for pid in chosen}
    return ValidationSet(queries, relevant, texts, len(positives), len(negatives), sampled, len(corpus),
                         max(0, int(max_passages)), llm, left_out)
