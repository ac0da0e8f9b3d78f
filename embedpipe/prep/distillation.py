"""Teacher scores for prep's mined candidates: false-negative control and distillation labels (issue 13).

The base model mines candidates; a stronger teacher (default all-mpnet-base-v2, offline, see
`embedpipe.core.embedded`) then scores each question against its positive and candidates:
- a candidate the teacher scores within `false_negative_margin` of the positive (or above it) is most
  likely an unlabeled answer, so it is dropped instead of being pushed away (false-negative control);
- the survivors keep the teacher's score (`pos_doc[].teacher_score`, `neg_doc[].teacher_score`), which the
  finetune stage distils into the student (`finetune.loss: margin_mse | distill_kl | contrastive+...`).

Cost: the teacher is ~4-5x slower than MiniLM on a CPU, so its work is bounded: texts are truncated at
`max_seq_length`, at most `extra_candidates` more than `num_negatives` are mined for it to filter, and at
most `max_passages` distinct passage texts are scored (LLM-written questions first, then a seeded sample of
the rest; records past the cap keep their base-mined negatives and no teacher score; the metrics say how
many). On CPUs with AVX-512 BF16 / AMX the teacher runs under bf16 autocast (`bf16: auto`). The positive is
scored as the student sees it (an inverse-cloze positive without its query sentence). Every text goes through
the embedding store, so a passage is encoded once by the teacher however many questions share it, and never
again in a later run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedpipe.core.io import STRUCTURE_QUERY_TYPES, is_llm_written, passage_text, positive_passage_text

DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "model": "all-mpnet-base-v2",
    "query_prompt": "",
    "passage_prompt": "",
    "max_seq_length": 256,
    "extra_candidates": 3,
    "false_negative_margin": 0.05,
    "max_passages": 2000,
    "batch_size": 16,
    "device": None,
    "bf16": "auto",
}


def teacher_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """`prep.teacher` with defaults filled in; unknown keys are an error (a typo would silently do nothing)."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown prep.teacher key(s): {', '.join(sorted(unknown))} (known: {', '.join(DEFAULTS)})")
    return {**DEFAULTS, **cfg}


def mining_depth(num_negatives: int, cfg: dict[str, Any] | None) -> int:
    """How many candidates prep mines: `num_negatives`, plus `extra_candidates` for the teacher to filter."""
    t = teacher_config(cfg)
    return num_negatives + (int(t["extra_candidates"]) if t["enabled"] else 0)


def scoring_order(records: Sequence[dict[str, Any]], seed: int) -> list[int]:
    """The order records are offered to the teacher: LLM-written questions first (few, and the ones
    `finetune.llm_share` repeats), then the rest in a seeded shuffle, so a capped teacher labels a sample of the
    whole corpus rather than its first documents."""
    llm = [i for i, r in enumerate(records) if is_llm_written(r)]
    rest = [i for i, r in enumerate(records) if not is_llm_written(r)]
    random.Random(seed).shuffle(rest)
    return llm + rest


