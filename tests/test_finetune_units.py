"""finetune: the pieces that need no training run (loss maths, negatives padding, auto-scaling, val grouping)."""

from __future__ import annotations

import math

import pytest
import torch

from embedpipe.training.data import build_training_table, pick_negatives, validation_queries
from embedpipe.training.losses import HardNegativeSoftmaxLoss
from embedpipe.training.trainer import effective_params, plan_training

CFG = {
    "small_data_threshold": 2000,
    "global_batch_size": 128,
    "epochs": 3,
    "max_steps": None,
    "min_checkpoints": 3,
    "eval_steps": 200,
    "warmup_ratio": 0.05,
    "in_batch_negatives": False,
    "cached": False,
    "mini_batch_size": 16,
}


def test_hard_negative_loss_equals_hand_computation():
    torch.manual_seed(0)
    q, pos, n1, n2 = (torch.randn(3, 8) for _ in range(4))
    t = 0.02
    expected = 0.0
    for b in range(3):
        cos = [float(torch.dot(q[b], d[b]) / (q[b].norm() * d[b].norm())) for d in (pos, n1, n2)]
        top = max(c / t for c in cos)  # log-sum-exp, stable
        log_z = top + math.log(sum(math.exp(c / t - top) for c in cos))
        expected += (log_z - cos[0] / t) / 3
    loss = HardNegativeSoftmaxLoss(torch.nn.Identity(), temperature=t).loss_from_embeddings(q, [pos, n1, n2])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_hard_negative_loss_ignores_the_rest_of_the_batch():
    """Own negatives only: an example's loss does not change with what else is in the batch."""
    torch.manual_seed(1)
    q, pos, neg = (torch.randn(4, 8) for _ in range(3))
    loss_fn = HardNegativeSoftmaxLoss(torch.nn.Identity())
    together = loss_fn.loss_from_embeddings(q, [pos, neg])
    alone = sum(loss_fn.loss_from_embeddings(q[i : i + 1], [pos[i : i + 1], neg[i : i + 1]]) for i in range(4)) / 4
    assert together.item() == pytest.approx(alone.item(), rel=1e-5)


def test_negatives_top_ranked_first_and_padded_by_repetition():
    known = {"a", "b", "c"}
    negs = [{"id": "b", "score": 0.5}, {"id": "zz", "score": 0.9}, {"id": "a", "score": 0.7}]
    assert pick_negatives(negs, 4, known) == ["a", "b", "a", "b"]  # unknown 'zz' skipped, best first, cycled
    assert pick_negatives(negs, 1, known) == ["a"]
    assert pick_negatives([], 3, known) == []


def test_training_table_columns_padding_and_drops():
    corpus = {i: {"_id": i, "title": f"T{i}", "text": f"text {i}"} for i in "pqrs"}
    records = [
        {"question": "q1", "pos_doc": [{"id": "p"}], "neg_doc": [{"id": "q", "score": 0.4}, {"id": "r", "score": 0.6}]},
        {"question": "q2", "pos_doc": [{"id": "q"}], "neg_doc": [{"id": "s", "score": 0.3}]},
        {"question": "q3", "pos_doc": [{"id": "p"}], "neg_doc": []},
        {"question": "q4", "pos_doc": [{"id": "missing"}], "neg_doc": [{"id": "s", "score": 0.3}]},
    ]
    table = build_training_table(records, corpus, passages_per_query=3)
    assert list(table.columns) == ["anchor", "positive", "negative_1", "negative_2"]
    assert table.columns["anchor"] == ["q1", "q2"]
    assert table.columns["positive"] == ["Tp\ntext p", "Tq\ntext q"]
    assert table.columns["negative_1"] == ["Tr\ntext r", "Ts\ntext s"]
    assert table.columns["negative_2"] == ["Tq\ntext q", "Ts\ntext s"]  # q2 padded by repeating its only negative
    assert (table.examples, table.padded, table.no_negatives, table.missing_passages) == (2, 1, 1, 1)


@pytest.mark.parametrize(
    ("n", "batch", "auto"), [(120, 16, True), (300, 37, True), (1000, 64, True), (1999, 64, True), (5000, 128, False)]
)
def test_small_data_auto_scaling(n, batch, auto):
    plan = plan_training(n, CFG)
    assert (plan.global_batch, plan.auto_scaled) == (batch, auto)
    assert plan.total_steps // plan.eval_steps >= 3  # at least three checkpoints
    assert plan.warmup_steps == math.ceil(0.05 * plan.total_steps)
    assert bool(plan.warnings) == (plan.total_steps < 50)


def test_plan_distributed_and_cached_accumulation():
    dist = plan_training(5000, CFG, world_size=4)
    assert (dist.per_device_batch, dist.global_batch) == (32, 128)
    cached = plan_training(5000, {**CFG, "cached": True, "mini_batch_size": 16})
    assert (cached.per_device_batch, cached.grad_accum, cached.global_batch) == (16, 8, 128)
    capped = plan_training(5000, {**CFG, "max_steps": 10})
    assert capped.total_steps == 10 and capped.eval_steps == 3


def test_cpu_profile_overrides_only_on_cpu():
    cfg = {"max_seq_length": None, "passages_per_query": 5, "cpu": {"passages_per_query": 3}}
    assert effective_params(cfg, "cpu")["passages_per_query"] == 3
    assert effective_params(cfg, "cuda")["passages_per_query"] == 5
    assert "cpu" not in effective_params(cfg, "cuda")


def test_validation_groups_unrolled_records_by_source():
    corpus = {"a": {}, "b": {}}
    records = [
        {"question_id": "x_0", "source_id": "x", "question": "Q", "pos_doc": [{"id": "a"}]},
        {"question_id": "x_1", "source_id": "x", "question": "Q", "pos_doc": [{"id": "b"}]},
        {"question_id": "y_0", "source_id": "y", "question": "R", "pos_doc": [{"id": "gone"}]},
    ]
    queries, relevant = validation_queries(records, corpus)
    assert queries == {"x": "Q"} and relevant == {"x": {"a", "b"}}
