"""The bulk encoder: ONNX Runtime vectors match torch, live under their own fingerprint, and fall back with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedpipe.core import bulk_encoder, embed_store
from embedpipe.core.bulk_encoder import use_bulk_encoder
from embedpipe.core.embed_store import encode_cached, model_fingerprint, read_encode_log
from embedpipe.core.io import load_corpus, passage_text
from embedpipe.core.models import encode, load_model

QUERIES = ["How often should the K1 be descaled?", "What does a steady amber light mean?", "grinder burr part"]


@pytest.fixture(autouse=True)
def fresh_stores():
    embed_store._OPEN.clear()
    yield
    embed_store._OPEN.clear()


def fresh_model():
    """A model of its own (the session's `minilm` must stay unmarked for the other tests)."""
    return load_model("all-MiniLM-L6-v2", device="cpu", max_seq_length=256)


def test_onnx_bulk_encoder_matches_torch_and_is_stored_apart(tmp_path, tiny_corpus_path, monkeypatch):
    passages = [passage_text(r) for r in load_corpus(tiny_corpus_path).values()]
    passages.append(" ".join(passages))  # one text over 256 tokens: truncated the same way by both
    model = use_bulk_encoder(fresh_model(), "auto")
    p_onnx = encode_cached(model, passages, "", root=tmp_path, kind="passage")
    q_onnx = encode_cached(model, QUERIES, "query: ", root=tmp_path, kind="query")
    state = model._embedpipe_bulk_state
    assert state.backend == "onnx-fp32" and state.parity["passed"] and state.parity["texts"] >= 20
    # Against torch on every text, not only the parity sample.
    p_torch, q_torch = encode(model, passages), encode(model, QUERIES, prompt="query: ")
    cos = np.concatenate([(p_onnx * p_torch).sum(1), (q_onnx * q_torch).sum(1)])
    assert cos.min() >= 0.9999
    # The store records the backend, under a fingerprint of its own: torch asks again and gets torch vectors.
    log = read_encode_log(tmp_path)
    assert {r["backend"] for r in log} == {"onnx-fp32"}
    plain = load_model("all-MiniLM-L6-v2", device="cpu", max_seq_length=256)  # unmarked: torch
    assert model_fingerprint(plain) == model_fingerprint(model)
    p_again = encode_cached(plain, passages, "", root=tmp_path)
    last = read_encode_log(tmp_path)[-1]
    assert last["backend"] == "torch" and last["encoded"] == len(passages)
    np.testing.assert_allclose(p_again, p_torch, atol=1e-6)
    folders = sorted(tmp_path.glob("*-L256"))
    backends = {json.loads(next(f.glob("*.json")).read_text())["backend"] for f in folders}
    assert len(folders) == 2 and backends == {"onnx-fp32", "torch"}
    # Exported once per fingerprint: a new process (new model object) reuses the graph in the cache dir; when
    # the store has every text it needs no encoder at all, else it checks parity on its own texts first.
    graphs = list((tmp_path / "onnx").glob("*/model.onnx"))
    assert len(graphs) == 1 and (graphs[0].parent / "parity.json").is_file()
    monkeypatch.setattr("embedpipe.core.encoders.export_onnx", lambda *a, **k: pytest.fail("exported twice"))
    embed_store._OPEN.clear()
    again = use_bulk_encoder(fresh_model(), "auto")
    np.testing.assert_array_equal(encode_cached(again, passages, "", root=tmp_path), p_onnx)
    assert read_encode_log(tmp_path)[-1]["encoded"] == 0 and not hasattr(again, "_embedpipe_bulk_state")
    more = encode_cached(again, passages + ["The K2 boils 1.7 l in four minutes."], "", root=tmp_path)
    assert again._embedpipe_bulk_state.parity["passed"] and read_encode_log(tmp_path)[-1]["encoded"] == 1
    np.testing.assert_array_equal(more[:-1], p_onnx)


def test_forced_fallback_says_why_once_and_encodes_with_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bulk_encoder, "PARITY_COSINE_MIN", 1.5)  # no graph can pass: forced fallback
    model = use_bulk_encoder(fresh_model(), "onnx")
    texts = ["The pump stops at 8 bar.", "Descale every eight weeks.", "Replace the burr after 500 kg."]
    first = encode_cached(model, texts, "", root=tmp_path)
    encode_cached(model, texts + ["another text"], "", root=tmp_path)
    err = capsys.readouterr().err
    assert err.count("bulk encoder for all-MiniLM-L6-v2: torch (ONNX parity failed: cosine min") == 1
    assert model._embedpipe_bulk_state.backend == "torch"
    assert {r["backend"] for r in read_encode_log(tmp_path)} == {"torch"}
    assert [f.name for f in tmp_path.glob("*-L*")] == [f"{model_fingerprint(model)[:24]}-L256"]
    np.testing.assert_allclose(first, encode(model, texts), atol=1e-6)


def test_settings(minilm):
    with pytest.raises(ValueError, match="bulk_encoder must be one of"):
        use_bulk_encoder(object(), "tensorrt")
    assert bulk_encoder._reason_not_onnx(minilm, "torch") == "model.bulk_encoder: torch"
    assert bulk_encoder._reason_not_onnx(minilm, "auto") is None  # on the CPU, with onnxruntime installed
    texts = [f"text {i} " + "x " * i for i in range(100)]
    sample = bulk_encoder.parity_sample(texts)
    assert len(sample) == bulk_encoder.PARITY_SAMPLE and texts[-1] in sample and texts[0] in sample
