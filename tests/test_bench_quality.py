"""bench/bench_quality.py end to end on a tiny docs/BEIR pair, and the sign-flip test against hand counts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, stage_env

from embedpipe.core.io import load_corpus, write_beir
from embedpipe.evaluation.significance import paired_bootstrap_ci, sign_flip_test

# Hand-written questions over tests/data/tiny_corpus.jsonl (the tiny docs chunked at 48 tokens): the human
# benchmark of this test. Never used for training: the bench trains on tiny_docs only.
TINY_QUERIES = {
    "q1": ("How many grind settings does the G3 have?", "d_4f05ef5b065f63c5"),
    "q2": ("How often should I clean the grinder burrs?", "d_abf5c51a5fcfa772"),
    "q3": ("What power is the K1 kettle rated at?", "d_5af4eb565814e637"),
    "q4": ("At what temperature does the K2 thermal fuse trip?", "d_9aa1c6bca1889f4b"),
    "q5": ("Which temperature preset is for green tea?", "d_ec35e4ab29d224a2"),
    "q6": ("Why does the toaster lever not stay down?", "d_31220b33a3793ced"),
    "q7": ("How long is the warranty on the toaster?", "d_5d8f853b8c4d1239"),
    "q8": ("What do I need to make a warranty claim?", "d_1d53214a4965d6d3"),
}
FAST = [
    "chunk.target_tokens=48", "chunk.overlap_tokens=0", "chunk.min_tokens=16",
    "sdg.llm.enabled=false", "prep.val_min=3",
    "finetune.cpu.max_steps=2", "finetune.cpu.max_seq_length=64", "finetune.cpu.passages_per_query=2",
    "model.max_seq_length=64",
]  # fmt: skip


def make_bench(root: Path, tiny_docs_dir: Path, tiny_corpus_path: Path) -> Path:
    """BENCH/docs (a copy of tiny_docs) + BENCH/beir (tiny corpus, hand-written queries and qrels)."""
    bench = root / "tinybench"
    (bench / "docs").mkdir(parents=True)
    for path in tiny_docs_dir.iterdir():
        (bench / "docs" / path.name).write_bytes(path.read_bytes())
    corpus = load_corpus(tiny_corpus_path)
    queries = [{"_id": qid, "text": text} for qid, (text, _) in TINY_QUERIES.items()]
    qrels = {qid: {pid: 1} for qid, (_, pid) in TINY_QUERIES.items()}
    assert all(pid in corpus for pid in (p for _, p in TINY_QUERIES.values()))
    write_beir(bench / "beir", list(corpus.values()), queries, qrels)
    return bench


def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / script), *args],
        cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def run_bench(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_script("bench_quality.py", args, cwd)


def test_bench_end_to_end_on_a_tiny_pair(tmp_path: Path, tiny_docs_dir: Path, tiny_corpus_path: Path):
    bench = make_bench(tmp_path, tiny_docs_dir, tiny_corpus_path)
    out = tmp_path / "results" / "quality.json"
    work = tmp_path / "work"
    args = ["--bench", str(bench), "--seeds", "1", "--workdir", str(work), "--keep", "--out", str(out)]
    for override in FAST:
        args += ["-S", override]
    proc = run_bench(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    result = json.loads(out.read_text())
    assert result["benchmark"] == "tinybench"
    assert result["seeds"] == [0]
    assert result["queries"] == len(TINY_QUERIES)
    assert result["params"]["finetune.cpu.max_steps"] == 2 and result["params"]["sdg.llm.enabled"] is False
    base = result["base"]["ndcg@10"]
    assert 0 < base <= 1
    assert len(result["per_seed"]) == 1
    for k, row in enumerate(result["per_seed"]):
        assert row["seed"] == k and row["base_ndcg@10"] == base
        assert 0 < row["finetuned_ndcg@10"] <= 1
        assert row["gain_pct"] == pytest.approx((row["finetuned_ndcg@10"] - base) / base * 100, abs=1e-3)
        assert set(row["finetuned"]) == {"ndcg@10", "recall@10", "recall@100", "mrr@10"}
        assert 0 <= row["p_value"] <= 1
        assert row["queries_better"] + row["queries_worse"] + row["queries_tied"] == len(TINY_QUERIES)
        assert 1 <= row["steps"] <= 2 and row["saved_model"] in ("base", "interpolated")  # CPU profile: alpha 0.5 fixed
        assert set(row["stage_times_s"]) == {"sdg", "prep", "finetune", "eval"}
        # seed 0 is the params file's own seeds (a seed k adds k to all three)
        own = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        assert row["seed_values"] == {f"{s}.seed": own[s]["seed"] for s in ("sdg", "prep", "finetune")}
        assert row["val_gain_pct"] is not None
    gains = [row["gain_pct"] for row in result["per_seed"]]
    assert result["mean_gain_pct"] == pytest.approx(np.mean(gains), abs=1e-2)
    assert result["worst_seed_gain_pct"] == pytest.approx(min(gains), abs=1e-3)
    low, high = result["gain_pct_ci95"]
    assert low - 1e-2 <= result["mean_gain_pct"] <= high + 1e-2
    assert 0 < result["p_value"] <= 1 and result["p_value_exact"] is True  # 8 queries: exact enumeration
    assert result["wall_time_s"] > 0 and result["stage_times_s"]["chunk"] > 0
    assert len(result["stage_times_s"]["finetune"]) == 1

    # Everything lives in the workspace (the repo's data/ and models/ are never written); every log is kept.
    assert (work / "seed0" / "model" / "config.json").is_file() and (work / "seed0" / "sdg" / "qa.jsonl").is_file()
    assert {p.name for p in (work / "logs").iterdir()} >= {"chunk.log", "eval_base.log", "seed0-finetune.log"}

    table = out.with_suffix(".md").read_text()
    assert table in proc.stdout
    assert "| - | base |" in table and "| **mean** | fine-tuned |" in table
    assert f"{base:.4f}" in table and "sign-flip" in table and "| finetune |" in table

    # Per-query scores and input hashes, for bench/compare_quality.py; a result compared with itself: no difference.
    assert set(result["base_per_query_ndcg@10"]) == set(TINY_QUERIES)
    row = result["per_seed"][0]
    assert set(row["per_query_ndcg@10"]) == set(TINY_QUERIES) and len(row["inputs_sha256"]["qa"]) == 64
    compare_out = tmp_path / "compare.md"
    same = run_script("compare_quality.py", [str(out), str(out), "--out", str(compare_out)], tmp_path)
    assert same.returncode == 0, same.stderr
    compared = json.loads(compare_out.with_suffix(".json").read_text())
    assert compared["mean_difference_points"] == 0 and compared["p_value"] == 1
    assert compared["per_seed"][0]["same_llm_questions"] and compared["per_seed"][0]["same_training_set"]

    # A rerun on the same workspace reuses every finished step and gives the same numbers.
    again = run_bench(args, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("reused from an earlier run") == 6
    rerun = json.loads(out.read_text())
    assert rerun["per_seed"] == result["per_seed"]
    # Reused steps count with their original time (the first run's time outside the steps is not repeated).
    step_times = [t for t in result["stage_times_s"].values() for t in (t if isinstance(t, list) else [t])]
    assert rerun["wall_time_s"] >= sum(step_times) - 0.5

    # The WiSE-FT alpha sweep reweights the kept seed exactly: its saved alpha gives back the bench's own score.
    sweep_out = tmp_path / "sweep.json"
    sweep = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "wise_alpha_sweep.py"), "--workdir", str(work),
         "--beir", str(bench / "beir"), "--alphas", "0.5,1.0", "--out", str(sweep_out)],
        cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    swept = json.loads(sweep_out.read_text())
    assert swept["base_ndcg@10"] == pytest.approx(base, abs=1e-4)
    row = result["per_seed"][0]
    if row["saved_model"] == "interpolated":
        assert set(swept["ndcg@10"]["seed0"]) == {"0.5", "1"}
        assert swept["ndcg@10"]["seed0"]["0.5"] == pytest.approx(row["finetuned_ndcg@10"], abs=1e-4)
    else:  # the regression guard kept the base model: nothing to reweight, and the sweep says so
        assert swept["ndcg@10"] == {} and "nothing to reweight" in sweep.stderr


def test_bad_inputs_fail_with_a_clear_message(tmp_path: Path, tiny_docs_dir: Path, tiny_corpus_path: Path):
    missing = run_bench(["--bench", str(tmp_path / "nope")], tmp_path)
    assert missing.returncode != 0 and "folder not found" in missing.stderr

    bench = make_bench(tmp_path, tiny_docs_dir, tiny_corpus_path)
    (bench / "beir" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td_unknown\t1\n")
    bad = run_bench(["--bench", str(bench)], tmp_path)
    assert bad.returncode != 0 and "unknown corpus id 'd_unknown'" in bad.stderr

    (bench / "beir" / "queries.jsonl").unlink()
    gone = run_bench(["--bench", str(bench)], tmp_path)
    assert gone.returncode != 0 and "queries.jsonl: missing" in gone.stderr

    override = run_bench(["--docs", str(bench / "docs"), "--beir", str(tmp_path), "-S", "nokey"], tmp_path)
    assert override.returncode != 0 and "BEIR folder" in override.stderr


def load_bench_module():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO_ROOT / "bench" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overrides_and_seeds_are_applied_like_dvc_exp_run():
    bq = load_bench_module()
    params = {"finetune": {"max_steps": None, "seed": 42, "cpu": {"epochs": 1}}, "sdg": {"seed": 13}, "prep": {}}
    for text in ("finetune.max_steps=20", "finetune.cpu.epochs=2", "sdg.llm.enabled=false", "finetune.lr=[1, 2]"):
        bq.set_dotted(params, *bq.parse_override(text))
    assert params["finetune"]["max_steps"] == 20 and params["finetune"]["cpu"]["epochs"] == 2
    assert params["sdg"]["llm"] == {"enabled": False}  # a section params.yaml leaves to the schema is created
    assert params["finetune"]["lr"] == [1, 2]  # YAML-parsed values
    with pytest.raises(bq.BenchError, match="'finetune.seed' is a value, not a section"):
        bq.set_dotted(params, *bq.parse_override("finetune.seed.x=1"))
    with pytest.raises(bq.BenchError, match="'finetune.lr' is not a known key"):  # the schema catches the typo
        bq.check_params(params)
    for bad in ("nokey", "=3", "a..b=1", "a.b=[unclosed"):
        with pytest.raises(bq.BenchError):
            bq.parse_override(bad)
    seeded, values = bq.seeded_params(params, 2)
    assert values == {"sdg.seed": 15, "prep.seed": 2, "finetune.seed": 44}  # absent prep.seed counts from 0
    assert seeded["finetune"]["seed"] == 44 and params["finetune"]["seed"] == 42  # the original is untouched


def test_a_changed_document_invalidates_finished_steps(tmp_path: Path):
    bq = load_bench_module()
    (tmp_path / "a.md").write_text("# A\n\nText.\n")
    before = bq.fingerprint([tmp_path])
    assert bq.fingerprint([tmp_path]) == before
    (tmp_path / "a.md").write_text("# A\n\nOther text.\n")
    assert bq.fingerprint([tmp_path]) != before


def test_sign_flip_matches_hand_counts():
    # All n differences positive: only "all +" and "all -" reach |sum| >= observed -> p = 2 / 2^n exactly.
    for n in (1, 3, 5, 10):
        r = sign_flip_test(np.linspace(0.1, 0.5, n))
        assert r.exact and r.p_value == pytest.approx(2 / 2**n) and (r.better, r.worse, r.tied) == (n, 0, 0)
    # Zeros do not change the p-value (flipping a zero changes nothing) but are counted as ties.
    r = sign_flip_test([0.2, 0.0, 0.3, 0.0])
    assert r.p_value == pytest.approx(2 / 4) and r.tied == 2 and r.mean_diff == pytest.approx(0.125)
    # d = (1, 2, -3): sign sums are ±0, ±2, ±4, ±6 twice each -> |sum| >= 0 for all 8 -> p = 1.
    assert sign_flip_test([1.0, 2.0, -3.0]).p_value == pytest.approx(1.0)
    # d = (3, 1, 1): sums 5, 3, 3, 1 and their negatives -> |sum| >= 5 in 2 of 8 patterns.
    assert sign_flip_test([3.0, 1.0, 1.0]).p_value == pytest.approx(2 / 8)
    # d = (3, 1, -1): observed |3| -> patterns with |sum| >= 3: ±5, ±3, ±3 -> 6 of 8.
    assert sign_flip_test([3.0, 1.0, -1.0]).p_value == pytest.approx(6 / 8)
    assert sign_flip_test([0.0, 0.0]).p_value == 1.0
    with pytest.raises(ValueError):
        sign_flip_test([])


def test_sign_flip_monte_carlo_agrees_with_the_exact_value():
    # 40 identical positive differences: exact p = 2 / 2^40, far below 1 / resamples -> the floor (1 / (B + 1)).
    r = sign_flip_test(np.full(40, 0.1), resamples=2000)
    assert not r.exact and r.p_value == pytest.approx(1 / 2001)
    # Symmetric noise around zero: p is large and reproducible for a fixed seed.
    rng = np.random.default_rng(1)
    d = rng.normal(0, 1, 60)
    d = np.concatenate([d, -d])  # mean exactly 0 -> every pattern is at least as extreme -> p = 1
    assert sign_flip_test(d, resamples=2000).p_value == pytest.approx(1.0)
    e = rng.normal(0.05, 1, 30)
    assert sign_flip_test(e, resamples=5000).p_value == sign_flip_test(e, resamples=5000).p_value


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_queries():
    # Every difference equal: every resample has the same mean -> a zero-width interval at it.
    assert paired_bootstrap_ci(np.full(20, 0.1)) == pytest.approx((0.1, 0.1))
    rng = np.random.default_rng(3)
    small, large = rng.normal(0.05, 0.2, 30), rng.normal(0.05, 0.2, 3000)
    lo, hi = paired_bootstrap_ci(small)
    assert lo < small.mean() < hi and lo < 0.05 < hi
    lo_l, hi_l = paired_bootstrap_ci(large)
    assert hi_l - lo_l < (hi - lo) / 5  # ~ 1 / sqrt(n): 10x narrower for 100x the queries
    # The normal-theory 95% interval of a mean, for comparison: 1.96 standard errors.
    se = large.std(ddof=1) / np.sqrt(large.size)
    assert (hi_l - lo_l) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert paired_bootstrap_ci(small) == paired_bootstrap_ci(small)  # seeded: reruns agree
    with pytest.raises(ValueError):
        paired_bootstrap_ci([])


def load_compare_module():
    spec = importlib.util.spec_from_file_location("compare_quality", REPO_ROOT / "bench" / "compare_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_pairs_the_common_seeds_by_hand(tmp_path: Path):
    cq = load_compare_module()
    base = {"q1": 0.5, "q2": 0.5, "q3": 0.5, "q4": 0.5}  # mean 0.5: one point of nDCG@10 = 2 points of gain

    def seed(k: int, scores: list[float], qa: str) -> dict:
        gain = (sum(scores) / 4 - 0.5) / 0.5 * 100
        return {"seed": k, "gain_pct": gain, "per_query_ndcg@10": dict(zip(base, scores)),
                "inputs_sha256": {"qa": qa, "train": "t"}}  # fmt: skip

    a = {"base_per_query_ndcg@10": base, "per_seed": [seed(0, [0.5] * 4, "x"), seed(1, [0.6, 0.5, 0.5, 0.5], "y")]}
    b = {"base_per_query_ndcg@10": base, "per_seed": [seed(1, [0.7, 0.6, 0.6, 0.5], "y"), seed(2, [1.0] * 4, "z")]}
    c = cq.compare(a, b)
    assert c["seeds"] == [1]  # only seed 1 ran in both
    (row,) = c["per_seed"]
    # B - A per query on seed 1: +0.1, +0.1, +0.1, 0 -> mean +0.075 nDCG = +15 points of relative gain
    assert row["difference_points"] == pytest.approx(15.0) and c["mean_difference_points"] == pytest.approx(15.0)
    assert (row["queries_better"], row["queries_worse"]) == (3, 0) and row["same_llm_questions"]
    assert row["p_value"] == pytest.approx(2 / 8)  # three equal positive differences: 2 of 2^3 patterns
    low, high = c["difference_ci95_points"]
    assert low <= 15.0 <= high

    with pytest.raises(cq.CompareError, match="no seed in common"):
        cq.compare(a, {**b, "per_seed": b["per_seed"][1:]})
    with pytest.raises(cq.CompareError, match="different queries or base scores"):
        cq.compare(a, {**b, "base_per_query_ndcg@10": {**base, "q1": 0.9}})
    # one configuration's seeds from several results, joined with commas
    files = {}
    for name, result in (("a", a), ("b1", {**b, "per_seed": b["per_seed"][:1]}), ("b2", {**b, "per_seed": b["per_seed"][1:]})):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(result))
    merged = cq.load_result(f"{files['b1']},{files['b2']}")
    assert [row["seed"] for row in merged["per_seed"]] == [1, 2]
    with pytest.raises(cq.CompareError, match="already in"):
        cq.load_result(f"{files['b1']},{files['b1']}")
    proc = run_script("compare_quality.py", [str(files["a"]), f"{files['b1']},{files['b2']}"], tmp_path)
    assert proc.returncode == 0 and "| 1 | +5.0% | +20.0% | +15.0 |" in proc.stdout, proc.stdout + proc.stderr

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"per_seed": []}))
    proc = run_script("compare_quality.py", [str(old), str(old)], tmp_path)
    assert proc.returncode == 1 and "no per-query scores" in proc.stderr
