"""BEIR retrieval metrics computed by pytrec_eval (never hand-rolled).

Names follow BEIR, lower-cased: ndcg@k, recall@k, precision@k, map@k, plus mrr@10.
"""

from __future__ import annotations

import pytrec_eval

from embedpipe.core.retrieval import Run

K_VALUES = (1, 5, 10, 100)

Qrels = dict[str, dict[str, int]]


def metric_names(k_values: tuple[int, ...] = K_VALUES) -> list[str]:
    names = [f"{m}@{k}" for m in ("ndcg", "recall", "precision", "map") for k in k_values]
    return names + ["mrr@10"]


def per_query_metrics(qrels: Qrels, run: Run, k_values: tuple[int, ...] = K_VALUES) -> dict[str, dict[str, float]]:
    """Every metric for every judged query; a query with nothing retrieved scores 0."""
    ks = ",".join(str(k) for k in k_values)
    measures = {f"ndcg_cut.{ks}", f"recall.{ks}", f"P.{ks}", f"map_cut.{ks}"}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures)
    full_run = {qid: run.get(qid, {}) for qid in qrels}
    raw = evaluator.evaluate(full_run)
    top10 = {qid: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for qid, docs in full_run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    result: dict[str, dict[str, float]] = {}
    for qid in qrels:
        scores = raw.get(qid, {})
        row = {}
        for k in k_values:
            row[f"ndcg@{k}"] = scores.get(f"ndcg_cut_{k}", 0.0)
            row[f"recall@{k}"] = scores.get(f"recall_{k}", 0.0)
            row[f"precision@{k}"] = scores.get(f"P_{k}", 0.0)
            row[f"map@{k}"] = scores.get(f"map_cut_{k}", 0.0)
        row["mrr@10"] = rr.get(qid, {}).get("recip_rank", 0.0)
        result[qid] = row
    return result


def aggregate(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over queries, rounded for stable committed JSON."""
    if not per_query:
        return {}
    names = next(iter(per_query.values())).keys()
    n = len(per_query)
    return {name: round(sum(q[name] for q in per_query.values()) / n, 5) for name in names}


def evaluate(qrels: Qrels, run: Run, k_values: tuple[int, ...] = K_VALUES) -> dict[str, float]:
    return aggregate(per_query_metrics(qrels, run, k_values))
