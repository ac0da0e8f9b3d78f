"""The whole pipeline through real `dvc repro` on a tiny corpus: outputs, incrementality, sharing.

One module-scoped run (a few minutes) feeds every test here. It runs in a scratch git+DVC repository
holding a copy of this project's pipeline code, so the real repository's outputs are never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT

from embedpipe.core.embed_store import STORE_ENV, read_encode_log

# Small everywhere: a handful of documents, LLM-free questions, two training steps.
TINY_OVERRIDES: dict[str, Any] = {
    "chunk": {"docs_dir": "docs", "target_tokens": 48, "overlap_tokens": 0, "min_tokens": 16},
    "sdg": {"llm": {"enabled": False}, "gates": {"retrieval": {"top_k": 10}}},
    "prep": {"val_min": 3},
    # No warmup: the first step really moves the weights, so the fine-tuned model differs from the base one.
    "finetune": {"max_steps": 2, "warmup_ratio": 0.0,
                 "cpu": {"max_seq_length": 64, "passages_per_query": 2, "epochs": 1, "max_steps": 2}},
    "export": {"fp16": False, "min_parity_texts": 10},
    # Two training steps may well lose on three questions: the gate is tested in test_user_questions.py; here the
    # block must be computed and the pipeline must go on.
    "eval": {"user_questions_allow_regression": True},
}
# The user's own questions over tests/data/tiny_docs (data/questions.jsonl is a DVC dep of eval).
TINY_QUESTIONS = [
    {"question": "How often should I descale the K2 in hard water?", "answer_file": "kettle-k2.md"},
    {"question": "What part fixes a toaster lever that will not stay down?", "answer_text": "electromagnet part TM-44"},
    {"question": "how long is the grinder motor warranty", "answer_text": "5-year warranty on the motor"},
]
PIPELINE = ["chunk", "sdg", "prep", "finetune", "eval", "export", "deploy_check", "report"]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def sh(args: list[str], cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    # The embedding store where a user's run keeps it (the workspace's cache/, git-ignored), never the developer's.
    env = dict(os.environ, DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(cwd),
               **{STORE_ENV: str(cwd / "cache" / "embeddings")})
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_docs_dir: Path) -> Path:
    """A scratch copy of the project that has run `dvc repro` once and committed the results."""
    root = tmp_path_factory.mktemp("pipeline") / "project"
    root.mkdir()
    for name in ("stages", "embedpipe"):
        shutil.copytree(REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_docs_dir, root / "docs")
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO_ROOT / ".gitignore", root / ".gitignore")
    (root / "data").mkdir()
    (root / "data" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in TINY_QUESTIONS))
    params = deep_merge(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), TINY_OVERRIDES)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "ci@example.com"], root)
    sh(["git", "config", "user.name", "CI"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "pipeline"], root)
    result = sh(["dvc", "repro"], root, timeout=900)
    (root / "repro1.log").write_text(result.stdout + result.stderr)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "first run"], root)
    return root


def test_every_stage_ran_and_wrote_its_outputs(project: Path):
    for path in ("data/chunks/corpus.jsonl", "data/sdg/qa.jsonl", "data/prep/train.jsonl",
                 "data/prep/eval/qrels/test.tsv", "models/finetuned/config.json", "models/onnx/model.onnx",
                 "metrics/report.md"):
        assert (project / path).exists(), path
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(PIPELINE) <= set(lock["stages"])
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert {"base", "finetuned", "delta"} <= set(evaluation)
    assert 0 <= evaluation["finetuned"]["ndcg@10"] <= 1
    mine = evaluation["user_questions"]
    assert mine["questions"] == 3 and {"base", "finetuned", "delta", "significance", "regression"} <= set(mine)
    assert json.loads((project / "metrics/serve_eval.json").read_text())["passed"] is True
    report = (project / "metrics/report.md").read_text()
    assert "ndcg@10" in report and "Deployed endpoint check" in report


def test_each_passage_is_encoded_at_most_once_per_model(project: Path):
    """From the encode log of the whole run: per model (fingerprint), every corpus passage encoded exactly once."""
    log = read_encode_log(project / "cache" / "embeddings")
    passages = len((project / "data/chunks/corpus.jsonl").read_text().splitlines())
    per_model: dict[str, int] = {}
    for r in log:
        if r["kind"] == "passage":
            per_model[r["fingerprint"]] = per_model.get(r["fingerprint"], 0) + r["encoded"]
    assert per_model and all(n <= passages for n in per_model.values()), (per_model, passages)
    by_stage_model = {(r["stage"], r["model"]) for r in log}
    assert {("prep", "all-MiniLM-L6-v2"), ("eval", "all-MiniLM-L6-v2"), ("eval", "models/finetuned"),
            ("export", "models/finetuned"), ("deploy_check", "models/finetuned")} <= by_stage_model
    # eval encodes the whole test corpus (= every passage) with both models: each exactly once in all. The corpus
    # encodes (sdg, prep, eval) run on the bulk encoder: ONNX Runtime on this CPU, its own fingerprint.
    bulk = {r["backend"] for r in log if r["stage"] in ("sdg", "prep", "eval")}
    assert bulk == {"onnx-fp32"}, bulk
    model_fp = {}
    for label in ("all-MiniLM-L6-v2", "models/finetuned"):
        fingerprints = {r["fingerprint"] for r in log if r["model"] == label and r["stage"] in ("sdg", "prep", "eval")}
        assert len(fingerprints) == 1, (label, fingerprints)  # loaded the same way everywhere: one store entry
        model_fp[label] = fingerprints.pop()
        assert per_model[model_fp[label]] == passages, label
    if json.loads((project / "metrics/train.json").read_text())["saved_model"] == "finetuned":
        assert model_fp["all-MiniLM-L6-v2"] != model_fp["models/finetuned"]  # new weights never hit the base's vectors
    # The references stay torch: export's parity encodes the torch vectors (eval's are ONNX ones, under another
    # fingerprint: no check compares ONNX with ONNX), and deploy_check's reference sample reads them back.
    checks = [r for r in log if r["stage"] in ("export", "deploy_check")]
    assert {r["backend"] for r in checks} == {"torch"} and model_fp["models/finetuned"] not in {
        r["fingerprint"] for r in checks}
    assert sum(r["encoded"] for r in checks if r["stage"] == "export" and r["kind"] == "passage") == passages
    assert all(r["encoded"] == 0 for r in checks if r["stage"] == "deploy_check"), checks
    serve = json.loads((project / "metrics/serve_eval.json").read_text())
    assert serve["check"] == "sample+full" and serve["vector_check"]["passed"]


def test_second_repro_does_nothing(project: Path):
    result = sh(["dvc", "repro"], project)
    assert "Running stage" not in result.stdout + result.stderr
    assert sh(["dvc", "status", "--json"], project).stdout.strip() in ("{}", "")


def test_changing_a_finetune_param_reruns_only_what_follows(project: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["learning_rate"] = 3e-5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        # --dry cannot know that finetune's new outputs will differ; --force-downstream lists what follows it.
        dry = sh(["dvc", "repro", "--dry", "--force-downstream"], project).stdout
        would_run = [s for s in PIPELINE if f"Running stage '{s}'" in dry]
        assert would_run == ["finetune", "eval", "export", "deploy_check", "report"]
    finally:
        sh(["git", "checkout", "params.yaml"], project)


def test_metrics_compare_across_commits(project: Path):
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], project).stdout)
    flat = json.dumps(shown)
    assert "ndcg@10" in flat and "finetuned" in flat
    diff = sh(["dvc", "metrics", "diff", "HEAD~1", "--md"], project).stdout
    assert "eval.json" in diff and "ndcg@10" in diff


def test_push_then_pull_into_a_fresh_clone(project: Path, tmp_path: Path):
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-f", "-d", "scratch", str(remote)], project)
    sh(["dvc", "push"], project)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    sh(["dvc", "remote", "add", "-f", "-d", "scratch", str(remote)], clone)
    sh(["dvc", "pull"], clone)
    for path in ("data/prep/train.jsonl", "data/chunks/corpus.jsonl", "models/onnx/model.onnx",
                 "models/finetuned/model.safetensors"):
        assert file_hash(clone / path) == file_hash(project / path), path
    assert sh(["dvc", "status"], clone).returncode == 0
