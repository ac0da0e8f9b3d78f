"""Step 2 of the recipe: leak-free train/val/test split, margin-filtered hard-negative mining, multi-hop unrolling.

Why grouped splits: a test question whose source document also fed training (as a positive or as a
mined negative) measures memorisation, not retrieval. So the split holds out whole documents and
every passage of a held-out document is removed from the passages training may see.

Why the margin: an unlabeled passage scoring almost as high as the labeled positive is often a
missed positive (a false negative); the ceiling `min_pos - |min_pos| * relative_margin` keeps the
miner below it (the recipe's "95% of the lowest positive score", correct for negative scores too).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedpipe.core.retrieval import search

GROUP_BY = ("document", "passage", "none")
MARGIN_MODES = ("relative", "absolute")


class PrepError(ValueError):
    """The inputs cannot be prepared (bad qa records, too little data); the message says why."""


# --- validation of the SDG output -------------------------------------------------------------


def clean_questions(qa: list[dict[str, Any]], corpus: dict[str, dict[str, Any]]) -> tuple[list[dict], dict[str, int]]:
    """Keep usable qa records: an id, a question, >= 1 known positive. Returns (kept, dropped-by-reason)."""
    kept: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    seen: set[str] = set()

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    for record in qa:
        qid, question, segments = record.get("id"), record.get("question"), record.get("segment_ids")
        if not isinstance(qid, str) or not qid or not isinstance(question, str) or not question.strip():
            drop("missing id or question")
        elif qid in seen:
            drop("duplicate id")
        elif not isinstance(segments, list) or not segments:
            drop("no segment_ids")
        elif any(s not in corpus for s in segments):
            drop("segment id not in corpus")
        else:
            seen.add(qid)
            # Positives in order, duplicates removed (a segment listed twice is one positive).
            kept.append({**record, "segment_ids": list(dict.fromkeys(segments))})
    return kept, dropped


# --- split ------------------------------------------------------------------------------------


@dataclass
class Split:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    held_out: set[str]  # passage ids training must never see (positive or negative)
    group_by: str  # the grouping actually used (may differ from the one asked for, see `fallback`)
    fallback: str | None = None
    dropped_cross_split: int = 0  # questions whose positives span train and test groups
    notes: list[str] = field(default_factory=list)


def _components(units_per_question: list[list[str]]) -> dict[str, str]:
    """Union-find over units (documents or passages) that share a question: unit -> component root."""
    parent: dict[str, str] = {}

    def find(u: str) -> str:
        parent.setdefault(u, u)
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for units in units_per_question:
        root = find(units[0])
        for u in units[1:]:
            other = find(u)
            if other != root:
                parent[max(root, other)] = min(root, other)
                root = min(root, other)
    return {u: find(u) for u in parent}


def _pick_test_groups(counts: dict[str, int], target: float, rng: random.Random, floor: int = 0) -> set[str]:
    """Shuffle groups; add a group to test whenever that brings the test question count closer to target.

    Then, while the test holds fewer than `floor` questions, add the smallest remaining group that
    reaches it (or the largest one when none does); one group always stays on the training side.
    """
    groups = sorted(counts)
    rng.shuffle(groups)
    test: set[str] = set()
    total = 0
    for g in groups:
        if abs(total + counts[g] - target) < abs(total - target):
            test.add(g)
            total += counts[g]
    if not test and len(groups) > 1:  # every group is larger than the target: hold out the smallest
        smallest = min(groups, key=lambda g: (counts[g], groups.index(g)))
        test.add(smallest)
        total = counts[smallest]
    while total < floor:
        rest = [g for g in groups if g not in test]
        if len(rest) < 2:
            break
        reaching = [g for g in rest if total + counts[g] >= floor]
        pick = min(reaching, key=lambda g: counts[g]) if reaching else max(rest, key=lambda g: counts[g])
        test.add(pick)
        total += counts[pick]
    return test


def _grouped(questions: list[dict], unit_of: Callable[[str], str], test_fraction: float, rng: random.Random,
             floor: int = 0):
    """Split by units; returns (train, test, test_units, dropped) or None when the units cannot be split."""
    units = [list(dict.fromkeys(unit_of(s) for s in q["segment_ids"])) for q in questions]
    if len({u for us in units for u in us}) < 2:
        return None
    target = test_fraction * len(questions)
    # First try whole connected components (units linked by a multi-hop question): nothing is dropped.
    comp = _components(units)
    counts: dict[str, int] = {}
    for us in units:
        counts[comp[us[0]]] = counts.get(comp[us[0]], 0) + 1
    test_groups = _pick_test_groups(counts, target, rng, floor) if len(counts) > 1 else set()
    if test_groups and len(test_groups) < len(counts):
        test_units = {u for u, c in comp.items() if c in test_groups}
    else:
        # One component spans everything: split single units and drop the questions that straddle.
        counts = {}
        for us in units:
            counts[us[0]] = counts.get(us[0], 0) + 1
        for us in units:
            for u in us:
                counts.setdefault(u, 0)
        test_units = _pick_test_groups(counts, target, rng, floor)
    train, test, dropped = [], [], 0
    for q, us in zip(questions, units, strict=True):
        inside = sum(u in test_units for u in us)
        if inside == len(us):
            test.append(q)
        elif inside == 0:
            train.append(q)
        else:
            dropped += 1
    if not train or not test:
        return None
    return train, test, test_units, dropped


def split_questions(
    questions: list[dict[str, Any]],
    corpus: dict[str, dict[str, Any]],
    *,
    test_fraction: float = 0.2,
    test_min: int = 0,
    val_fraction: float = 0.1,
    val_min: int = 5,
    seed: int = 42,
    group_by: str = "document",
) -> Split:
    """Deterministic train/val/test split; all positives of a question stay on one side.

    group_by=document: no test question shares a source document with a training question and every
    passage of a test document is held out of training. group_by=passage: the same per passage.
    group_by=none: questions split at random (a test passage may be a training negative; not leak-free).
    When the asked grouping is impossible (e.g. a single document) the next finer one is used and
    `fallback` says so. A small set holds out at least `test_min` questions (never more than half):
    a 20% test of a few hundred questions is too small to tell a gain from noise.
    """
    if group_by not in GROUP_BY:
        raise PrepError(f"prep.group_by must be one of {', '.join(GROUP_BY)}, got '{group_by}'")
    if not 0 < test_fraction < 1:
        raise PrepError(f"prep.test_fraction must be between 0 and 1, got {test_fraction}")
    if len(questions) < 2:
        raise PrepError(f"need at least 2 usable questions to split, got {len(questions)}")
    test_fraction = max(test_fraction, min(test_min / len(questions), 0.5))
    floor = min(test_min, len(questions) // 2)  # whole groups may overshoot the target; never undershoot this
    rng = random.Random(seed)
    asked, notes = group_by, []
    result = None
    for mode in GROUP_BY[GROUP_BY.index(group_by) :]:
        if mode == "none":
            order = list(range(len(questions)))
            rng.shuffle(order)
            n_test = min(len(questions) - 1, max(1, round(test_fraction * len(questions))))
            test_idx = set(order[:n_test])
            train = [q for i, q in enumerate(questions) if i not in test_idx]
            test = [q for i, q in enumerate(questions) if i in test_idx]
            result = (train, test, set(), 0)
        else:
            unit_of = (lambda s: corpus[s].get("doc") or s) if mode == "document" else (lambda s: s)
            result = _grouped(questions, unit_of, test_fraction, rng, floor)
        if result is not None:
            group_by = mode
            break
        notes.append(f"group_by={mode} is impossible here (all questions fall in one {mode} group)")
    assert result is not None
    train, test, test_units, dropped = result
    if group_by == "document":
        held_out = {pid for pid, rec in corpus.items() if (rec.get("doc") or pid) in test_units}
    else:
        held_out = set(test_units)
    # Validation slice: a seeded sample of training questions, at least val_min, never all of them.
    n_val = min(max(round(val_fraction * len(train)), val_min if val_fraction > 0 else 0), len(train) // 2)
    val_idx = set(random.Random(seed + 1).sample(range(len(train)), n_val))
    val = [q for i, q in enumerate(train) if i in val_idx]
    train = [q for i, q in enumerate(train) if i not in val_idx]
    fallback = None if group_by == asked else f"{asked} -> {group_by}: " + "; ".join(notes)
    return Split(train, val, test, held_out, group_by, fallback, dropped, notes)


# --- mining -----------------------------------------------------------------------------------


def margin_ceiling(min_pos: np.ndarray, mode: str = "relative", relative_margin: float = 0.05,
                   absolute_margin: float = 0.0) -> np.ndarray:
    """Highest score a negative may have: relative `min_pos - |min_pos| * m` or absolute `min_pos - m`.

    Using |min_pos| keeps the ceiling below the positive when scores are negative
    (0.95 * -0.2 = -0.19 would sit *above* the positive).
    """
    min_pos = np.asarray(min_pos, dtype=np.float32)
    if mode == "relative":
        return min_pos - np.abs(min_pos) * np.float32(relative_margin)
    if mode == "absolute":
        return min_pos - np.float32(absolute_margin)
    raise PrepError(f"prep.margin_mode must be one of {', '.join(MARGIN_MODES)}, got '{mode}'")


@dataclass
class Mined:
    pos_scores: list[list[float]]  # per query, aligned with its positives
    neg_rows: list[list[int]]  # per query, candidate rows, best first (<= k)
    neg_scores: list[list[float]]
    removed_by_margin: int  # candidates (non-positive) scoring above the ceiling, all queries (-1: not counted)
    candidates: int  # non-positive candidates, all queries together
    short: int  # queries with fewer than k negatives


def mine(
    query_emb: np.ndarray,
    corpus_emb: np.ndarray,
    positives: Sequence[Sequence[int]],
    k: int = 5,
    *,
    mode: str = "relative",
    relative_margin: float = 0.05,
    absolute_margin: float = 0.0,
    query_batch: int = 256,
    corpus_block: int = 16384,
    count_removed: bool = True,
) -> Mined:
    """Top-k negatives per query below the margin ceiling; every positive of the query is excluded.

    `corpus_emb` must hold only the passages training may see (held-out passages removed by the caller),
    `positives[i]` the rows of ALL positives of query i (mine before unrolling, so siblings are excluded).
    count_removed runs one extra blockwise matmul to count candidates above the ceiling (for metrics).
    """
    pos_scores = [[float(query_emb[i] @ corpus_emb[j]) for j in rows] for i, rows in enumerate(positives)]
    if any(not rows for rows in positives):
        raise PrepError("every query needs at least one positive")
    ceiling = margin_ceiling(np.array([min(s) for s in pos_scores], dtype=np.float32), mode, relative_margin,
                             absolute_margin)
    scores, rows = search(query_emb, corpus_emb, k, exclude=positives, max_score=ceiling,
                          query_batch=query_batch, corpus_block=corpus_block)
    neg_rows, neg_scores = [], []
    for s, r in zip(scores, rows, strict=True):
        keep = r >= 0
        neg_rows.append([int(x) for x in r[keep]])
        neg_scores.append([float(x) for x in s[keep]])
    candidates = sum(len(corpus_emb) - len(p) for p in positives)
    removed = -1
    if count_removed:
        removed = 0
        for start in range(0, len(query_emb), query_batch):
            end = min(start + query_batch, len(query_emb))
            for c_start in range(0, len(corpus_emb), corpus_block):
                block = query_emb[start:end] @ corpus_emb[c_start : c_start + corpus_block].T
                removed += int((block > ceiling[start:end, None]).sum())
        # Positives score >= min_pos > ceiling (unless the margin is negative): they are not candidates.
        removed -= sum(int(sum(s > c for s in ps)) for ps, c in zip(pos_scores, ceiling, strict=True))
    short = sum(len(r) < k for r in neg_rows)
    return Mined(pos_scores, neg_rows, neg_scores, removed, candidates, short)


# --- unrolling and formats ----------------------------------------------------------------------


def _r(x: float) -> float:
    return round(float(x), 6)


def unroll(questions: list[dict[str, Any]], ids: Sequence[str], mined: Mined) -> list[dict[str, Any]]:
    """One example per (question, positive): ids `<qaid>_0`, `<qaid>_1`, ... sharing the question's negatives."""
    out = []
    for q, pos_sc, n_rows, n_sc in zip(questions, mined.pos_scores, mined.neg_rows, mined.neg_scores, strict=True):
        negs = [{"id": ids[r], "score": _r(s)} for r, s in zip(n_rows, n_sc, strict=True)]
        for i, (pid, ps) in enumerate(zip(q["segment_ids"], pos_sc, strict=True)):
            pos = {"id": pid, "score": _r(ps)}
            if (q.get("positive_texts") or {}).get(pid):  # inverse cloze: the positive without its query sentence
                pos["text"] = q["positive_texts"][pid]
            if pid in (q.get("positive_titles") or {}):  # heading / anchor pairs: the title without the heading
                pos["title"] = q["positive_titles"][pid]
            out.append({
                "question_id": f"{q['id']}_{i}",
                "source_id": q["id"],
                "question": q["question"],
                "pos_doc": [pos],
                "neg_doc": negs,
                "query_type": q.get("query_type"),
                "hop_count": q.get("hop_count", len(q["segment_ids"])),
            })
    return out


def beir_test_set(test: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Test questions as BEIR queries (with metadata for per-type breakdowns) and qrels (score 1 per positive)."""
    queries = [{
        "_id": q["id"],
        "text": q["question"],
        "metadata": {key: q.get(key) for key in ("query_type", "hop_count", "question_complexity", "reasoning_type")},
    } for q in test]
    qrels = {q["id"]: {pid: 1 for pid in q["segment_ids"]} for q in test}
    return queries, qrels
