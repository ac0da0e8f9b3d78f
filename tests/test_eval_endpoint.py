"""Endpoint mode against a real loopback OpenAI-compatible server serving MiniLM, and broken variants of it."""

from __future__ import annotations

import json

import pytest
from eval_helpers import EmbeddingsServer, make_tiny_beir, run_stage, write_params

from embedpipe.core.io import load_beir, write_json
from embedpipe.core.processes import free_port
from embedpipe.evaluation.report import evaluate_embedder, model_embedder


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_corpus_path, minilm):
    """A tiny BEIR folder, fast-retry params, and the local model's metrics as the reference JSON."""
    root = tmp_path_factory.mktemp("endpoint")
    beir = make_tiny_beir(root / "beir", tiny_corpus_path)
    params = write_params(root / "params.yaml", endpoint_max_retries=2, endpoint_batch_size=8, endpoint_timeout_s=30)
    corpus, queries, qrels = load_beir(beir)
    local = evaluate_embedder("local", model_embedder(minilm, "", "", 32, False), corpus, queries, qrels)
    reference = root / "eval.json"
    write_json(reference, {"base": local.metrics, "finetuned": local.metrics, "queries": 7, "passages": 21, "dimension": 384})
    return {"root": root, "beir": beir, "params": params, "reference": reference, "local": local.metrics}


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    with EmbeddingsServer(minilm, free_port()) as srv:
        yield srv


def run_endpoint(work, server, mode, *extra):
    server.mode = mode
    server.requests.clear()
    out = work["root"] / f"serve_eval_{mode}.json"
    proc = run_stage(
        "--params", str(work["params"]), "--beir-dir", str(work["beir"]),
        "--endpoint", server.url, "--model", "minilm", "--out", str(out), *extra,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, (json.loads(out.read_text()) if out.is_file() else None)


def test_correct_endpoint_matches_reference_json(work, server):
    proc, result = run_endpoint(work, server, "ok", "--reference", str(work["reference"]))
    assert proc.returncode == 0, proc.stderr
    assert result["passed"] is True and all(result["checks"].values()) and len(result["checks"]) == 17
    assert result["dimension"] == 384
    for metric, value in result["endpoint_metrics"].items():
        assert value == pytest.approx(work["local"][metric], abs=0.01)
    assert "✓ NDCG@10:" in proc.stdout and "✗" not in proc.stdout
    # The client sent input_type, asked for base64 (the openai default) and batched by endpoint_batch_size.
    kinds = {r["input_type"] for r in server.requests}
    assert kinds == {"query", "passage"}
    assert all(r["encoding_format"] == "base64" for r in server.requests)
    assert max(len(r["input"]) for r in server.requests) == 8


def test_correct_endpoint_matches_local_reference_model(work, server, tmp_path, minilm):
    model_dir = tmp_path / "model"
    minilm.save(str(model_dir))
    proc, result = run_endpoint(work, server, "ok", "--reference-model", str(model_dir))
    assert proc.returncode == 0, proc.stderr
    assert result["passed"] is True and result["reference_source"] == f"model {model_dir}"
    assert max(abs(d) for d in result["delta"].values()) <= 0.01


def test_out_of_order_items_with_right_indices_are_fine(work, server):
    proc, result = run_endpoint(work, server, "permuted", "--reference", str(work["reference"]))
    assert proc.returncode == 0, proc.stderr
    assert result["passed"] is True


def test_transient_server_error_is_retried(work, server):
    proc, result = run_endpoint(work, server, "flaky", "--reference", str(work["reference"]))
    assert proc.returncode == 0, proc.stderr
    assert result["passed"] is True


@pytest.mark.parametrize(
    "mode, message",
    [
        ("wrong_dim", "has dimension 128, expected 384"),
        ("nan", "contains NaN or infinite values"),
        ("shuffled", "wrong order"),
        ("missing", "sent 8 inputs but got 7 vectors back"),
        ("down", "HTTP 500"),
    ],
)
def test_endpoint_faults_fail_clearly(work, server, mode, message):
    proc, result = run_endpoint(work, server, mode, "--reference", str(work["reference"]))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "ENDPOINT FAULT" in proc.stderr
    assert result["passed"] is False and message in result["error"]


def test_drift_beyond_tolerance_fails(work, server):
    """Valid, finite, well-ordered vectors from the wrong model: only the metrics can tell."""
    proc, result = run_endpoint(work, server, "random", "--reference", str(work["reference"]))
    assert proc.returncode == 1
    assert "DRIFT" in proc.stderr and "✗ NDCG@10:" in proc.stdout
    assert result["passed"] is False and result["checks"]["ndcg@10"] is False


def test_unreachable_endpoint_and_bad_usage(work, free_port):
    proc = run_stage(
        "--params", str(work["params"]), "--beir-dir", str(work["beir"]), "--reference", str(work["reference"]),
        "--endpoint", f"http://127.0.0.1:{free_port}/v1", "--model", "m", "--out", str(work["root"] / "x.json"),
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot connect" in proc.stderr
    proc = run_stage("--beir-dir", str(work["beir"]), "--endpoint", "http://127.0.0.1:1/v1")
    assert proc.returncode != 0 and "--model NAME" in proc.stderr
    proc = run_stage("--beir-dir", str(work["beir"]), "--endpoint", "http://x/v1", "--model", "m", "--api-key-env", "NO_SUCH_VAR_X")
    assert proc.returncode != 0 and "NO_SUCH_VAR_X" in proc.stderr and "Traceback" not in proc.stderr
