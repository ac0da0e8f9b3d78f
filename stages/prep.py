"""Stage `prep`: QA pairs + corpus -> leak-free split, hard negatives mined with the base model, unrolled examples."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import click

from embedpipe.core.bulk_encoder import use_bulk_encoder
from embedpipe.core.console import summary, warn
from embedpipe.core.embed_store import encode_backends, encode_cached, encode_counts
from embedpipe.core.io import (
    FormatError,
    load_corpus,
    passage_text,
    read_jsonl,
    without_structure,
    write_beir,
    write_json,
    write_jsonl,
)
from embedpipe.core.models import ModelNotAvailable, load_model
from embedpipe.core.params import ParamsError, load_params, section
from embedpipe.prep.distillation import mining_depth, teacher_rescore
from embedpipe.prep.mining import (
    PrepError,
    beir_test_set,
    clean_questions,
    mine,
    split_questions,
    unroll,
)


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    return (round(statistics.fmean(values), 4), round(statistics.median(values), 4)) if values else (None, None)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Params file.")
@click.option("--corpus", "corpus_path", default="data/chunks/corpus.jsonl", show_default=True,
              help="Passages (BEIR corpus.jsonl from the chunk stage).")
@click.option("--qa", "qa_path", default="data/sdg/qa.jsonl", show_default=True,
              help="Accepted question-answer pairs from the sdg stage.")
@click.option("--out", "out_dir", default="data/prep", show_default=True, help="Output folder.")
@click.option("--metrics", "metrics_path", default="metrics/prep.json", show_default=True)
def main(params_path: str, corpus_path: str, qa_path: str, out_dir: str, metrics_path: str) -> None:
    """Split the QA pairs, mine hard negatives with model.base_model, unroll multi-hop questions.

    \b
    Writes, under OUT:
      train.jsonl, val.jsonl   one example per (question, positive) with up to prep.num_negatives
                               hard negatives and their base-model scores
      train_corpus.jsonl       the passages training may see (every passage of a test document removed)
      eval/                    BEIR test set: corpus.jsonl (all passages), queries.jsonl, qrels/test.tsv
    The split is grouped by source document (prep.group_by) so the test set measures retrieval on
    documents the model never trained on.
    """
    started = time.time()
    try:
        params = load_params(params_path)
        cfg, mcfg = section(params, "prep"), section(params, "model")
        corpus = load_corpus(corpus_path)
        qa = read_jsonl(qa_path)
    except (ParamsError, FormatError) as e:
        raise click.ClickException(str(e)) from None
    k = int(cfg.get("num_negatives", 5))
    try:
        k_mine = mining_depth(k, cfg.get("teacher"))  # + candidates for the teacher to filter (prep.teacher)
    except ValueError as e:
        raise click.ClickException(str(e)) from None

    questions, dropped = clean_questions(qa, corpus)
    for reason, n in dropped.items():
        warn(f"{n} qa record(s) dropped: {reason}")
    try:
        split = split_questions(
            questions, corpus, test_fraction=float(cfg.get("test_fraction", 0.2)),
            test_min=int(cfg.get("test_min", 0)),
            val_fraction=float(cfg.get("val_fraction", 0.1)), val_min=int(cfg.get("val_min", 5)),
            seed=int(cfg.get("seed", 42)), group_by=cfg.get("group_by", "document"),
        )
    except PrepError as e:
        raise click.ClickException(f"{e} (qa file: {qa_path})") from None
    if split.fallback:
        warn(f"split fallback {split.fallback}")
    if split.group_by == "none":
        warn("group_by=none: test passages may appear in training as negatives; test scores will be optimistic")
    if split.dropped_cross_split:
        warn(f"{split.dropped_cross_split} multi-hop question(s) span train and test documents: dropped")

    # Candidates = passages training may see; held-out passages never enter the mining matrix at all.
    train_ids = [pid for pid in corpus if pid not in split.held_out]
    mined_qs = split.train + split.val
    model, mined, encode_s, search_s = mine_negatives(corpus, train_ids, mined_qs, cfg, mcfg, k_mine)
    examples = unroll(mined_qs, train_ids, mined)
    try:  # teacher scores + false-negative filter (no-op unless prep.teacher.enabled)
        examples, teacher_metrics = teacher_rescore(examples, corpus, cfg.get("teacher"), k, int(cfg.get("seed", 42)))
    except ModelNotAvailable as e:
        raise click.ClickException(f"prep.teacher: {e}") from None
    train_set = {q["id"] for q in split.train}
    train_ex = [e for e in examples if e["source_id"] in train_set]
    val_ex = [e for e in examples if e["source_id"] not in train_set]

    out = Path(out_dir)
    write_jsonl(out / "train.jsonl", train_ex)
    write_jsonl(out / "val.jsonl", val_ex)
    # the passages' `structure` (links, ids: half of a linked corpus's bytes) only serves sdg: not copied on
    write_jsonl(out / "train_corpus.jsonl", (without_structure(corpus[p]) for p in train_ids))
    queries, qrels = beir_test_set(split.test)
    write_beir(out / "eval", (without_structure(r) for r in corpus.values()), queries, qrels)

    metrics = prep_metrics(qa, dropped, split, train_ex, val_ex, qrels, corpus, k, cfg, mined, teacher_metrics,
                           encode_s, search_s, started)
    write_json(metrics_path, metrics)
    if mined.short:
        warn(f"{mined.short} of {len(mined_qs)} queries got fewer than {k} negatives (finetune pads by repetition)")
    print_summary(metrics, model._embedpipe_name)


def mine_negatives(corpus: dict, train_ids: list[str], questions: list[dict], cfg: dict, mcfg: dict,
                   k_mine: int) -> tuple[Any, Any, float, float]:
    """Hard negatives from the base model for every training and validation question -> (model, mined, s, s)."""
    row_of = {pid: i for i, pid in enumerate(train_ids)}
    try:
        model = load_model(mcfg["base_model"], mcfg.get("device"), mcfg.get("max_seq_length"))
    except ModelNotAvailable as e:
        raise click.ClickException(str(e)) from None
    use_bulk_encoder(model, mcfg.get("bulk_encoder", "auto"))
    batch_size = int(cfg["batch_size"])
    t0 = time.time()
    # Through the embedding store: passages SDG's retrieval gate already encoded with the base model are reused.
    corpus_emb = encode_cached(model, [passage_text(corpus[p]) for p in train_ids], mcfg.get("passage_prompt", ""),
                               batch_size=batch_size, desc="mining: passages", kind="passage")
    query_emb = encode_cached(model, [q["question"] for q in questions], mcfg.get("query_prompt", ""),
                              batch_size=batch_size, desc="mining: questions", kind="query")
    encode_s = time.time() - t0
    t0 = time.time()
    mined = mine(
        query_emb, corpus_emb, [[row_of[p] for p in q["segment_ids"]] for q in questions], k_mine,
        mode=cfg["margin_mode"], relative_margin=float(cfg["relative_margin"]),
        absolute_margin=float(cfg["absolute_margin"]), query_batch=int(cfg["query_batch"]),
        corpus_block=int(cfg["corpus_block"]), count_removed=bool(cfg["count_margin_removed"]),
    )
    return model, mined, encode_s, time.time() - t0


def prep_metrics(qa: list, dropped: dict, split: Any, train_ex: list, val_ex: list, qrels: dict, corpus: dict, k: int,
                 cfg: dict, mined: Any, teacher_metrics: dict, encode_s: float, search_s: float,
                 started: float) -> dict:
    """metrics/prep.json: the split, the examples, the negatives' scores and where the time went."""
    n_train_q = len(split.train)
    pos = [s for ps in mined.pos_scores for s in ps]
    neg = [s for ns in mined.neg_scores for s in ns]
    pos_mean, pos_median = _stats(pos)
    neg_mean, neg_median = _stats(neg)
    metrics = {
        "questions_in": len(qa),
        "questions_dropped_invalid": sum(dropped.values()),
        "questions_dropped_cross_split": split.dropped_cross_split,
        "group_by": split.group_by,
        "split_fallback": split.fallback,
        "questions": {"train": n_train_q, "val": len(split.val), "test": len(split.test)},
        "examples": {"train": len(train_ex), "val": len(val_ex), "test_qrels": sum(len(v) for v in qrels.values())},
        "passages": len(corpus),
        "passages_excluded_from_mining": len(split.held_out),
        "num_negatives": k,
        "margin_mode": cfg.get("margin_mode", "relative"),
        "positive_score_mean": pos_mean,
        "positive_score_median": pos_median,
        "negative_score_mean": neg_mean,
        "negative_score_median": neg_median,
        "margin_removed_fraction": (round(mined.removed_by_margin / mined.candidates, 6)
                                    if mined.candidates and mined.removed_by_margin >= 0 else None),
        "queries_with_fewer_than_k_negatives": mined.short,
        "teacher": teacher_metrics,
        "encode_s": round(encode_s, 2),
        "search_s": round(search_s, 3),
        "wall_time_s": round(time.time() - started, 2),
    }
    return metrics


def print_summary(metrics: dict, model_name: str) -> None:
    rows: dict[str, object] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):  # questions / examples per split
            rows.update({f"{key} {name}": n for name, n in value.items()})
        elif value is not None:
            rows[key] = value
    c = encode_counts().get(model_name, {"requested": 0, "encoded": 0})
    on = encode_backends().get(model_name, "torch")
    rows["texts encoded"] = f"{c['encoded']} of {c['requested']} on {on} (the rest from the embedding store)"
    summary("prep", rows)


if __name__ == "__main__":
    sys.exit(main())
