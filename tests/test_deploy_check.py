"""deploy_check: served vectors vs the stored fine-tuned ones on a sample, full served eval only on small test sets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from embedpipe.core.embed_store import STORE_ENV, read_encode_log
from embedpipe.core.io import load_corpus
from embedpipe.serving.deploy import sample_test_set, vector_agreement
from tests.serve_helpers import API_KEY, API_KEY_ENV, make_session_export


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_corpus_path):
    return make_session_export(tmp_path_factory.mktemp("export"), tiny_corpus_path)


def test_sample_is_seeded_in_file_order_and_capped(tiny_corpus_path):
    corpus = load_corpus(tiny_corpus_path)
    queries = {f"q{i}": {"_id": f"q{i}", "text": f"question {i}?"} for i in range(5)}
    a, b = sample_test_set(corpus, queries, 8, 3, seed=1), sample_test_set(corpus, queries, 8, 3, seed=1)
    assert a == b and len(a["passages"]) == 8 and len(a["queries"]) == 3
    order = list(corpus)
    assert a["passage_ids"] == sorted(a["passage_ids"], key=order.index)
    assert sample_test_set(corpus, queries, 8, 3, seed=2)["passage_ids"] != a["passage_ids"]
    everything = sample_test_set(corpus, queries, 0, 100)
    assert everything["passage_ids"] == order and len(everything["queries"]) == 5


def test_vector_agreement_finds_the_worst_row():
    ref = np.eye(4, dtype=np.float32)
    served = ref.copy()
    served[3] = [0, 0, 0.6, 0.8]  # the one query served differently: cosine 0.8
    got = vector_agreement((ref[:3], ref[3:]), (served[:3], served[3:]))
    assert got["texts"] == 4 and got["cosine_min"] == pytest.approx(0.8)
    assert got["cosine_min_by_kind"] == {"passage": 1.0, "query": pytest.approx(0.8)}
    with pytest.raises(ValueError, match="shape"):
        vector_agreement((ref, ref[:0]), (ref[:, :2], ref[:0, :2]))


def _deploy(exported, repo_root, work, **deploy) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the stage on the session export, reference model = the exported MiniLM, own embedding store."""
    from conftest import stage_env

    params = yaml.safe_load((exported / "params.yaml").read_text())
    export = json.loads((exported / "export.json").read_text())
    reference = work / "eval.json"  # what eval would have written: the torch metrics on the same test set
    reference.write_text(json.dumps({"finetuned": export["variants"]["torch"]["metrics"]}))
    # fp32 served: the export's `auto` default is picked by measured speed, which varies with machine load.
    params["deploy"].update(variant="fp32", eval_dir=str(exported / "eval"), reference=str(reference),
                            reference_model="all-MiniLM-L6-v2", sample_passages=8, **deploy)
    params["serve"]["max_inputs_per_request"] = 64  # the session export's 16 is for the server's limit tests
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    out = work / "serve_eval.json"
    proc = subprocess.run([sys.executable, "stages/deploy_check.py", "--params", str(work / "params.yaml"),
                           "--out", str(out)], cwd=repo_root,
                          env=stage_env() | {API_KEY_ENV: API_KEY, STORE_ENV: str(work.parent / "store"),
                                             "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=300)
    return proc, (json.loads(out.read_text()) if out.is_file() else {})


def test_small_test_set_gets_sample_and_full_check_then_large_one_sample_only(exported, repo_root, tmp_path):
    (tmp_path / "a").mkdir()
    proc, result = _deploy(exported, repo_root, tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["check"] == "sample+full" and result["full_eval"] is True and result["passed"] is True
    assert result["serving"] | {"max_batch_tokens": 0} == {  # the server's own record (GET /v1/models/{name})
        "variant": "fp32", "runtime": "onnxruntime", "device": "cpu", "max_batch_tokens": 0, "model_processes": 1,
        "threads_per_process": 0, "compile_requested": False, "compiled": False}
    assert result["served_as"].startswith("fp32 on onnxruntime, cpu, ") and "1 model process" in result["served_as"]
    assert "21 passages <= deploy.full_eval_max_passages (2000)" in result["full_eval_reason"]
    vc = result["vector_check"]
    assert vc["passages"] == 8 and vc["queries"] == 21 and vc["passed"] and vc["cosine_min"] >= 0.999
    assert vc["reference_encoded"] == 29  # a fresh store: the sample is encoded once...
    assert result["endpoint_metrics"]["ndcg@10"] > 0.5 and all(result["checks"].values())
    assert "sample vectors + full served metrics" in proc.stderr + proc.stdout

    # A test set "too large" for a full HTTP evaluation, and a bar no real server can reach: sample only, clean failure.
    (tmp_path / "b").mkdir()
    proc, result = _deploy(exported, repo_root, tmp_path / "b", full_eval_max_passages=5, sample_cosine_min={"fp32": 1.01})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert result["check"] == "sample" and result["full_eval"] is False and result["passed"] is False
    assert "endpoint_metrics" not in result and "checked on the sample only" in result["full_eval_reason"]
    assert result["vector_check"]["reference_encoded"] == 0  # ...and read back from the store the second time
    assert result["vector_check"]["cosine_required"] == 1.01 and not result["vector_check"]["passed"]
    assert "served vectors differ" in proc.stderr + proc.stdout
    log = read_encode_log(tmp_path / "store")
    assert [r["encoded"] for r in log] == [8, 21, 0, 0] and {r["stage"] for r in log} == {"deploy_check"}
