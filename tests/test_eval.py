"""The eval stage with local models: hand-checked metrics, output formats, bad inputs, a full run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from eval_helpers import TINY_QUERIES, make_tiny_beir, run_stage, scramble_word_embeddings, write_params

from embedpipe.core.embed_store import STORE_ENV, read_encode_log
from embedpipe.core.io import load_beir
from embedpipe.evaluation.report import (
    compare_with_reference,
    comparison_line,
    evaluate_embedder,
    model_embedder,
    most_changed,
)

# --- metrics on a hand-made example -----------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    """Four passages with one-hot embeddings, so the ranking is known exactly; k=2 retrieved per query.

    qa: relevant {p1, p2}; scores p2 .9, p4 .8, p1 .1 -> retrieved [p2, p4]: one of two relevant found, at rank 1.
    qb: relevant {p3}; scores p1 .5, p2 .4 -> retrieved [p1, p2]: no relevant passage retrieved at all.
    """
    corpus = {f"p{i}": {"_id": f"p{i}", "title": "", "text": f"passage {i}"} for i in range(1, 5)}
    queries = {"qa": {"_id": "qa", "text": "query a"}, "qb": {"_id": "qb", "text": "query b"}}
    qrels = {"qa": {"p1": 1, "p2": 1}, "qb": {"p3": 1}}
    vectors = {
        "passage 1": [1, 0, 0, 0],
        "passage 2": [0, 1, 0, 0],
        "passage 3": [0, 0, 1, 0],
        "passage 4": [0, 0, 0, 1],
        "query a": [0.1, 0.9, 0.0, 0.8],
        "query b": [0.5, 0.4, 0.0, 0.1],
    }

    def embed(texts, kind):
        return np.asarray([vectors[t] for t in texts], dtype=np.float32)

    result = evaluate_embedder("toy", embed, corpus, queries, qrels, k=2)
    assert list(result.run["qa"]) == ["p2", "p4"]
    idcg2 = 1 + 1 / np.log2(3)  # two relevant passages, ideally at ranks 1 and 2
    qa = result.per_query["qa"]
    assert qa["ndcg@1"] == pytest.approx(1.0)
    assert qa["ndcg@5"] == pytest.approx(1 / idcg2, abs=1e-6)  # 0.61315
    assert qa["recall@1"] == pytest.approx(0.5)
    assert qa["recall@10"] == pytest.approx(0.5)
    assert qa["precision@1"] == pytest.approx(1.0)
    assert qa["precision@5"] == pytest.approx(1 / 5)  # trec_eval divides by k, not by what was retrieved
    assert qa["map@10"] == pytest.approx(0.5)  # (1/1) / 2 relevant
    assert qa["mrr@10"] == pytest.approx(1.0)
    assert all(v == 0.0 for v in result.per_query["qb"].values())
    assert result.metrics["ndcg@5"] == pytest.approx(round(0.5 / idcg2, 5))
    assert result.metrics["recall@1"] == pytest.approx(0.25)
    assert result.metrics["mrr@10"] == pytest.approx(0.5)
    assert result.dimension == 4


def test_comparison_line_has_the_recipe_format():
    assert comparison_line("ndcg@10", 0.55506, 0.61559) == "NDCG@10: 0.55506 → 0.61559 (+0.06053, +10.9%)"
    assert comparison_line("recall@5", 0.6, 0.5) == "Recall@5: 0.60000 → 0.50000 (-0.10000, -16.7%)"
    assert comparison_line("map@100", 0.0, 0.25) == "MAP@100: 0.00000 → 0.25000 (+0.25000, n/a)"
    assert comparison_line("precision@1", 0.5, 0.5).startswith("Precision@1: 0.50000 → 0.50000 (+0.00000, +0.0%)")
    assert comparison_line("mrr@10", 0.4, 0.5) == "MRR@10: 0.40000 → 0.50000 (+0.10000, +25.0%)"


def test_tolerances_are_looser_at_1():
    rows = compare_with_reference(
        {"ndcg@1": 0.52, "ndcg@10": 0.505, "recall@100": 0.88},
        {"ndcg@1": 0.50, "ndcg@10": 0.50, "recall@100": 0.90},
        tolerance_at_1=0.03,
        tolerance=0.01,
    )
    assert rows["ndcg@1"]["pass"] and rows["ndcg@10"]["pass"]
    assert not rows["recall@100"]["pass"] and rows["recall@100"]["delta"] == pytest.approx(-0.02)


def test_most_changed_orders_gains_and_losses():
    base = {"a": {"ndcg@10": 0.5}, "b": {"ndcg@10": 0.5}, "c": {"ndcg@10": 0.5}, "d": {"ndcg@10": 0.5}}
    tuned = {"a": {"ndcg@10": 0.9}, "b": {"ndcg@10": 0.6}, "c": {"ndcg@10": 0.1}, "d": {"ndcg@10": 0.5}}
    improved, regressed = most_changed(base, tuned, n=10)
    assert [q for q, _ in improved] == ["a", "b"]
    assert [q for q, _ in regressed] == ["c"]


# --- bad BEIR folders: clear message naming file and line, no traceback ----------------------------


@pytest.fixture
def tiny_beir(tmp_path, tiny_corpus_path):
    return make_tiny_beir(tmp_path / "beir", tiny_corpus_path)


def _break_line(path, line_no, new_line):
    lines = path.read_text().splitlines()
    lines[line_no - 1] = new_line
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: (d / "queries.jsonl").unlink(), "queries.jsonl: missing"),
        (
            lambda d: _break_line(d / "qrels" / "test.tsv", 3, "q2\td_does_not_exist\t1"),
            "test.tsv:3: unknown corpus id",
        ),
        (
            lambda d: _break_line(d / "qrels" / "test.tsv", 2, "q99\td_4f05ef5b065f63c5\t1"),
            "test.tsv:2: unknown query id",
        ),
        (lambda d: _break_line(d / "queries.jsonl", 2, json.dumps({"_id": "q2", "text": "  "})), "queries.jsonl:2"),
        (lambda d: _break_line(d / "corpus.jsonl", 4, "{not json"), "corpus.jsonl:4: not valid JSON"),
    ],
    ids=["missing-file", "unknown-corpus-id", "unknown-query-id", "empty-query", "bad-json"],
)
def test_bad_beir_folder_is_a_clear_error(tiny_beir, tmp_path, damage, expected):
    damage(tiny_beir)
    proc = run_stage("--beir-dir", str(tiny_beir), "--models-only", "base", "--out-dir", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert str(tiny_beir) in proc.stderr


def test_missing_finetuned_model_is_a_clear_error(tiny_beir, tmp_path):
    proc = run_stage(
        "--beir-dir", str(tiny_beir), "--finetuned", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o")
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no fine-tuned model" in proc.stderr and "--models-only base" in proc.stderr


# --- a full default run on a tiny BEIR folder (MiniLM as base and "fine-tuned") ---------------------


@pytest.fixture(scope="module")
def finetuned_copy(tmp_path_factory, minilm):
    path = tmp_path_factory.mktemp("finetuned") / "model"
    minilm.save(str(path))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_corpus_path, finetuned_copy):
    work = tmp_path_factory.mktemp("evalrun")
    beir = make_tiny_beir(work / "beir", tiny_corpus_path)
    params = write_params(work / "params.yaml")
    metrics = work / "metrics" / "eval.json"
    proc = run_stage(
        "--params", str(params), "--beir-dir", str(beir), "--finetuned", str(finetuned_copy),
        "--out-dir", str(work / "out"), "--metrics", str(metrics), env={STORE_ENV: str(work / "store")},
    )  # fmt: skip
    return proc, work, beir, metrics


def test_eval_reads_its_vectors_back_from_the_store(full_run, finetuned_copy):
    """A second eval (same models, same test set) encodes nothing; a saved copy of the base model is the same
    model (same weights and tokenizer), so even the first run encoded the test set only once."""
    proc, work, beir, metrics_path = full_run
    assert proc.returncode == 0, proc.stderr
    first = read_encode_log(work / "store")
    assert {(r["model"], r["kind"]) for r in first} == {
        (m, k) for m in ("all-MiniLM-L6-v2", str(finetuned_copy)) for k in ("passage", "query")
    }
    assert len({r["fingerprint"] for r in first}) == 1
    passages = sum(r["encoded"] for r in first if r["kind"] == "passage")
    assert passages == 21 and sum(r["encoded"] for r in first if r["kind"] == "query") == len(TINY_QUERIES)
    assert "finetuned texts encoded" in proc.stdout + proc.stderr
    again = run_stage(
        "--params", str(work / "params.yaml"), "--beir-dir", str(beir), "--finetuned", str(finetuned_copy),
        "--out-dir", str(work / "out2"), "--metrics", str(work / "eval2.json"), env={STORE_ENV: str(work / "store")},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    second = read_encode_log(work / "store")[len(first):]
    assert len(second) == 4 and all(r["encoded"] == 0 for r in second)
    assert json.loads((work / "eval2.json").read_text()) == json.loads(metrics_path.read_text())


def test_full_run_writes_every_output(full_run, minilm):
    proc, work, beir, metrics_path = full_run
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(metrics_path.read_text())
    names = {f"{m}@{k}" for m in ("ndcg", "recall", "precision", "map") for k in (1, 5, 10, 100)} | {"mrr@10"}
    for block in ("base", "finetuned", "delta"):
        assert set(metrics[block]) == names
        assert all(isinstance(v, float) for v in metrics[block].values())
    # Same model twice: identical numbers, no regression.
    assert metrics["base"] == metrics["finetuned"]
    assert set(metrics["delta"].values()) == {0.0}
    assert metrics["regression"] is False
    sig = metrics["significance"]  # same model: zero gain, a zero-width interval, every query tied
    assert (sig["mean_gain"], sig["ci95"], sig["p_value"]) == (0.0, [0.0, 0.0], 1.0)
    assert sig["queries"] == sig["queries_tied"] == len(TINY_QUERIES)
    assert (sig["llm_written"], sig["inverse_cloze"]) == (len(TINY_QUERIES), 0)  # all typed as LLM questions
    assert metrics["queries"] == len(TINY_QUERIES) and metrics["passages"] == 21 and metrics["dimension"] == 384
    assert metrics["by_query_type"]["multi_hop"]["queries"] == 2
    assert set(metrics["by_hop_count"]) == {"1", "2"}

    # The stage's numbers are what the library computes in process with the same model.
    corpus, queries, qrels = load_beir(beir)
    local = evaluate_embedder("x", model_embedder(minilm, "", "", 32, False), corpus, queries, qrels)
    assert local.metrics == pytest.approx(metrics["base"], abs=1e-4)
    assert local.metrics["recall@100"] == 1.0  # 21 passages, top 100: everything is retrieved

    ndcg = metrics["base"]["ndcg@10"]
    assert f"NDCG@10: {ndcg:.5f} → {ndcg:.5f} (+0.00000, +0.0%)" in proc.stdout
    assert "Recall@100: 1.00000 → 1.00000" in proc.stdout

    out = work / "out"
    run_lines = (out / "run_base.trec").read_text().splitlines()
    assert len(run_lines) == len(TINY_QUERIES) * 21
    qid, q0, doc, rank, score, tag = run_lines[0].split()
    assert (q0, rank, tag) == ("Q0", "1", "base") and doc in corpus and float(score) <= 1.0001
    assert (out / "run_finetuned.trec").is_file()
    per_query = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    assert [r["query_id"] for r in per_query] == [q[0] for q in TINY_QUERIES]
    assert per_query[5]["query_type"] == "multi_hop" and per_query[5]["hop_count"] == "2"
    report = (out / "report.md").read_text()
    assert "## By query_type" in report and "## By hop_count" in report and "Most improved queries" in report
    assert (out / "eval_plot.png").read_bytes()[:4] == b"\x89PNG"
    plot_csv = (work / "metrics" / "eval_plot.csv").read_text().splitlines()
    assert plot_csv[0] == "metric,value" and plot_csv[1].startswith("NDCG@1 base,") and len(plot_csv) == 1 + 2 * 17


def test_regression_is_alerted_and_can_fail_the_run(tmp_path, tiny_corpus_path, finetuned_copy):
    """A "fine-tuned" model with scrambled word embeddings is much worse than base."""
    broken = tmp_path / "broken"
    shutil.copytree(finetuned_copy, broken)
    scramble_word_embeddings(broken)

    beir = make_tiny_beir(tmp_path / "beir", tiny_corpus_path)
    params = write_params(tmp_path / "params.yaml", fail_on_regression=True, report_queries=3)
    metrics = tmp_path / "eval.json"
    proc = run_stage(
        "--params", str(params), "--beir-dir", str(beir), "--finetuned", str(broken),
        "--out-dir", str(tmp_path / "out"), "--metrics", str(metrics),
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "REGRESSION" in proc.stderr
    result = json.loads(metrics.read_text())
    assert result["regression"] is True and result["delta"]["ndcg@10"] < 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Most regressed queries" in report and "**finetuned** top 5" in report
