"""bench/bench_pipeline.py's arguments (the run itself takes minutes to an hour: run by hand, never here)."""

from __future__ import annotations

import importlib.util

from conftest import REPO_ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO_ROOT / "bench" / "bench_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fp32_mode_turns_bf16_off_for_every_stage_and_has_its_own_result_file(tmp_path, monkeypatch):
    bench = load_bench()
    results = REPO_ROOT / "bench" / "results"
    assert bench.parse_args([]).out == results / "pipeline.json"
    fp32 = bench.parse_args(["--fp32"])
    assert fp32.fp32 and fp32.out == results / "pipeline-sample-fp32.json"
    docs = bench.parse_args(["--fp32", "--docs", str(REPO_ROOT / "tests" / "data" / "tiny_docs")])
    assert docs.out == results / "pipeline-fp32.json"
    assert bench.parse_args(["--fp32", "--out", str(tmp_path / "x.json")]).out == tmp_path / "x.json"
    monkeypatch.delenv("EMBEDPIPE_BF16", raising=False)
    env = bench.stage_environment(tmp_path, tmp_path / "store", fp32=True)
    assert env["EMBEDPIPE_BF16"] == "off" and env["EMBEDPIPE_EMBED_CACHE"] == str(tmp_path / "store")
    assert "EMBEDPIPE_BF16" not in bench.stage_environment(tmp_path, tmp_path / "store", fp32=False)
    summary = bench.encode_summary([{"model": "m", "fingerprint": "f", "kind": "passage", "encoded": 4, "requested": 4,
                                     "stage": "eval", "backend": "onnx-fp32"}], 4, {"m": "base"})
    assert summary["base"]["backends"] == ["onnx-fp32"] and summary["base"]["encodes_per_passage"] == 1.0
