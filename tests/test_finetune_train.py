"""finetune: real training runs with all-MiniLM-L6-v2 on the tiny corpus (library, stage, regression, 2-process gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, stage_env
from finetune_helpers import tiny_params, write_prep

from embedpipe.core.io import load_corpus, passage_text, read_jsonl
from embedpipe.core.models import encode, load_model
from embedpipe.training.data import build_training_table, validation_queries
from embedpipe.training.losses import HardNegativeSoftmaxLoss
from embedpipe.training.trainer import make_evaluator, plan_training, train

pytestmark = pytest.mark.slow
PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module")
def prep_dir(tmp_path_factory, tiny_corpus_path, minilm) -> Path:
    return write_prep(tmp_path_factory.mktemp("prep"), tiny_corpus_path, minilm)


def run_stage(tmp: Path, prep: Path, params: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO_ROOT / "stages" / "finetune.py"), "--params", str(params), "--prep-dir", str(prep),
           "--out", str(tmp / "model"), "--metrics", str(tmp / "train.json"), "--live-dir", str(tmp / "live"),
           "--checkpoint-dir", str(tmp / "ckpt"), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp, env=stage_env(), capture_output=True, text=True, timeout=240)


def table_loss(model, table, loss_fn) -> float:
    """The recipe's loss over the whole training table, prompts applied as in training."""
    with torch.no_grad():
        q = torch.from_numpy(encode(model, table.columns["anchor"], prompt=PROMPTS["query"]))
        docs = [
            torch.from_numpy(encode(model, v, prompt=PROMPTS["passage"]))
            for k, v in table.columns.items()
            if k != "anchor"
        ]
        return loss_fn.loss_from_embeddings(q, docs).item()


def test_a_few_steps_lower_the_loss(prep_dir, tmp_path):
    model = load_model("all-MiniLM-L6-v2", device="cpu", max_seq_length=64)
    corpus = load_corpus(prep_dir / "train_corpus.jsonl")
    table = build_training_table(read_jsonl(prep_dir / "train.jsonl"), corpus, passages_per_query=3)
    assert table.examples == 18  # 16 single-hop + 1 two-hop question unrolled
    cfg = {"passages_per_query": 3, "temperature": 0.02, "in_batch_negatives": False, "cached": False,
           "mini_batch_size": 8, "learning_rate": 5e-5, "epochs": 2, "max_steps": 3, "warmup_ratio": 0.0,
           "weight_decay": 0.01, "global_batch_size": 128, "small_data_threshold": 2000, "min_checkpoints": 1,
           "eval_steps": 200, "seed": 0, "bf16": "auto"}  # fmt: skip
    plan = plan_training(table.examples, cfg)
    queries, relevant = validation_queries(read_jsonl(prep_dir / "val.jsonl"), corpus)
    evaluator = make_evaluator(queries, {i: passage_text(r) for i, r in corpus.items()}, relevant, PROMPTS)
    loss_fn = HardNegativeSoftmaxLoss(model, 0.02)
    before = table_loss(model, table, loss_fn)
    result = train(model, table, evaluator, cfg, plan, "cpu", PROMPTS, tmp_path / "ckpt", tmp_path / "live")
    after = table_loss(model, table, loss_fn)
    assert result.steps == 3
    assert after < before * 0.9, (before, after)
    assert 0.0 <= result.base_ndcg10 <= 1.0 and result.best_step in (0, 3)
    live_files = {p.name for p in (tmp_path / "live").rglob("*.tsv")}
    assert {"loss.tsv", "learning_rate.tsv", "val_cosine_ndcg@10.tsv"} <= live_files


def test_regression_guard_saves_the_base_model_and_can_fail(prep_dir, tmp_path, minilm):
    """A learning rate of 5e-3 wrecks the model: the stage must keep the base model and, if asked, exit non-zero."""
    params = tiny_params(tmp_path / "params.yaml", learning_rate=5e-3, max_steps=1, fail_on_regression=True)
    proc = run_stage(tmp_path, prep_dir, params)
    assert proc.returncode != 0
    assert "REGRESSION" in proc.stderr and "fail_on_regression" in proc.stderr
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["regression"] is True and metrics["saved_model"] == "base"
    assert metrics["val_ndcg@10_finetuned"] < metrics["val_ndcg@10_base"]
    saved = load_model(str(tmp_path / "model"), device="cpu")
    text = ["Descale the K1 every 8 weeks."]
    np.testing.assert_allclose(
        encode(saved, text, prompt="passage: "), encode(minilm, text, prompt="passage: "), atol=1e-5
    )


