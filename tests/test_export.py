"""The export stage on MiniLM: one graph ids -> normalised embedding, parity with PyTorch, fast variants, Triton."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from embedpipe.core.encoders import BATCH_DEPENDENT, CPU_VARIANTS, VARIANTS, OnnxEncoder, open_encoder
from embedpipe.core.io import load_corpus, passage_text
from embedpipe.core.models import encode
from embedpipe.serving.export import int8_matmul_error
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


def test_fast_variants_are_built_checked_and_the_fastest_passing_one_is_the_default(exported):
    report = json.loads((exported / "export.json").read_text())
    out, variants = exported / "onnx", report["variants"]
    opt = variants["fp32_opt"]
    assert opt["fused"].get("Attention", 0) == 6 and opt["fused"].get("SkipLayerNormalization", 0) >= 6  # 6 layers
    assert opt["passed"] and opt["cosine_min"] > 0.9999 and opt["metric_max_drift"] <= 0.01
    int8 = variants["int8"]
    assert int8["reduce_range"] is True and len(int8["fp32_matmuls"]) == 6
    # the excluded MatMuls are the ones with the largest measured error, and stay float MatMuls in the int8 graph
    errors = list(int8["matmul_int8_error"].values())
    assert errors == sorted(errors, reverse=True) and list(int8["matmul_int8_error"])[:6] == int8["fp32_matmuls"]
    if int8["passed"]:
        graph = onnx.load(str(out / "model_int8.onnx"))
        matmuls = {n.name for n in graph.graph.node if n.op_type == "MatMul"}
        assert set(int8["fp32_matmuls"]) <= matmuls
        assert sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.graph.node) == 30
    passed = [v for v in CPU_VARIANTS if variants[v]["passed"] and v not in BATCH_DEPENDENT]
    assert "int8" not in passed
    assert report["default_variant"] == max(passed, key=lambda v: variants[v]["texts_per_s"])
    assert json.loads((out / "embedpipe.json").read_text())["default_variant"] == report["default_variant"]
    assert open_encoder(out, "auto").variant == report["default_variant"]
    bf16 = variants["torch_bf16"]  # the torch copy under bf16 autocast: close to fp32, saved only when it passed
    assert bf16["passed"] and bf16["cosine_min"] > 0.999 and bf16["metric_max_drift"] <= 0.01
    assert (out / "torch" / "modules.json").is_file() and bf16["file_mb"] > 80  # MiniLM's weights: ~87 MB
    block = variants["int8_block"]
    assert block["cosine_min"] > 0.999 and block["block_size"] == 32  # block-wise scales: far closer than int8
    if block["passed"]:
        graph = onnx.load(str(out / "model_int8_block.onnx"))
        assert sum(n.op_type == "MatMulNBits" for n in graph.graph.node) == 36
    for v in ("fp32_opt", "int8", "int8_block", "fp16"):  # every variant that passed is kept, every other deleted
        assert variants[v]["passed"] == (out / VARIANTS[v]).exists()


def test_int8_matmul_error_grows_with_activation_outliers():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=(32, 16)).astype(np.float32)
    plain = int8_matmul_error(x, w)
    x[0, 0] = 200.0  # one outlier stretches the per-tensor activation scale for every row
    assert plain < 0.03 < int8_matmul_error(x, w)
    assert int8_matmul_error(x, w, reduce_range=False) < int8_matmul_error(x, w, reduce_range=True)


def test_parity_texts_keep_every_relevant_passage_within_the_cap(tmp_path, tiny_corpus_path):
    """A big test corpus is cut for parity (5 variants encode it): relevant passages stay, the sample is fixed."""
    import importlib.util
    from pathlib import Path

    from embedpipe.core.io import load_beir
    from embedpipe.core.retrieval import bounded_corpus
    from tests.eval_helpers import make_tiny_beir

    spec = importlib.util.spec_from_file_location("export_stage", Path(__file__).parents[1] / "stages" / "export.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    beir = make_tiny_beir(tmp_path / "beir", tiny_corpus_path)
    corpus, queries, qrels = load_beir(beir)
    relevant = {pid for docs in qrels.values() for pid in docs}
    full = stage.load_texts(beir, tiny_corpus_path)
    assert len(full["passages"]) == full["corpus_total"] == len(corpus) == 21
    cut = stage.load_texts(beir, tiny_corpus_path, max_passages=len(relevant) + 3, seed=1)
    assert len(cut["passages"]) == len(relevant) + 3 and relevant <= set(cut["corpus_ids"])
    assert cut["corpus_ids"] == [pid for pid in corpus if pid in set(cut["corpus_ids"])]  # corpus order
    assert cut == stage.load_texts(beir, tiny_corpus_path, max_passages=len(relevant) + 3, seed=1)  # reproducible
    assert cut["queries"] == full["queries"] and cut["qrels"] == full["qrels"]
    # The cap never drops a passage a check is about, even when they alone exceed it.
    ids, sampled = bounded_corpus(list(corpus), relevant, 2, seed=0)
    assert set(ids) == relevant and sampled == 0
    assert ids == [pid for pid in corpus if pid in relevant]  # corpus order, whatever the order of `keep`
    assert bounded_corpus(list(corpus), relevant, 0, seed=0) == (list(corpus), 21 - len(relevant))


def export_stage_module():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("export_stage", Path(__file__).parents[1] / "stages" / "export.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    return stage


def test_variant_plan_builds_only_what_can_win_here(monkeypatch):
    plan = export_stage_module().variant_plan
    defaults = {"optimize": True, "int8": False, "int8_block": True, "fp16": "auto", "torch_bf16": "auto"}
    monkeypatch.delenv("EMBEDPIPE_BF16", raising=False)
    build, skipped = plan(defaults, gpu=False, native_bf16=False)
    assert set(build) == {"fp32_opt", "int8_block"} and set(skipped) == {"int8", "fp16", "torch_bf16"}
    assert "no CUDA GPU" in skipped["fp16"] and "export.int8: true" in skipped["int8"]
    assert "no native bfloat16" in skipped["torch_bf16"]
    assert set(plan(defaults, gpu=True, native_bf16=True)[0]) == {"fp32_opt", "int8_block", "fp16", "torch_bf16"}
    monkeypatch.setenv("EMBEDPIPE_BF16", "off")
    assert "EMBEDPIPE_BF16=off" in plan(defaults, gpu=False, native_bf16=False)[1]["torch_bf16"]
    asked = {**defaults, "int8": True, "fp16": True, "optimize": False, "torch_bf16": False}
    build, skipped = plan(asked, gpu=False, native_bf16=False)
    assert set(build) == {"int8", "int8_block", "fp16"}
    assert skipped == {"fp32_opt": "export.optimize: false", "torch_bf16": "export.torch_bf16: false"}


def test_export_names_each_skipped_variant_with_its_reason(tmp_path, tiny_corpus_path):
    """The default params on this machine, bf16 off: what cannot win here is not built, and the summary and
    metrics say why (fp32_opt and int8_block are switched off only to keep the test short)."""
    import subprocess
    import sys

    import torch
    import yaml
    from conftest import REPO_ROOT, stage_env

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["export"].update(input="all-MiniLM-L6-v2", out_dir=str(tmp_path / "onnx"), eval_dir=str(tmp_path / "none"),
                            fallback_corpus=str(tiny_corpus_path), optimize=False, int8_block=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "stages/export.py", "--params", str(tmp_path / "params.yaml"),
                           "--metrics", str(tmp_path / "export.json")], cwd=REPO_ROOT,
                          env={**stage_env(), "EMBEDPIPE_BF16": "off"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "export.json").read_text())
    skipped = report["skipped_variants"]
    assert "EMBEDPIPE_BF16=off" in skipped["torch_bf16"] and "export.int8: true" in skipped["int8"]
    assert skipped["fp32_opt"] == "export.optimize: false" and "tensorrt" in skipped
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in skipped["fp16"] and not (tmp_path / "onnx" / "model_fp16.onnx").exists()
    assert not (tmp_path / "onnx" / "model_int8.onnx").exists() and report["variants"]["fp32"]["passed"]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in proc.stderr.splitlines() if "│" in line]
    for variant, reason in skipped.items():
        assert report["variants"][variant] == {"skipped": reason}
        if variant != "tensorrt":  # (TensorRT has its own line, checked in test_export_metrics_report_parity)
            assert f"{variant}: skipped ({reason})" in proc.stderr  # one line when the export starts
        assert any(row[:1] == [variant] and row[1].startswith("skipped: ") for row in rows), variant  # summary
