"""finetune is reproducible on CPU: the same data, params and seed give the same model, whatever the thread count.

Three short real trainings of all-MiniLM-L6-v2 on the tiny corpus (the library's `train`, as the stage runs it:
seed set, `full_determinism` on CPU): two with torch's default thread count, one with a different one. Each
trained model is scored on a tiny BEIR test set (eval's own code, `evaluate_embedder`), with its passages encoded
under the same thread count, so only the training can differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_helpers import make_tiny_beir
from finetune_helpers import write_prep

from embedpipe.core.io import load_beir, load_corpus, passage_text, read_jsonl
from embedpipe.core.models import encode, load_model
from embedpipe.evaluation.report import evaluate_embedder
from embedpipe.training.data import build_training_table, validation_queries
from embedpipe.training.trainer import make_evaluator, plan_training, train

pytestmark = pytest.mark.slow
PROMPTS = {"query": "query: ", "passage": "passage: "}
CFG = {"passages_per_query": 3, "temperature": 0.02, "in_batch_negatives": False, "cached": False,
       "mini_batch_size": 8, "learning_rate": 1e-4, "epochs": 1, "max_steps": 2, "warmup_ratio": 0.0,
       "weight_decay": 0.01, "global_batch_size": 128, "small_data_threshold": 2000, "min_checkpoints": 1,
       "eval_steps": 200, "seed": 42, "bf16": False}  # fmt: skip
# MiniLM's own attention dropout (0.1) stays on: dropout masks come from the seeded generator, so they repeat too.


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_corpus_path, minilm):
    root = tmp_path_factory.mktemp("determinism")
    prep = write_prep(root / "prep", tiny_corpus_path, minilm)
    return prep, load_beir(make_tiny_beir(root / "beir", tiny_corpus_path))


def train_and_score(prep, beir, tmp, threads: int) -> dict:
    """Train from the base model with `threads` torch threads, then score it with the default thread count;
    return the test metrics, the passage vectors, the weights and the losses."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_model("all-MiniLM-L6-v2", device="cpu", max_seq_length=64)
        corpus = load_corpus(prep / "train_corpus.jsonl")
        table = build_training_table(read_jsonl(prep / "train.jsonl"), corpus, passages_per_query=3)
        queries, relevant = validation_queries(read_jsonl(prep / "val.jsonl"), corpus)
        evaluator = make_evaluator(queries, {i: passage_text(r) for i, r in corpus.items()}, relevant, PROMPTS)
        result = train(model, table, evaluator, CFG, plan_training(table.examples, CFG), "cpu", PROMPTS,
                       tmp / "ckpt", None)
    finally:
        torch.set_num_threads(before)
    test_corpus, test_queries, qrels = beir
    scored = evaluate_embedder("t", lambda texts, kind: encode(model, texts, prompt=PROMPTS[kind]),
                               test_corpus, test_queries, qrels)
    vectors = encode(model, [passage_text(r) for r in test_corpus.values()], prompt=PROMPTS["passage"])
    losses = [float(h["loss"]) for h in result.history if "loss" in h]
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"metrics": scored.metrics, "per_query": scored.per_query, "vectors": vectors, "losses": losses,
            "steps": result.steps, "weights": weights}


def max_weight_diff(a: dict, b: dict) -> float:
    return max(float((a["weights"][k].float() - b["weights"][k].float()).abs().max()) for k in a["weights"])


def max_metric_diff(a: dict, b: dict) -> float:
    return max(abs(a["per_query"][q][m] - b["per_query"][q][m]) for q in a["per_query"] for m in a["per_query"][q])


def test_training_twice_and_with_another_thread_count_gives_the_same_model(data, tmp_path):
    prep, beir = data
    default = torch.get_num_threads()
    other = 1 if default > 1 else 2
    first = train_and_score(prep, beir, tmp_path / "a", default)
    second = train_and_score(prep, beir, tmp_path / "b", default)
    threads = train_and_score(prep, beir, tmp_path / "c", other)
    assert first["steps"] == 2 and len(first["losses"]) >= 2

    # Same threads: the same run, bit for bit.
    assert second["losses"] == first["losses"] and max_weight_diff(first, second) == 0.0
    assert max_metric_diff(first, second) <= 1e-6 and second["metrics"] == first["metrics"]
    np.testing.assert_array_equal(second["vectors"], first["vectors"])

    # Another thread count: float sums may be split differently, so the weights may differ in the last bits
    # (docs/finetune.md "Reproducibility" has the measured sizes), but the metrics must agree within 1e-6.
    vector_diff = float(np.abs(threads["vectors"] - first["vectors"]).max())
    loss_diff = max(abs(x - y) for x, y in zip(threads["losses"], first["losses"], strict=True))
    print(f"threads {default} vs {other}: max |weight diff| {max_weight_diff(first, threads):.3g}, max |vector diff| "
          f"{vector_diff:.3g}, max |loss diff| {loss_diff:.3g}, max |metric diff| {max_metric_diff(first, threads):.3g}")
    assert max_metric_diff(first, threads) <= 1e-6
    assert max_weight_diff(first, threads) < 1e-5 and vector_diff < 1e-5 and loss_diff < 1e-5
