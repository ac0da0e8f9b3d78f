"""Exact dense search with bounded memory, shared by hard-negative mining (`prep`) and `eval`.

Queries are processed in batches and the corpus in blocks while a running top-k is kept, so the
full query x passage score matrix never exists: memory is O(query_batch x (block + k)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def search(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    max_score: np.ndarray | None = None,
    query_batch: int = 256,
    corpus_block: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus rows by dot product for every query row.

    exclude[i]:   corpus rows never returned for query i (its positives, when mining).
    max_score[i]: scores strictly above it are dropped for query i (the mining margin).
    Returns (scores, indices), both shaped (n_queries, k), best first. Slots with no candidate
    left hold score -inf and index -1.
    """
    n_queries, n_corpus = len(queries), len(corpus)
    k = max(0, int(k))
    top_scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
    top_indices = np.full((n_queries, k), -1, dtype=np.int64)
    if k == 0 or n_corpus == 0:
        return top_scores, top_indices
    for q_start in range(0, n_queries, query_batch):
        q_end = min(q_start + query_batch, n_queries)
        best_s = top_scores[q_start:q_end]
        best_i = top_indices[q_start:q_end]
        for c_start in range(0, n_corpus, corpus_block):
            c_end = min(c_start + corpus_block, n_corpus)
            scores = queries[q_start:q_end] @ corpus[c_start:c_end].T
            if max_score is not None:
                scores[scores > max_score[q_start:q_end, None]] = -np.inf
            if exclude is not None:
                for row, q in enumerate(range(q_start, q_end)):
                    cols = [c - c_start for c in exclude[q] if c_start <= c < c_end]
                    scores[row, cols] = -np.inf
            block_idx = np.broadcast_to(np.arange(c_start, c_end), scores.shape)
            merged_s = np.concatenate([best_s, scores], axis=1)
            merged_i = np.concatenate([best_i, block_idx], axis=1)
            keep = min(k, merged_s.shape[1])
            part = np.argpartition(-merged_s, keep - 1, axis=1)[:, :keep]
            best_s = np.take_along_axis(merged_s, part, axis=1)
            best_i = np.take_along_axis(merged_i, part, axis=1)
        # Best first; ties broken by corpus index so that outputs are deterministic.
        order = np.lexsort((best_i, -best_s), axis=1)
        best_s = np.take_along_axis(best_s, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
        best_i[~np.isfinite(best_s)] = -1
        top_scores[q_start:q_end] = best_s
        top_indices[q_start:q_end] = best_i
    return top_scores, top_indices



Run = dict[str, dict[str, float]]


def retrieve(
    query_embeddings: np.ndarray,
    corpus_embeddings: np.ndarray,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    k: int = 100,
) -> Run:
    """Top-k retrieval as a TREC-style run: {query_id: {corpus_id: score}}."""
    scores, indices = search(query_embeddings, corpus_embeddings, k)
    run: Run = {}
    for qid, row_scores, row_indices in zip(query_ids, scores, indices):
        run[qid] = {corpus_ids[i]: float(s) for s, i in zip(row_scores, row_indices) if i >= 0}
    return run
