"""Tiny prep-format fixtures for the finetune tests: hand-written questions over tests/data/tiny_corpus.jsonl,
hard negatives mined with the real base model and embedpipe.core.retrieval.search (the prep stage's method)."""

from __future__ import annotations

import shutil
from pathlib import Path

from embedpipe.core.io import load_corpus, passage_text, write_jsonl
from embedpipe.core.models import encode
from embedpipe.core.retrieval import search

# (question, positive passage ids); the two-positive ones are multi-hop and get unrolled.
QUESTIONS = [
    ("How many grind settings does the G3 grinder have?", ["d_4f05ef5b065f63c5"]),
    ("How often should the G3 burrs be cleaned?", ["d_abf5c51a5fcfa772"]),
    ("What is the power rating of the K1 kettle?", ["d_5af4eb565814e637"]),
    ("At what temperature does the K1 thermal fuse trip?", ["d_87591303b638f935"]),
    ("How often should I descale the K1 in hard water?", ["d_05123711729adfb6"]),
    ("What vinegar mix is used to descale the K1?", ["d_bc16c5edb1ab974f"]),
    ("What does a steady amber light mean on the K1?", ["d_68dbc4ab2fcaa352"]),
    ("How long does the K2 take to boil a full kettle?", ["d_cf5380269e9afc6e"]),
    ("What is the thermal fuse trip temperature of the K2?", ["d_9aa1c6bca1889f4b"]),
    ("How often should the K2 be descaled in hard-water areas?", ["d_dcc960ebb2406938"]),
    ("Which temperature preset should I use for green tea on the K2?", ["d_ec35e4ab29d224a2"]),
    ("How do I start the keep-warm cycle on the K2?", ["d_56e4bcd2a6b09c6e"]),
    ("How many slots does the T4 toaster have?", ["d_266607f36bbc7efd"]),
    ("What happens when the T4 crumb tray is full?", ["d_17c0689237335238"]),
    ("Which part should be replaced when the T4 lever will not stay down?", ["d_31220b33a3793ced"]),
    ("How long is the warranty on the G3 grinder motor?", ["d_0e6d8c7c3c4a2cf7"]),
    (
        "Which citric acid strength is safe on each kettle, and does stronger acid void the warranty?",
        ["d_9b301f4f23b9fced", "d_1d53214a4965d6d3"],
    ),  # fmt: skip
]
VAL_QUESTIONS = [
    ("Which burr part number is the upper burr of the grinder?", ["d_abf5c51a5fcfa772"]),
    ("What must a warranty claim include?", ["d_1d53214a4965d6d3"]),
    ("How long is the kettle warranty compared with the toaster?", ["d_5d8f853b8c4d1239"]),
    ("What concentration of citric acid can be used on the K2 plate?", ["d_9b301f4f23b9fced"]),
    ("What vinegar-to-water ratio descales the K2?", ["d_ea5bf34d6ea89aa6"]),
]


def unroll(questions, corpus, model, negatives: int, prefix: str) -> list[dict]:
    """One record per (question, positive), negatives mined below 95% of the weakest positive (the recipe)."""
    ids = list(corpus)
    docs = encode(model, [passage_text(corpus[i]) for i in ids])
    qs = encode(model, [q for q, _ in questions])
    pos_rows = [[ids.index(p) for p in pos] for _, pos in questions]
    ceiling = [0.95 * min(float(qs[n] @ docs[r]) for r in rows) for n, rows in enumerate(pos_rows)]
    import numpy as np

    scores, idx = search(qs, docs, negatives, exclude=pos_rows, max_score=np.array(ceiling, dtype=np.float32))
    records = []
    for n, (question, positives) in enumerate(questions):
        neg = [{"id": ids[j], "score": float(s)} for s, j in zip(scores[n], idx[n], strict=True) if j >= 0]
        for h, pid in enumerate(positives):
            records.append(
                {
                    "question_id": f"{prefix}{n}_{h}",
                    "source_id": f"{prefix}{n}",
                    "question": question,
                    "pos_doc": [{"id": pid, "score": 1.0}],
                    "neg_doc": neg,
                    "query_type": "multi_hop" if len(positives) > 1 else "contextual",
                    "hop_count": len(positives),
                }
            )
    return records


def write_prep(folder: Path, corpus_path: Path, model, negatives: int = 4) -> Path:
    """Write train.jsonl, val.jsonl and train_corpus.jsonl (the whole tiny corpus) in the prep format."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(corpus_path)
    shutil.copy(corpus_path, folder / "train_corpus.jsonl")
    write_jsonl(folder / "train.jsonl", unroll(QUESTIONS, corpus, model, negatives, "qa_t"))
    write_jsonl(folder / "val.jsonl", unroll(VAL_QUESTIONS, corpus, model, negatives, "qa_v"))
    return folder


def tiny_params(path: Path, **finetune) -> Path:
    """A params.yaml with the model section and a small finetune section (CPU-sized)."""
    import yaml

    cfg = {
        "passages_per_query": 3,
        "temperature": 0.02,
        "in_batch_negatives": False,
        "cached": False,
        "mini_batch_size": 4,
        "learning_rate": 1.0e-4,
        "epochs": 1,
        "max_steps": 4,
        "warmup_ratio": 0.0,
        "weight_decay": 0.01,
        "global_batch_size": 128,
        "small_data_threshold": 2000,
        "min_checkpoints": 2,
        "eval_steps": 200,
        "max_seq_length": 64,
        "seed": 42,
        "bf16": "auto",
        "fail_on_regression": False,
        "nproc_per_node": 1,
        "nnodes": 1,
        "node_rank": 0,
        "rdzv_endpoint": "localhost:29500",
        "wise_alphas": [1.0],  # the raw fine-tuned weights (the schema's default interpolates)
        "cpu": {},
    }
    cfg.update(finetune)
    params = {
        "model": {
            "base_model": "all-MiniLM-L6-v2",
            "query_prompt": "query: ",
            "passage_prompt": "passage: ",
            "max_seq_length": 64,
            "device": "cpu",
        },
        "finetune": cfg,
    }
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path
