"""The export stage on MiniLM: one graph ids -> normalised embedding, parity with PyTorch, int8, Triton repo."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from embedpipe.io import load_corpus, passage_text
from embedpipe.models import encode
from embedpipe.onnx_encoder import OnnxEncoder
from tests.serve_helpers import PASSAGE_PROMPT, QUERY_PROMPT, make_session_export


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_corpus_path):
    return make_session_export(tmp_path_factory.mktemp("export"), tiny_corpus_path)


def test_export_writes_one_self_contained_graph(exported):
    out = exported / "onnx"
    graph = onnx.load(str(out / "model.onnx"))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.graph.output] == ["sentence_embedding"]
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]  # dynamic axes
    config = json.loads((out / "embedpipe.json").read_text())
    assert config["query_prompt"] == QUERY_PROMPT and config["dimension"] == 384
    assert config["passage_prompt"] == PASSAGE_PROMPT and config["max_seq_length"] == 256
    assert (out / "tokenizer.json").is_file()
    triton = out / "triton" / "test-embed"
    assert (triton / "1" / "model.onnx").stat().st_size == (out / "model.onnx").stat().st_size
    pbtxt = (triton / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in pbtxt and "dims: [ 384 ]" in pbtxt and "max_batch_size: 64" in pbtxt


def test_export_metrics_report_parity(exported):
    report = json.loads((exported / "export.json").read_text())
    fp32 = report["variants"]["fp32"]
    assert fp32["passed"] and fp32["cosine_min"] >= 0.9999 and fp32["metric_max_drift"] <= 0.01
    assert report["parity_texts"] == 42 and report["variants"]["torch"]["metrics"]["ndcg@10"] > 0.5
    int8 = report["variants"]["int8"]
    assert 0.98 < int8["cosine_min"] < 1.0  # quantised: close, not equal
    assert int8["passed"] == (exported / "onnx" / "model_int8.onnx").exists()
    assert int8["file_mb"] < fp32["file_mb"] and report["variants"]["fp16"]["file_mb"] < fp32["file_mb"]
    assert "skipped" in report["variants"]["tensorrt"]  # no GPU here
    assert "TensorRT: skipped" in (exported / "export.log").read_text()


def test_onnx_encoder_matches_torch(exported, minilm, tiny_corpus_path):
    texts = [passage_text(r) for r in load_corpus(tiny_corpus_path).values()][:8] + ["a", "x " * 600]
    onnx_enc = OnnxEncoder(exported / "onnx")
    for prompt in (QUERY_PROMPT, PASSAGE_PROMPT):
        ours, ref = onnx_enc.encode(texts, prompt), encode(minilm, texts, prompt)
        assert ours.dtype == np.float32 and ours.shape == (10, 384)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
        assert np.min(np.sum(ours * ref, axis=1)) > 0.9999  # incl. a text truncated at 256 tokens
