"""The five-domain suite runner (`bench/bench_quality.py --suite`): pooled and held-out figures by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from test_bench_quality import FAST, make_bench, run_bench

sys.path.insert(0, str(REPO_ROOT / "bench"))
from suite_report import DomainRun, suite_result  # noqa: E402


def test_pooled_and_held_out_figures_match_hand_arithmetic():
    # a: 2 queries, base .5 and .5; seeds 0 and 1 give .6/.4 and .8/.6 -> per-query means .7 and .5 -> diffs +.2, 0
    # b: 1 query, base .4; seeds give .3 and .3 -> diff -.1
    a = DomainRun("a", {"q1": 0.5, "q2": 0.5}, {0: {"q1": 0.6, "q2": 0.4}, 1: {"q1": 0.8, "q2": 0.6}},
                  {0: 20, 1: 20}, {0: 20, 1: 20}, {"q1": 0.9, "q2": 0.7})  # fmt: skip
    b = DomainRun("b", {"q1": 0.4}, {0: {"q1": 0.3}, 1: {"q1": 0.3}}, {0: 12, 1: 14}, {0: 20, 1: 20})
    result = suite_result([a, b], held_out=("b",))

    # pooled: diffs (+.2, 0, -.1), base mean 1.4/3 -> gain = 100 * (0.1/3) / (1.4/3) = 7.142857 %
    assert result["seeds"] == [0, 1] and result["n_queries"] == 3
    assert result["mean_gain_pct"] == pytest.approx(100 * 0.1 / 1.4, abs=1e-3)
    # exact sign flip over the two non-zero diffs (+.2, -.1): |sum| >= .1 for all 4 patterns -> p = 1
    assert result["p_value"] == 1.0
    rows = {r["name"]: r for r in result["per_benchmark"]}
    assert rows["a"]["n_queries"] == 2 and rows["a"]["base_ndcg_at_10"] == 0.5
    assert rows["a"]["finetuned_ndcg_at_10"] == pytest.approx(0.6)  # seeds: .5 and .7
    assert rows["a"]["mean_gain_pct"] == pytest.approx(20.0)  # seeds: 0 % and +40 %
    assert rows["a"]["gain_pct_std"] == pytest.approx(float(np.std([0, 40], ddof=1)), abs=1e-3)
    assert rows["a"]["mpnet_ndcg_at_10"] == pytest.approx(0.8) and rows["b"]["mpnet_ndcg_at_10"] is None
    assert rows["b"]["mean_gain_pct"] == pytest.approx(-25.0)
    assert rows["b"]["steps_taken"] == 13 and rows["b"]["steps_planned"] == 20
    assert result["domains_below_base"] == 1
    assert result["held_out"] == {"benchmarks": ["b"], "mean_gain_pct": -25.0, "p_value": 1.0, "n_queries": 1}
    assert result["tuning"]["benchmarks"] == ["a"] and result["tuning"]["mean_gain_pct"] == pytest.approx(20.0)

    with pytest.raises(ValueError, match="without every seed"):
        suite_result([a, DomainRun("c", {"q": 0.5}, {0: {"q": 0.5}})])


def test_suite_runs_every_domain_and_pools_their_queries(tmp_path: Path, tiny_docs_dir: Path, tiny_corpus_path: Path):
    suite = tmp_path / "suite"
    for name in ("alpha", "beta"):
        built = make_bench(tmp_path / name, tiny_docs_dir, tiny_corpus_path)
        built.rename(suite / name) if suite.exists() else (suite.mkdir(), built.rename(suite / name))
    (suite / "not-a-bench").mkdir()  # no docs/ and beir/: ignored
    out, work = tmp_path / "suite.json", tmp_path / "work"
    args = ["--suite", str(suite), "--seeds", "1", "--held-out", "beta", "--no-mpnet", "--workdir", str(work),
            "--keep", "--out", str(out)]  # fmt: skip
    for override in FAST:
        args += ["-S", override]
    proc = run_bench(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())

    assert result["complete"] and result["seeds"] == [0] and result["n_queries"] == 16
    assert [r["name"] for r in result["per_benchmark"]] == ["alpha", "beta"]
    assert result["held_out"]["benchmarks"] == ["beta"] and result["held_out"]["n_queries"] == 8
    assert result["overrides"]["sdg.llm.enabled"] is False and result["bf16"] is False
    assert result["cpu"] and result["commit"]
    # the pooled gain, recomputed from each domain's own per-query files
    diffs, base = [], []
    for name in ("alpha", "beta"):
        b = {r["query_id"]: r["base"]["ndcg@10"] for r in map(json.loads, open(work / name / "eval_base" / "per_query.jsonl"))}
        f = {r["query_id"]: r["finetuned"]["ndcg@10"] for r in map(json.loads, open(work / name / "seed0" / "eval" / "per_query.jsonl"))}  # fmt: skip
        diffs += [f[q] - b[q] for q in sorted(b)]
        base += [b[q] for q in sorted(b)]
        row = next(r for r in result["per_benchmark"] if r["name"] == name)
        assert row["steps_planned"] >= 1 and row["steps_taken"] == row["steps_planned"]  # a fixed amount: no budget cut
        held = result["held_out"] if name == "beta" else None
        if held:
            assert held["mean_gain_pct"] == pytest.approx(row["mean_gain_pct"], abs=1e-2)
    assert result["mean_gain_pct"] == pytest.approx(100 * np.mean(diffs) / np.mean(base), abs=1e-2)
    table = out.with_suffix(".md").read_text()
    assert "| alpha |" in table and "| beta (held out) |" in table and "**all pooled**" in table

    bad = run_bench(["--suite", str(suite), "--bench", str(suite / "alpha")], tmp_path)
    assert bad.returncode != 0 and "without --bench" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = run_bench(["--suite", str(empty)], tmp_path)
    assert none.returncode != 0 and "no sub-folder holds docs/ and beir/" in none.stderr
