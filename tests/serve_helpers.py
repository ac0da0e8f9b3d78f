"""Shared by test_export.py and test_serve.py: one small export per test session (it takes ~30 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from embedpipe.core.io import load_corpus, write_beir

REPO_ROOT = Path(__file__).resolve().parents[1]
QUERY_PROMPT, PASSAGE_PROMPT = "query: ", "passage: "
API_KEY_ENV, API_KEY = "EMBEDPIPE_TEST_KEY", "test-key-123"
_cache: dict[str, Path] = {}


def make_session_export(tmp_root: Path, tiny_corpus_path: Path) -> Path:
    """Export MiniLM (with query/passage prompts) to tmp_root/onnx, parity-checked on a tiny BEIR set."""
    if "root" in _cache:
        return _cache["root"]
    from conftest import stage_env

    corpus = load_corpus(tiny_corpus_path)
    queries = [{"_id": f"q{i}", "text": r["title"].split(" > ")[-1] + ": " + r["text"][:80]}
               for i, r in enumerate(corpus.values())]
    write_beir(tmp_root / "eval", corpus.values(), queries, {f"q{i}": {pid: 1} for i, pid in enumerate(corpus)})
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["model"].update(query_prompt=QUERY_PROMPT, passage_prompt=PASSAGE_PROMPT)
    params["export"].update(input="all-MiniLM-L6-v2", out_dir=str(tmp_root / "onnx"), eval_dir=str(tmp_root / "eval"),
                            model_name="test-embed", torch_bf16=True,  # checked on any CPU (emulated bf16 is slow)
                            int8=True, fp16=True)  # asked for explicitly: the tests check them on any machine
    params["serve"].update(model_dir=str(tmp_root / "onnx"), variant="fp32", api_key_env=API_KEY_ENV, max_inputs_per_request=16,
                           max_payload_mb=0.05, max_wait_ms=20, max_batch_size=64)
    (tmp_root / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "stages/export.py", "--params", str(tmp_root / "params.yaml"),
                             "--metrics", str(tmp_root / "export.json")],
                            cwd=REPO_ROOT, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _cache["root"] = tmp_root
    (tmp_root / "export.log").write_text(result.stderr)
    return tmp_root
