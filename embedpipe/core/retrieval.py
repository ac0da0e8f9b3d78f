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
    import torch  # torch.topk is multi-threaded and several times faster than np.argpartition

    corpus_t = torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32))
    ceilings = None if max_score is None else torch.from_numpy(np.asarray(max_score, dtype=np.float32))
    for q_start in range(0, n_queries, query_batch):
        q_end = min(q_start + query_batch, n_queries)
        q_t = torch.from_numpy(np.ascontiguousarray(queries[q_start:q_end], dtype=np.float32))
        best_s = torch.full((q_end - q_start, k), -torch.inf)
        best_i = torch.full((q_end - q_start, k), -1, dtype=torch.int64)
        for c_start in range(0, n_corpus, corpus_block):
            c_end = min(c_start + corpus_block, n_corpus)
            scores = q_t @ corpus_t[c_start:c_end].T
            if ceilings is not None:
                scores.masked_fill_(scores > ceilings[q_start:q_end, None], -torch.inf)
            if exclude is not None:
                pairs = [(row, c - c_start) for row, q in enumerate(range(q_start, q_end))
                         for c in exclude[q] if c_start <= c < c_end]
                if pairs:
                    rows, cols = zip(*pairs, strict=True)
                    scores[list(rows), list(cols)] = -torch.inf
            block_s, block_i = torch.topk(scores, min(k, c_end - c_start), dim=1)
            merged_s = torch.cat([best_s, block_s], dim=1)
            merged_i = torch.cat([best_i, block_i + c_start], dim=1)
            best_s, pos = torch.topk(merged_s, k, dim=1)
            best_i = torch.gather(merged_i, 1, pos)
        best_s, best_i = best_s.numpy(), best_i.numpy()
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
    for qid, row_scores, row_indices in zip(query_ids, scores, indices, strict=True):
        run[qid] = {corpus_ids[i]: float(s) for s, i in zip(row_scores, row_indices, strict=True) if i >= 0}
    return run


def bounded_corpus(corpus_ids: Sequence[str], keep: set[str], max_passages: int, seed: int) -> tuple[list[str], int]:
    """`keep` (the passages a check is about) + a fixed random sample of the rest, up to `max_passages`.

    Used where a full-corpus encode would cost more than the check is worth (validation during training,
    export parity): the kept passages are never dropped, even past the cap; the sample only adds
    distractors so the ranking is not trivially small. 0 = the whole corpus. Returns (ids in corpus order,
    sampled count): the order makes every caller reproducible.
    """
    import random

    if max_passages <= 0 or max_passages >= len(corpus_ids):
        return list(dict.fromkeys(corpus_ids)), len(set(corpus_ids) - keep)
    rest = sorted(set(corpus_ids) - keep)
    sampled = max(0, min(len(rest), max_passages - len(keep)))
    chosen = keep | set(random.Random(seed).sample(rest, sampled))
    return [pid for pid in dict.fromkeys(corpus_ids) if pid in chosen], sampled
