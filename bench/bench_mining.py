"""Benchmark: embedpipe.prep.mining.mine vs sentence_transformers.util.mine_hard_negatives (not a test).

Same model, same texts, same embeddings (encoded once here, handed to ST through its own embedding cache),
relative_margin=0.05, num_negatives=5, use_faiss=False. Each side runs in its own subprocess that loads
the model first (as the prep stage does), so peak RSS is comparable; encoding time is reported separately.

    python bench/bench_mining.py            # ~2,000 queries x 50,000 passages
    python bench/bench_mining.py --quick    # 200 x 5,000
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = "all-MiniLM-L6-v2"
MAX_SEQ = 64
K, MARGIN = 5, 0.05
STEMS = ["What does the manual say about", "How do I handle", "Which setting applies to", "Explain", "Why does"]


def build_texts(n_queries: int, n_passages: int, n_real: int, seed: int = 0) -> tuple[list[str], list[str], list[list[int]]]:
    """Passages: pairs of sample-doc sentences with perturbed numbers; queries: 80% of the words of 1-2 of them."""
    rng = random.Random(seed)
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "data" / "sample_docs").rglob("*.md")))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", re.sub(r"[#|*`>-]+", " ", text))]
    sentences = [re.sub(r"\s+", " ", s) for s in sentences if len(s.split()) >= 6]
    passages, seen = [], set()
    while len(passages) < n_passages:
        p = " ".join(rng.sample(sentences, 2))
        p = re.sub(r"\d+", lambda m: str(rng.randint(1, 999)), p)
        if p in seen:
            p += f" Ref {len(passages)}."
        seen.add(p)
        passages.append(p)
    queries, positives = [], []
    for rows in (rng.sample(range(n_real), 2 if rng.random() < 0.1 else 1) for _ in range(n_queries)):
        words = [w for r in rows for w in passages[r].split() if rng.random() > 0.2]
        queries.append(f"{rng.choice(STEMS)} {' '.join(words)}? (q{len(queries)})")
        positives.append(rows)
    return queries, passages, positives


def reset_peak_rss() -> None:
    """Linux: reset VmHWM so the peak measured afterwards belongs to mining, not to model loading."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(side: str, work: Path) -> dict:
    """Runs in a fresh process: load the model, then mine from the precomputed embeddings."""
    from embedpipe.core.models import load_model

    model = load_model(MODEL, "cpu", MAX_SEQ)
    meta = json.loads((work / "texts.json").read_text())
    queries, passages, positives = meta["queries"], meta["passages"], meta["positives"]
    gc.collect()
    reset_peak_rss()
    rss_before = psutil.Process().memory_info().rss / 2**20
    if side.startswith("ours"):
        from embedpipe.core.params import load_params
        from embedpipe.prep.mining import mine

        cfg = load_params(ROOT / "params.yaml")["prep"]
        t0 = time.perf_counter()
        q_emb, c_emb = np.load(work / "queries.npy"), np.load(work / "passages.npy")
        mined = mine(q_emb, c_emb, positives, K, relative_margin=MARGIN, query_batch=cfg["query_batch"],
                     corpus_block=cfg["corpus_block"], count_removed=side == "ours+count")
        seconds = time.perf_counter() - t0
        negs = [[passages[r] for r in rows] for rows in mined.neg_rows]
        extra = {"short": mined.short}
    else:
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        # Seed ST's embedding cache with the same embeddings (its key: model, prompt, prompt name, texts).
        cache = work / "st_cache"
        cache.mkdir(exist_ok=True)
        name = model.model_card_data.base_model or ""
        for kind, texts, file in (("query", queries, "queries.npy"), ("corpus", passages, "passages.npy")):
            h = hashlib.sha256(repr((name, None, None, texts)).encode(), usedforsecurity=False).hexdigest()
            (cache / f"{kind}_embeddings_{h}.npy").write_bytes((work / file).read_bytes())
        rows = [(q, passages[p]) for q, ps in zip(queries, positives, strict=True) for p in ps]
        dataset = Dataset.from_dict({"anchor": [a for a, _ in rows], "positive": [p for _, p in rows]})
        t0 = time.perf_counter()
        out = mine_hard_negatives(dataset, model, corpus=passages, relative_margin=MARGIN, num_negatives=K,
                                  use_faiss=False, cache_folder=str(cache), output_format="n-tuple",
                                  output_scores=True, verbose=False)
        seconds = time.perf_counter() - t0
        by_query: dict[str, list[str]] = {}
        for r in out:
            by_query.setdefault(r["anchor"], [r[f"negative_{i}"] for i in range(1, K + 1)])
        negs = [by_query.get(q) for q in queries]
        extra = {"rows_out": len(out)}
    return {"side": side, "mine_s": seconds, "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
            "negatives": negs, **extra}


