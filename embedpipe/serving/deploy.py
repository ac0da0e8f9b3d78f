"""What `deploy_check` compares: a fixed sample of the test set, and served vs stored vectors on it.

Why a sample: over HTTP a 12k-passage test corpus costs as much as a full encode again (~25 min on two
cores), while a few hundred texts already catch what goes wrong in serving (wrong model, prompt, variant,
truncation, pooling). The full served-metrics evaluation still runs when the test set is small.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from embedpipe.core.io import passage_text


def sample_test_set(corpus: Mapping[str, dict[str, Any]], queries: Mapping[str, dict[str, Any]], n_passages: int,
                    n_queries: int, seed: int = 0) -> dict[str, list[str]]:
    """A seeded, reproducible sample (in file order): `n_passages` passages and up to `n_queries` queries (0 = all)."""

    def pick(ids: list[str], n: int) -> list[str]:
        if n <= 0 or n >= len(ids):
            return ids
        chosen = set(random.Random(seed).sample(ids, n))
        return [i for i in ids if i in chosen]

    pids, qids = pick(list(corpus), n_passages), pick(list(queries), n_queries)
    return {"passage_ids": pids, "query_ids": qids, "passages": [passage_text(corpus[p]) for p in pids],
            "queries": [queries[q]["text"] for q in qids]}


def vector_agreement(reference: tuple[np.ndarray, np.ndarray], served: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Row-wise cosine of served vs reference vectors (passages, queries): min, mean, and the worst rows."""
    ref = np.concatenate([r for r in reference if len(r)]) if any(len(r) for r in reference) else np.zeros((0, 1))
    got = np.concatenate([s for s in served if len(s)]) if any(len(s) for s in served) else np.zeros((0, 1))
    if ref.shape != got.shape:
        raise ValueError(f"served vectors have shape {got.shape}, the reference {ref.shape}")
    if not len(ref):
        return {"cosine_min": float("nan"), "cosine_mean": float("nan"), "texts": 0}
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    cos = np.sum(ref * got, axis=1)
    n_p = len(reference[0])
    per_kind = {kind: float(np.min(cos[s])) for kind, s in (("passage", slice(0, n_p)), ("query", slice(n_p, None)))
                if len(cos[s])}
    return {"texts": int(len(cos)), "cosine_min": round(float(np.min(cos)), 6),
            "cosine_mean": round(float(np.mean(cos)), 6),
            "cosine_min_by_kind": {k: round(v, 6) for k, v in per_kind.items()}}
