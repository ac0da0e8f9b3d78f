"""Benchmark: the finetune stage's CPU profile on the sample corpus, wall time and peak RSS.

No LLM is needed: questions are inverse-cloze queries (one sentence taken out of each passage, the rest is the
positive), hard negatives are mined with the base model as prep does. Run: `python bench/bench_finetune.py`.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedpipe.core.io import read_json, read_jsonl, write_jsonl  # noqa: E402
from embedpipe.core.models import encode, load_model  # noqa: E402
from embedpipe.core.retrieval import search  # noqa: E402


def ict_prep(corpus_path: Path, out: Path, negatives: int = 4, val_every: int = 8) -> int:
    """Inverse-cloze prep set: query = the longest sentence of a passage, positive = the passage."""
    corpus = read_jsonl(corpus_path)
    model = load_model("all-MiniLM-L6-v2", device="cpu", max_seq_length=128)
    docs = encode(model, [f"{r['title']}\n{r['text']}" for r in corpus], batch_size=32)
    questions = [max(re.split(r"(?<=[.!?])\s+", r["text"]), key=len)[:300] for r in corpus]
    qs = encode(model, questions)
    ceiling = 0.95 * np.einsum("nd,nd->n", qs, docs)
    scores, idx = search(qs, docs, negatives, exclude=[[i] for i in range(len(corpus))], max_score=ceiling)
    train, val = [], []
    for i, r in enumerate(corpus):
        rec = {
            "question_id": f"q{i}_0", "source_id": f"q{i}", "question": questions[i],
            "pos_doc": [{"id": r["_id"], "score": 1.0}],
            "neg_doc": [{"id": corpus[j]["_id"], "score": float(s)} for s, j in zip(scores[i], idx[i], strict=True) if j >= 0],
            "query_type": "inverse_cloze", "hop_count": 1,
        }  # fmt: skip
        (val if i % val_every == 0 else train).append(rec)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    write_jsonl(out / "train_corpus.jsonl", corpus)
    return len(train)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "stages/chunk.py", "--out", str(tmp / "chunks"), "--metrics",
                        str(tmp / "chunk.json")], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        n = ict_prep(tmp / "chunks" / "corpus.jsonl", tmp / "prep")
        started = time.time()
        subprocess.run(
            [sys.executable, "stages/finetune.py", "--prep-dir", str(tmp / "prep"), "--out", str(tmp / "model"),
             "--metrics", str(tmp / "train.json"), "--live-dir", str(tmp / "live"), "--checkpoint-dir",
             str(tmp / "ckpt")], cwd=ROOT, check=True,
        )  # fmt: skip
        wall = time.time() - started
        m = read_json(tmp / "train.json")
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
        print(
            f"finetune cpu profile: {n} examples, {m['steps']} steps, batch {m['batch_size']}, "
            f"seq {m['max_seq_length']}, 1+{m['passages_per_query'] - 1} passages: {wall:.0f} s wall "
            f"({(m['wall_time_s']) / max(1, m['steps']):.1f} s/step incl. evals), peak RSS {rss:.1f} GiB, "
            f"val nDCG@10 {m['val_ndcg@10_base']:.4f} -> {m['val_ndcg@10_finetuned']:.4f}"
        )


if __name__ == "__main__":
    main()