def record_texts(rec: dict[str, Any], corpus: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """(positive, candidates) as the student will see them: an inverse-cloze positive without its sentence."""
    pos = rec["pos_doc"][0]
    if rec.get("query_type") in STRUCTURE_QUERY_TYPES:  # the positive's title and text without the heading
        pos_text = positive_passage_text(corpus[pos["id"]], pos)
    else:  # (unchanged: an inverse-cloze positive is scored as its text alone)
        pos_text = pos.get("text") or passage_text(corpus[pos["id"]])
    return pos_text, [passage_text(corpus[n["id"]]) for n in rec.get("neg_doc") or []]


def _select(texts: Sequence[tuple[str, list[str]]], order: Sequence[int], cap: int) -> tuple[list[int], list[str]]:
    """Records scored (in `order`) while their texts fit under `cap` distinct passage texts (0 = no cap)."""
    chosen: list[int] = []
    passages: dict[str, None] = {}
    for i in order:
        pos, cands = texts[i]
        new = [p for p in dict.fromkeys([pos, *cands]) if p not in passages]
        if cap and len(passages) + len(new) > cap:
            break  # a clean cut in a seeded order: reproducible
        passages.update(dict.fromkeys(new))
        chosen.append(i)
    return sorted(chosen), list(passages)


def use_bf16(setting: Any, device: str) -> bool:
    """`prep.teacher.bf16`: auto = on CPUs with AVX-512 BF16 / AMX (2.6x faster for mpnet here, cosine >= 0.9999)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"prep.teacher.bf16 must be true, false or auto, got {setting!r}")
    from embedpipe.core.models import cpu_has_bf16

    return device == "cpu" and cpu_has_bf16()


def filter_and_label(
    records: Sequence[dict[str, Any]],
    scores: dict[int, tuple[float, list[float]]],
    num_negatives: int,
    margin: float,
) -> tuple[list[dict[str, Any]], int]:
    """Apply teacher scores: drop candidates with score > positive - margin, keep the first `num_negatives`
    survivors (base-model order), write `teacher_score`s. Unscored records keep their first `num_negatives`.
    Returns (records, candidates dropped as false negatives)."""
    out, dropped = [], 0
    for i, rec in enumerate(records):
        rec = {**rec, "pos_doc": [dict(p) for p in rec["pos_doc"]], "neg_doc": [dict(n) for n in rec.get("neg_doc") or []]}
        if i in scores:
            pos_score, neg_scores = scores[i]
            rec["pos_doc"][0]["teacher_score"] = round(pos_score, 6)
            kept = []
            for neg, s in zip(rec["neg_doc"], neg_scores, strict=True):
                if s > pos_score - margin:
                    dropped += 1
                    continue
                kept.append({**neg, "teacher_score": round(s, 6)})
            rec["neg_doc"] = kept
        rec["neg_doc"] = rec["neg_doc"][:num_negatives]
        out.append(rec)
    return out, dropped


def teacher_rescore(
    records: list[dict[str, Any]],
    corpus: dict[str, dict[str, Any]],
    cfg: dict[str, Any] | None,
    num_negatives: int,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """prep's one call: score unrolled records with the teacher (when `prep.teacher.enabled`), filter false
    negatives, label the rest. Returns (records, metrics). Disabled: records unchanged, `{"enabled": False}`."""
    t = teacher_config(cfg)
    if not t["enabled"]:
        return records, {"enabled": False}
    from embedpipe.core.embed_store import encode_cached
    from embedpipe.core.models import load_model

    started = time.time()
    texts = [record_texts(rec, corpus) for rec in records]
    chosen, passages = _select(texts, scoring_order(records, seed), int(t["max_passages"] or 0))
    model = load_model(t["model"], device=t["device"], max_seq_length=int(t["max_seq_length"]))
    bf16 = use_bf16(t["bf16"], model.device.type)
    questions = list(dict.fromkeys(records[i]["question"] for i in chosen))
    common = {"batch_size": int(t["batch_size"]), "label": f"teacher {t['model']}", "bf16": bf16}
    q_vec = encode_cached(model, questions, t["query_prompt"], desc="teacher questions", **common)
    p_vec = encode_cached(model, passages, t["passage_prompt"], desc="teacher passages", **common)
    q_row = {q: n for n, q in enumerate(questions)}
    p_row = {p: n for n, p in enumerate(passages)}
    scores: dict[int, tuple[float, list[float]]] = {}
    for i in chosen:
        q = q_vec[q_row[records[i]["question"]]]
        pos, cands = texts[i]
        scores[i] = (float(q @ p_vec[p_row[pos]]), [float(q @ p_vec[p_row[c]]) for c in cands])
    out, dropped = filter_and_label(records, scores, num_negatives, float(t["false_negative_margin"]))
    candidates = sum(len(s[1]) for s in scores.values())
    pos_scores = np.array([s[0] for s in scores.values()], dtype=np.float64)
    return out, {
        "enabled": True,
        "model": t["model"],
        "max_seq_length": int(t["max_seq_length"]),
        "bf16": bf16,
        "records_scored": len(chosen),
        "llm_records_scored": sum(is_llm_written(records[i]) for i in chosen),
        "records_not_scored": len(records) - len(chosen),
        "passages_scored": len(passages),
        "max_passages": int(t["max_passages"] or 0),
        "candidates_scored": candidates,
        "false_negatives_dropped": dropped,
        "false_negative_fraction": round(dropped / candidates, 4) if candidates else None,
        "false_negative_margin": float(t["false_negative_margin"]),
        "teacher_positive_score_mean": round(float(pos_scores.mean()), 4) if len(pos_scores) else None,
        "wall_time_s": round(time.time() - started, 1),
    }