def test_two_process_gloo_run_saves_a_loadable_model_with_prompts(prep_dir, tmp_path):
    """The same stage under torchrun: 2 CPU processes (gloo), in-batch negatives gathered across them."""
    # passages_per_query 1: with hard-negative columns the tiny corpus (21 passages) cannot fill duplicate-free batches
    params = tiny_params(
        tmp_path / "params.yaml", in_batch_negatives=True, passages_per_query=1, max_steps=2, nproc_per_node=2
    )
    proc = run_stage(tmp_path, prep_dir, params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert (metrics["processes"], metrics["steps"], metrics["per_device_batch"], metrics["batch_size"]) == (2, 2, 8, 16)
    assert metrics["saved_model"] == ("base" if metrics["regression"] else "finetuned")
    assert {"val_ndcg@10_base", "val_ndcg@10_finetuned", "best_step", "wall_time_s", "examples"} <= set(metrics)

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert {k: model.prompts[k] for k in PROMPTS} == PROMPTS
    by_name = model.encode(["descale the kettle"], prompt_name="query", normalize_embeddings=True)
    np.testing.assert_allclose(by_name, encode(model, ["descale the kettle"], prompt="query: "), atol=1e-6)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "all-MiniLM-L6-v2" in card and "nDCG@10" in card and "SentenceTransformer(" in card
    loss_curve = (tmp_path / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert loss_curve[0].split("\t")[:2] == ["step", "loss"] and len(loss_curve) == 3  # header + one row per step
    assert not (tmp_path / "ckpt").exists()  # scratch checkpoints removed


def test_time_budget_bounded_validation_and_wise_alpha_in_the_stage(prep_dir, tmp_path):
    """A 0.03 s budget stops after the first step (validated and checkpointed); the val corpus is capped; the
    saved model is the best of base / alpha 0.5 / best checkpoint on validation, and every output says so."""
    params = tiny_params(tmp_path / "params.yaml", epochs=3, max_steps=6, max_minutes=0.0005, val_max_passages=18,
                         wise_alphas=[0.5, 1.0], learning_rate=5e-5)  # fmt: skip
    proc = run_stage(tmp_path, prep_dir, params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "train.json").read_text())
    budget = metrics["budget"]
    assert (metrics["steps"], metrics["steps_planned"]) == (1, 6)
    assert budget["cut_by_budget"] and (budget["steps_taken"], budget["steps_not_taken"]) == (1, 5)
    assert budget["step_time_s_mean"] > 0 and budget["max_minutes"] == 0.0005
    assert "time budget: stopped after 1 of 6 planned steps" in proc.stderr
    assert metrics["best_step"] in (0, 1)
    val = metrics["val_corpus"]
    assert val["max_passages"] == 18 and val["corpus_passages"] == 21
    assert val["passages"] == max(18, val["positives"] + val["mined_negatives"]) == (
        val["positives"] + val["mined_negatives"] + val["random_sample"])
    by_alpha = metrics["val_ndcg@10_by_alpha"]
    assert set(by_alpha) == {"0", "0.5", "1"}
    assert by_alpha["0"] == metrics["val_ndcg@10_base"] and by_alpha["1"] == metrics["val_ndcg@10_finetuned"]
    best = max(by_alpha, key=lambda a: (by_alpha[a], float(a)))
    assert metrics["wise_alpha"] == float(best) and metrics["val_ndcg@10_saved"] == by_alpha[best]
    assert metrics["saved_model"] == {"0": "base", "0.5": "interpolated", "1": "finetuned"}[best]
    card = (tmp_path / "model" / "README.md").read_text()
    assert "interpolated, alpha 0.5 (WiSE-FT)" in card and "of 21 passages" in card


def test_saved_model_seq_length_is_the_pipelines_not_the_training_one(prep_dir, tmp_path):
    """Trained at 64 tokens (as the CPU profile trains at 128), saved at model.max_seq_length (256): a plain
    `SentenceTransformer(path)` encodes a ~200-token text as the pipeline (eval) and the torch server do."""
    import yaml
    from sentence_transformers import SentenceTransformer

    from embedpipe.core.encoders import EncoderSpec, build_encoder

    params = tiny_params(tmp_path / "params.yaml", max_steps=1, max_seq_length=64, wise_alphas=[1.0])
    raw = yaml.safe_load(params.read_text())
    raw["model"]["max_seq_length"] = 256
    params.write_text(yaml.safe_dump(raw))
    proc = run_stage(tmp_path, prep_dir, params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert (metrics["max_seq_length"], metrics["saved_max_seq_length"]) == (64, 256)

    plain = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert plain.max_seq_length == 256
    text = " ".join(passage_text(r) for r in list(load_corpus(prep_dir / "train_corpus.jsonl").values())[:6])
    n_tokens = len(plain.tokenizer(text)["input_ids"])
    text = " ".join(text.split()[: int(len(text.split()) * 200 / n_tokens)])  # ~200 tokens
    assert 150 < len(plain.tokenizer(text)["input_ids"]) <= 256
    mine = plain.encode([text], prompt="passage: ", normalize_embeddings=True)
    pipeline = encode(load_model(str(tmp_path / "model"), device="cpu", max_seq_length=256), [text], "passage: ")
    server = build_encoder(EncoderSpec(backend="torch", folder=str(tmp_path / "none"),
                                       torch_model=str(tmp_path / "model"), max_seq_length=256)).encode([text],
                                                                                                        "passage: ")
    assert float(mine[0] @ pipeline[0]) > 0.9999 and float(mine[0] @ server[0]) > 0.9999
    plain.max_seq_length = 64  # what was saved before: the text cut at 64 tokens is another vector
    assert float(plain.encode([text], prompt="passage: ", normalize_embeddings=True)[0] @ pipeline[0]) < 0.9999