@click.command()
@click.option("--quick", is_flag=True, help="200 queries x 5,000 passages instead of 2,000 x 50,000.")
@click.option("--queries", "n_queries", default=2000, show_default=True)
@click.option("--passages", "n_passages", default=50000, show_default=True)
@click.option("--encode-limit", default=5000, show_default=True,
              help="Passages really encoded; the rest get perturbed copies of those embeddings.")
@click.option("--child", "child_side", type=click.Choice(["ours", "ours+count", "st"]), hidden=True)
@click.option("--work", type=click.Path(path_type=Path), hidden=True)
def main(quick: bool, n_queries: int, n_passages: int, encode_limit: int, child_side: str | None, work: Path | None) -> None:
    """Compare wall time and peak RSS of hard-negative mining, side by side."""
    if child_side:
        (work / f"{child_side}.json").write_text(json.dumps(child(child_side, work)))
        return
    if quick:
        n_queries, n_passages = 200, 5000
    from embedpipe.core.embed_store import encode_cached
    from embedpipe.core.models import load_model

    n_real = min(n_passages, encode_limit)  # positives are drawn from these: their embeddings match their text
    queries, passages, positives = build_texts(n_queries, n_passages, n_real)
    model = load_model(MODEL, "cpu", MAX_SEQ)
    cache = ROOT / "cache" / "bench"
    t0 = time.perf_counter()
    q_emb = encode_cached(model, queries, "", batch_size=128, root=cache, kind="query")
    c_emb = encode_cached(model, passages[:n_real], "", batch_size=128, root=cache, kind="passage")
    encode_s = time.perf_counter() - t0
    if n_real < n_passages:
        # Encoding 50k texts takes ~30 min on 2 busy cores: the rest are noisy copies of real embeddings
        # (cosine ~0.8 to their source), enough to give the search a realistic score distribution.
        rng = np.random.default_rng(0)
        src = c_emb[np.arange(n_real, n_passages) % n_real]
        extra = src + rng.normal(0, 0.035, src.shape).astype(np.float32)
        c_emb = np.concatenate([c_emb, extra / np.linalg.norm(extra, axis=1, keepdims=True)])
    del model
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.save(work / "queries.npy", q_emb)
        np.save(work / "passages.npy", c_emb)
        (work / "texts.json").write_text(json.dumps({"queries": queries, "passages": passages,
                                                     "positives": positives}))
        results = {}
        for side in ("st", "ours", "ours+count"):
            subprocess.run([sys.executable, __file__, "--child", side, "--work", str(work)], check=True)
            results[side] = json.loads((work / f"{side}.json").read_text())
    ours, st = results["ours"], results["st"]
    both = [(a, b) for a, b in zip(ours["negatives"], st["negatives"], strict=True) if b is not None]
    agree = sum(a == b for a, b in both) / max(1, len(both))
    from embedpipe.core.console import summary

    summary(f"hard-negative mining, {n_queries:,} queries x {n_passages:,} passages (MiniLM, seq {MAX_SEQ})", {
        "encode once (cached in cache/bench)": f"{encode_s:.1f} s ({len(queries):,} queries + {n_real:,} passages)",
        "ST mine_hard_negatives: mining": f"{st['mine_s']:.2f} s",
        "embedpipe mine: mining": f"{ours['mine_s']:.2f} s",
        "embedpipe mine + exact margin count (stage default)": f"{results['ours+count']['mine_s']:.2f} s",
        "wall-time ratio (ours / ST)": f"{ours['mine_s'] / st['mine_s']:.2f}",
        "ST peak RSS while mining": f"{st['peak_rss_mb']:.0f} MB (+{st['peak_rss_mb'] - st['rss_before_mb']:.0f} over model)",
        "embedpipe peak RSS while mining": f"{ours['peak_rss_mb']:.0f} MB (+{ours['peak_rss_mb'] - ours['rss_before_mb']:.0f})",
        "peak-RSS ratio (ours / ST)": f"{ours['peak_rss_mb'] / st['peak_rss_mb']:.2f}",
        "mining-RSS ratio (increase over model, ours / ST)":
            f"{(ours['peak_rss_mb'] - ours['rss_before_mb']) / max(1, st['peak_rss_mb'] - st['rss_before_mb']):.2f}",
        "same negatives as ST (queries ST kept)": f"{agree:.1%} of {len(both):,}",
        "queries with < 5 negatives (ours / ST dropped)": f"{ours['short']} / {n_queries - len(both)}",
    })


if __name__ == "__main__":
    main()
