"""The user's own questions (eval.user_questions): resolution, clear errors, the eval block, the shipping gate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT, stage_env
from eval_helpers import make_tiny_beir, run_stage, scramble_word_embeddings, write_params

from embedpipe.core.io import FormatError, load_corpus, read_jsonl
from embedpipe.evaluation.user_questions import MAX_ANSWER_FILES, load_user_questions, shipping_verdict

K1 = ["d_5af4eb565814e637", "d_87591303b638f935", "d_05123711729adfb6", "d_bc16c5edb1ab974f",
      "d_b7d0d18e1cacb1ac", "d_68dbc4ab2fcaa352"]  # every passage of kettle-k1.md, in corpus order
QUESTIONS = [
    {"question": "How often do I descale the K1 when my water is hard?", "answer_file": "kettle-k1.md"},
    {"question": "which preset for green tea on the K2", "answer_text": "70 °C for green tea"},
    {"question": "What warranty does the grinder motor have?",
     "answer_text": "the G3 grinder  carries a\n5-year WARRANTY on the motor"},  # spacing and case differ
    {"question": "What part fixes a toaster lever that won't stay down?", "answer_file": "./toaster-t4.txt"},
]


def write_questions(path, rows, raw_lines=()):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tiny_corpus_path):
    return load_corpus(tiny_corpus_path)


# --- resolution ------------------------------------------------------------------------------------


def test_answer_file_and_answer_text_resolve_to_passages(tmp_path, corpus):
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS[:2], raw_lines=["", "   "])
    path.write_text(path.read_text() + json.dumps(QUESTIONS[2]) + "\n" + json.dumps(QUESTIONS[3]) + "\n")
    got = load_user_questions(path, corpus)
    assert list(got.qrels) == ["line1", "line2", "line5", "line6"]  # ids are line numbers; blank lines skipped
    assert got.lines == {"line1": 1, "line2": 2, "line5": 5, "line6": 6}
    assert list(got.qrels["line1"]) == K1  # answer_file: every passage of that file
    assert list(got.qrels["line2"]) == ["d_ec35e4ab29d224a2"]
    assert list(got.qrels["line5"]) == ["d_0e6d8c7c3c4a2cf7"]  # whitespace and case ignored
    assert set(got.qrels["line6"]) == {"d_266607f36bbc7efd", "d_17c0689237335238", "d_31220b33a3793ced"}
    assert got.queries["line2"]["text"] == QUESTIONS[1]["question"]


def test_a_snippet_in_several_passages_of_one_file_marks_them_all(tmp_path, corpus):
    path = write_questions(tmp_path / "q.jsonl", [{"question": "K1 kettle?", "answer_text": "on the K1"}])
    assert list(load_user_questions(path, corpus).qrels["line1"]) == ["d_b7d0d18e1cacb1ac"]  # twice in one passage
    path = write_questions(tmp_path / "q.jsonl", [{"question": "K2?", "answer_text": "the K2"}])
    assert len(load_user_questions(path, corpus).qrels["line1"]) >= 2  # several K2 passages, one file: fine


def test_an_empty_file_means_no_questions(tmp_path, corpus):
    (tmp_path / "q.jsonl").write_text("\n\n")
    assert load_user_questions(tmp_path / "q.jsonl", corpus).qrels == {}


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"question": "broken", "answer_file": ', ":3: not valid JSON"),
        ('["a list"]', ":3: expected a JSON object"),
        (json.dumps({"question": " ", "answer_file": "kettle-k1.md"}), ":3: 'question' is missing or empty"),
        (json.dumps({"question": "q?"}), ":3: give exactly one of 'answer_file'"),
        (json.dumps({"question": "q?", "answer_file": "kettle-k1.md", "answer_text": "K1"}), ":3: give exactly one"),
        (json.dumps({"question": "q?", "answer_file": "kettle-k3.md"}), ":3: answer_file 'kettle-k3.md' has no passage"),
        (json.dumps({"question": "q?", "answer_text": "the K9 espresso machine"}), ":3: answer_text 'the K9 espresso"),
        (json.dumps({"question": "q?", "answer_text": "then rinse three times"}), ":3: answer_text 'then rinse three times' is ambiguous"),
        (json.dumps({"question": "q?", "answer_text": "  "}), ":3: 'answer_text' must be a non-empty"),
    ],
    ids=["bad-json", "not-object", "empty-question", "no-answer", "both-answers", "missing-file", "no-match",
         "ambiguous", "empty-snippet"],
)
def test_bad_lines_are_errors_naming_the_line(tmp_path, corpus, line, expected):
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS[:2], raw_lines=[line])
    with pytest.raises(FormatError) as e:
        load_user_questions(path, corpus)
    assert f"{path}{expected}" in str(e.value)


def test_missing_answer_file_suggests_the_close_path_and_ambiguity_names_the_files(tmp_path, corpus):
    path = write_questions(tmp_path / "q.jsonl", [{"question": "q?", "answer_file": "kettle-k1.txt"}])
    with pytest.raises(FormatError, match="did you mean 'kettle-k1.md'"):
        load_user_questions(path, corpus)
    path = write_questions(tmp_path / "q.jsonl", [{"question": "q?", "answer_text": "thermal fuse that trips at"}])
    with pytest.raises(FormatError) as e:
        load_user_questions(path, corpus)
    assert "2 files (kettle-k1.md, kettle-k2.md)" in str(e.value) and f"at most {MAX_ANSWER_FILES}" in str(e.value)


# --- the shipping gate -----------------------------------------------------------------------------


def _eval_json(path, base, tuned, model="models/finetuned"):
    block = {"file": "data/questions.jsonl", "questions": 12, "finetuned_model": model,
             "base": {"ndcg@10": base}, "finetuned": {"ndcg@10": tuned},
             "delta": {"ndcg@10": round(tuned - base, 5)}, "regression": tuned < base}
    path.write_text(json.dumps({"user_questions": block}))
    return path


def test_shipping_verdict(tmp_path):
    worse = _eval_json(tmp_path / "worse.json", 0.6, 0.5)
    ok, why = shipping_verdict(worse, allow_regression=False, model="models/finetuned")
    assert not ok and "0.5000 vs the base model's 0.6000 (-0.1000)" in why
    assert "eval.user_questions_allow_regression: true" in why
    ok, why = shipping_verdict(worse, allow_regression=True)
    assert ok and "shipped anyway" in why
    assert shipping_verdict(worse, False, model="models/other")[0]  # judged another model: not applied
    assert shipping_verdict(_eval_json(tmp_path / "tie.json", 0.6, 0.6), False)[0]  # equal is not worse
    assert shipping_verdict(_eval_json(tmp_path / "up.json", 0.6, 0.7), False)[0]
    (tmp_path / "none.json").write_text(json.dumps({"base": {}}))
    assert shipping_verdict(tmp_path / "none.json", False) == (
        True, f"no user questions judged in {tmp_path / 'none.json'} "
              '(add some: README "Your own questions: the way to know")')
    assert shipping_verdict(tmp_path / "absent.json", False)[0]


def _stage(script, *args, cwd):
    return subprocess.run([sys.executable, str(REPO_ROOT / "stages" / script), *args], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True, timeout=120)


def test_export_and_deploy_check_refuse_a_model_worse_on_your_questions(tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _eval_json(tmp_path / "eval.json", 0.6, 0.5)
    proc = _stage("export.py", "--params", "params.yaml", "--eval-metrics", "eval.json", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "NOT EXPORTED" in proc.stderr and "user_questions_allow_regression" in proc.stderr
    assert not (tmp_path / "models").exists()  # refused before anything was written

    params["deploy"]["reference"] = "eval.json"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _stage("deploy_check.py", "--params", "params.yaml", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "NOT SHIPPED" in proc.stderr

    params["eval"]["user_questions_allow_regression"] = True  # told to ship anyway: deploy_check goes on
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _stage("deploy_check.py", "--params", "params.yaml", cwd=tmp_path)
    assert "NOT SHIPPED" not in proc.stderr and "shipped anyway" in proc.stdout + proc.stderr
    assert "models/onnx/embedpipe.json not found" in proc.stderr  # it went on, to the missing export


def test_report_stage_shows_your_questions(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    block = {"file": "data/questions.jsonl", "questions": 12, "base": {"ndcg@10": 0.5, "mrr@10": 0.4, "recall@10": 0.8},
             "finetuned": {"ndcg@10": 0.45, "mrr@10": 0.45, "recall@10": 0.8}, "delta": {"ndcg@10": -0.05},
             "significance": {"p_value": 0.3, "queries_better": 2, "queries_worse": 4, "queries_tied": 6},
             "regression": True}
    (metrics / "eval.json").write_text(json.dumps({"base": {"ndcg@10": 0.5}, "finetuned": {"ndcg@10": 0.6},
                                                   "user_questions": block}))
    proc = _stage("report.py", "--metrics-dir", "metrics", "--out", "report.md", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "report.md").read_text()
    assert "## Your own questions (`data/questions.jsonl`, 12 questions" in report
    assert "| ndcg@10 | 0.5000 | 0.4500 | -0.0500 | -10.0% |" in report and "**worse than the base model**" in report


# --- the eval stage --------------------------------------------------------------------------------


def test_eval_stage_without_a_questions_file_says_how_to_add_one(tmp_path, tiny_corpus_path):
    beir = make_tiny_beir(tmp_path / "beir", tiny_corpus_path)
    params = write_params(tmp_path / "params.yaml", user_questions=str(tmp_path / "none.jsonl"))
    proc = run_stage("--params", str(params), "--beir-dir", str(beir), "--models-only", "base",
                     "--out-dir", str(tmp_path / "out"), "--metrics", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr
    hint = [line for line in proc.stdout.splitlines() if "none.jsonl" in line]
    assert len(hint) == 1 and "Your own questions" in hint[0]
    assert "user_questions" not in json.loads((tmp_path / "eval.json").read_text())


def test_eval_stage_without_a_chunked_corpus_warns_and_goes_on(tmp_path, tiny_corpus_path):
    beir = make_tiny_beir(tmp_path / "beir", tiny_corpus_path)
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    proc = run_stage("--beir-dir", str(beir), "--questions", str(questions), "--corpus", str(tmp_path / "none.jsonl"),
                     "--models-only", "base", "--out-dir", str(tmp_path / "out"), "--metrics", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr
    assert "not judged: no chunked corpus" in " ".join(proc.stderr.split())
    assert "user_questions" not in json.loads((tmp_path / "eval.json").read_text())


def test_eval_stage_rejects_a_bad_questions_file_before_loading_models(tmp_path, tiny_corpus_path):
    beir = make_tiny_beir(tmp_path / "beir", tiny_corpus_path)
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS, raw_lines=['{"question": "x", "answer_file": "nope.md"}'])
    proc = run_stage("--beir-dir", str(beir), "--questions", str(questions), "--corpus", str(tiny_corpus_path),
                     "--models-only", "base", "--out-dir", str(tmp_path / "out"), "--metrics", str(tmp_path / "eval.json"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{questions}:5: answer_file 'nope.md'" in proc.stderr
    assert not (tmp_path / "eval.json").exists()


def test_eval_stage_reports_base_vs_finetuned_on_your_questions(tmp_path, tiny_corpus_path, minilm):
    """A "fine-tuned" model with scrambled word embeddings: worse on the user's questions, so flagged."""
    broken = tmp_path / "broken"
    minilm.save(str(broken))
    scramble_word_embeddings(broken)

    beir = make_tiny_beir(tmp_path / "beir", tiny_corpus_path)
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    params = write_params(tmp_path / "params.yaml", user_questions=str(questions))
    shutil.copy(tiny_corpus_path, tmp_path / "corpus.jsonl")
    metrics = tmp_path / "eval.json"
    proc = run_stage("--params", str(params), "--beir-dir", str(beir), "--finetuned", str(broken),
                     "--corpus", str(tmp_path / "corpus.jsonl"), "--out-dir", str(tmp_path / "out"),
                     "--metrics", str(metrics))
    assert proc.returncode == 0, proc.stderr  # eval measures; export and deploy_check refuse
    assert "WORSE ON YOUR QUESTIONS" in proc.stderr
    block = json.loads(metrics.read_text())["user_questions"]
    assert (block["file"], block["questions"], block["passages"]) == (str(questions), 4, 21)
    assert block["finetuned_model"] == str(broken)
    for label in ("base", "finetuned"):
        assert set(block[label]) == {"ndcg@10", "mrr@10", "recall@10"}
    assert block["base"]["recall@10"] > 0.9  # MiniLM finds these easy questions' answers in 21 passages
    assert block["regression"] is True and block["delta"]["ndcg@10"] < 0
    sig = block["significance"]
    assert sig["queries_better"] + sig["queries_worse"] + sig["queries_tied"] == 4 and sig["exact"]
    assert 0 < sig["p_value"] <= 1
    assert len(block["worse"]) == sig["queries_worse"] and len(block["better"]) == sig["queries_better"]
    assert all(r["change"] < 0 and r["finetuned"] < r["base"] for r in block["worse"])
    assert {r["line"] for r in block["worse"] + block["better"]} <= {1, 2, 3, 4}

    rows = read_jsonl(tmp_path / "out" / "user_questions.jsonl")
    assert [r["line"] for r in rows] == [1, 2, 3, 4] and rows[0]["relevant"] == sorted(K1)
    assert rows[1]["base"]["first_rank"] == 1  # "70 °C for green tea": base ranks its passage first
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Your own questions" in report and "export and deploy_check will not ship it" in report

    ok, why = shipping_verdict(metrics, allow_regression=False, model=str(broken))
    assert not ok and "on your 4 questions" in why
