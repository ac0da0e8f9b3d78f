"""prep: margin filter, positives never mined as negatives, leak-free split, determinism, BEIR test set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import stage_env

from embedpipe.core.embed_store import STORE_ENV, read_encode_log
from embedpipe.core.io import load_beir, load_corpus, read_json, read_jsonl
from embedpipe.prep.mining import clean_questions, margin_ceiling, mine, split_questions

QA = Path(__file__).parent / "data" / "tiny_qa.jsonl"


def _embed(scores: list[float]) -> np.ndarray:
    """Corpus rows whose dot product with the query [1, 0, ...] is exactly the given score."""
    rows = np.zeros((len(scores), 4), dtype=np.float32)
    rows[:, 0] = scores
    return rows


def test_margin_ceiling_positive_and_negative_scores():
    rel = margin_ceiling(np.array([0.8, -0.2, 0.0]), "relative", 0.05)
    np.testing.assert_allclose(rel, [0.76, -0.21, 0.0], rtol=1e-6)
    assert (rel <= np.array([0.8, -0.2, 0.0])).all()  # never above the positive, even for negative scores
    np.testing.assert_allclose(margin_ceiling(np.array([0.8, -0.2]), "absolute", absolute_margin=0.1), [0.7, -0.3])


def test_mine_margin_filter_hand_made_scores():
    query = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32)
    #               pos   above  below  low   neg        pos(-)  above(-) below(-)
    corpus = _embed([0.5, 0.49, 0.47, 0.3, -0.1, -0.2, -0.205, -0.25])
    mined = mine(query, corpus, [[0], [5]], k=3, relative_margin=0.05)
    # query 0: ceiling 0.475 -> 0.49 removed; 0.47, 0.3, -0.1 kept (best first)
    assert mined.neg_rows[0] == [2, 3, 4]
    np.testing.assert_allclose(mined.neg_scores[0], [0.47, 0.3, -0.1], rtol=1e-6)
    # query 1: positive -0.2 -> ceiling -0.21: everything above it (incl. 0.5 .. -0.205) removed; -0.25 kept
    assert mined.neg_rows[1] == [7]
    assert mined.pos_scores == [[pytest.approx(0.5)], [pytest.approx(-0.2)]]
    assert mined.short == 1  # query 1 has fewer than k negatives and is kept anyway
    assert mined.removed_by_margin == 1 + 6
    assert mined.candidates == 2 * 7


def test_sibling_positives_never_negatives():
    query = np.array([[1, 0, 0, 0]], dtype=np.float32)
    corpus = _embed([0.9, 0.2, 0.85, 0.1, 0.05])  # a 2-hop question: rows 0 and 1 are both positives
    mined = mine(query, corpus, [[0, 1]], k=5, relative_margin=0.0)
    assert set(mined.neg_rows[0]).isdisjoint({0, 1})
    # the ceiling comes from the LOWEST positive (0.2): 0.85 is above it and is not a negative either
    assert mined.neg_rows[0] == [3, 4]


def _qa(qid: str, segments: list[str]) -> dict:
    return {"id": qid, "question": f"question {qid}?", "segment_ids": segments}


def test_split_single_document_falls_back_and_says_so():
    corpus = {f"p{i}": {"_id": f"p{i}", "text": "t", "doc": "only.md"} for i in range(10)}
    qs = [_qa(f"q{i}", [f"p{i}"]) for i in range(10)]
    split = split_questions(qs, corpus, seed=1)
    assert split.group_by == "passage" and "document -> passage" in split.fallback
    test_pos = {p for q in split.test for p in q["segment_ids"]}
    assert split.held_out == test_pos
    assert all(set(q["segment_ids"]).isdisjoint(test_pos) for q in split.train + split.val)


def test_split_drops_questions_that_straddle_when_documents_form_one_chain():
    corpus = {f"p{i}": {"_id": f"p{i}", "text": "t", "doc": f"d{i}.md"} for i in range(10)}
    qs = [_qa(f"q{i}", [f"p{i}"]) for i in range(10)] + [_qa(f"m{i}", [f"p{i}", f"p{i + 1}"]) for i in range(9)]
    split = split_questions(qs, corpus, seed=3, val_min=0, val_fraction=0)
    assert split.group_by == "document" and split.fallback is None
    assert split.dropped_cross_split > 0
    assert len(split.train) + len(split.test) + split.dropped_cross_split == len(qs)
    test_docs = {corpus[p]["doc"] for q in split.test for p in q["segment_ids"]}
    train_docs = {corpus[p]["doc"] for q in split.train for p in q["segment_ids"]}
    assert test_docs and train_docs and test_docs.isdisjoint(train_docs)


def test_split_test_min_enlarges_a_small_test_set_up_to_half():
    corpus = {f"p{i}": {"_id": f"p{i}", "text": "t", "doc": f"d{i}.md"} for i in range(100)}
    qs = [_qa(f"q{i}", [f"p{i}"]) for i in range(100)]
    assert len(split_questions(qs, corpus, test_fraction=0.2).test) == 20
    assert len(split_questions(qs, corpus, test_fraction=0.2, test_min=30).test) == 30
    assert len(split_questions(qs, corpus, test_fraction=0.2, test_min=80).test) == 50  # never more than half
    assert len(split_questions(qs, corpus, test_fraction=0.4, test_min=30).test) == 40  # the fraction is a floor too


def test_split_test_min_is_reached_when_whole_documents_overshoot_or_undershoot():
    # 60 documents of 7 questions each: 150 is not a sum of 7s, the closest pick (147) falls short.
    corpus = {f"p{i}": {"_id": f"p{i}", "text": "t", "doc": f"d{i // 7}.md"} for i in range(420)}
    qs = [_qa(f"q{i}", [f"p{i}"]) for i in range(420)]
    for seed in range(5):
        split = split_questions(qs, corpus, test_fraction=0.2, test_min=150, seed=seed)
        assert 150 <= len(split.test) < 150 + 7
        test_docs = {corpus[p]["doc"] for q in split.test for p in q["segment_ids"]}
        train_docs = {corpus[p]["doc"] for q in split.train + split.val for p in q["segment_ids"]}
        assert test_docs.isdisjoint(train_docs)


def test_clean_questions_drops_unknown_segments(tiny_corpus_path):
    corpus = load_corpus(tiny_corpus_path)
    kept, dropped = clean_questions([_qa("a", ["nope"]), _qa("b", []), _qa("c", [next(iter(corpus))])], corpus)
    assert [q["id"] for q in kept] == ["c"]
    assert dropped == {"segment id not in corpus": 1, "no segment_ids": 1}


# --- the stage end to end, as a subprocess ----------------------------------------------------


def _run_stage(repo_root: Path, tmp: Path, corpus: Path, qa: Path, store: Path, extra: str = "") -> tuple[Path, Path]:
    params = tmp / "params.yaml"
    params.write_text(
        "model: {base_model: all-MiniLM-L6-v2, query_prompt: '', passage_prompt: '', max_seq_length: 128,"
        " device: cpu}\n"
        f"prep: {{seed: 7, test_fraction: 0.2, group_by: document, val_fraction: 0.1, val_min: 3, num_negatives: 5,"
        f" margin_mode: relative, relative_margin: 0.05{extra}}}\n"
    )
    out, metrics = tmp / "prep", tmp / "prep.json"
    proc = subprocess.run(
        [sys.executable, "stages/prep.py", "--params", str(params), "--corpus", str(corpus), "--qa", str(qa),
         "--out", str(out), "--metrics", str(metrics)],
        cwd=repo_root, env={**stage_env(), STORE_ENV: str(store)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, metrics


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prep_store")


@pytest.fixture(scope="module")
def two_runs(repo_root, tiny_corpus_path, tmp_path_factory, store):
    """Two runs in different folders sharing one embedding store: the second one reads every vector back."""
    a = _run_stage(repo_root, tmp_path_factory.mktemp("a"), tiny_corpus_path, QA, store)
    b = _run_stage(repo_root, tmp_path_factory.mktemp("b"), tiny_corpus_path, QA, store)
    return a, b


def test_same_seed_byte_identical(two_runs):
    (out_a, _), (out_b, _) = two_runs
    files = sorted(p.relative_to(out_a) for p in out_a.rglob("*") if p.is_file())
    assert len(files) == 6
    for rel in files:
        assert (out_a / rel).read_bytes() == (out_b / rel).read_bytes(), rel


def test_second_run_reads_every_vector_from_the_store(two_runs, store, tiny_corpus_path):
    (_, metrics_a), _ = two_runs
    log = read_encode_log(store)
    assert [(r["stage"], r["kind"]) for r in log] == [("prep", "passage"), ("prep", "query")] * 2
    first, second = log[:2], log[2:]
    m = read_json(metrics_a)
    mined_passages = m["passages"] - m["passages_excluded_from_mining"]
    assert first[0]["requested"] == first[0]["encoded"] == mined_passages  # unique passages: each encoded once
    assert first[1]["encoded"] > 0 and first[1]["model"] == "all-MiniLM-L6-v2"
    assert [r["requested"] for r in second] == [r["requested"] for r in first]
    assert [r["encoded"] for r in second] == [0, 0]  # and test_same_seed_byte_identical: same outputs
    assert len({r["fingerprint"] for r in log}) == 1


def test_end_to_end_leak_free_and_formats(two_runs, tiny_corpus_path):
    (out, metrics_path), _ = two_runs
    corpus = load_corpus(tiny_corpus_path)
    qa = {q["id"]: q for q in read_jsonl(QA)}
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    eval_corpus, queries, qrels = load_beir(out / "eval")
    m = read_json(metrics_path)

    # qrels are exactly the test questions' positives; eval corpus is every passage
    assert set(eval_corpus) == set(corpus)
    assert qrels == {qid: {p: 1 for p in qa[qid]["segment_ids"]} for qid in queries}
    assert all(queries[qid]["text"] == qa[qid]["question"] for qid in queries)
    assert {"query_type", "hop_count", "question_complexity"} <= set(next(iter(queries.values()))["metadata"])

    # no test-document passage anywhere in train/val (positive or negative), nor in train_corpus
    test_docs = {corpus[p]["doc"] for q in qrels.values() for p in q}
    seen = {d["id"] for e in train + val for d in e["pos_doc"] + e["neg_doc"]}
    assert seen and all(corpus[p]["doc"] not in test_docs for p in seen)
    train_corpus = load_corpus(out / "train_corpus.jsonl")
    assert all(r["doc"] not in test_docs for r in train_corpus.values())
    assert m["passages_excluded_from_mining"] == len(corpus) - len(train_corpus)
    assert {e["source_id"] for e in train + val}.isdisjoint(queries)

    # unrolled: one example per (question, positive), ids <qaid>_<i>, same negatives, no positive as negative
    by_source: dict[str, list[dict]] = {}
    for e in train + val:
        by_source.setdefault(e["source_id"], []).append(e)
        negs = [d["id"] for d in e["neg_doc"]]
        assert set(negs).isdisjoint(qa[e["source_id"]]["segment_ids"])
        assert 1 <= len(negs) <= 5 and len(set(negs)) == len(negs)
        scores = [d["score"] for d in e["neg_doc"]]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] <= e["pos_doc"][0]["score"]
    assert any(len(v) == 2 for v in by_source.values()), "a 2-hop training question must unroll into 2 examples"
    for source, examples in by_source.items():
        assert [e["question_id"] for e in examples] == [f"{source}_{i}" for i in range(len(examples))]
        assert [e["pos_doc"][0]["id"] for e in examples] == qa[source]["segment_ids"]
        assert all(e["neg_doc"] == examples[0]["neg_doc"] for e in examples)
    assert m["examples"] == {"train": len(train), "val": len(val), "test_qrels": sum(map(len, qrels.values()))}
    assert m["questions"]["val"] >= 3 and m["group_by"] == "document"
    assert m["positive_score_mean"] > m["negative_score_mean"]


def test_user_errors_are_clean(repo_root, tmp_path, tiny_corpus_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"id": "x"\n')
    params = tmp_path / "params.yaml"
    params.write_text("model: {base_model: all-MiniLM-L6-v2}\nprep: {group_by: everything}\n")
    for args, expect in [
        (["--qa", str(bad)], "not valid JSON"),
        (["--qa", str(QA), "--params", str(params)], "'prep.group_by': Input should be"),
    ]:
        proc = subprocess.run([sys.executable, "stages/prep.py", "--corpus", str(tiny_corpus_path), *args],
                              cwd=repo_root, env=stage_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and expect in proc.stderr and "Traceback" not in proc.stderr
