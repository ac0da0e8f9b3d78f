"""Compare two quality-bench results seed by seed: is configuration B better than A on the human queries?

`bench/bench_quality.py` tests each configuration against the base model. Choosing between two
configurations needs the paired test between *them*: on the seeds both ran, per query, the difference of
nDCG@10 (B - A, each averaged over the common seeds), with the same sign-flip test and bootstrap interval.
A seed is a clean pair when both runs trained on the same LLM questions and training set (the results'
`inputs_sha256`); the table says which seeds are.

    python bench/compare_quality.py bench/results/history/quality-default-seeds3-5.json \\
        bench/results/history/quality-len256-fast17-seeds3-4.json --out /tmp/compare.md

Needs results written since per-query scores were recorded (`per_query_ndcg@10`); see docs/quality.md.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedpipe.core.io import FormatError, read_json, write_json  # noqa: E402
from embedpipe.evaluation.significance import paired_bootstrap_ci, sign_flip_test  # noqa: E402


class CompareError(click.ClickException):
    """Results that cannot be compared: one clear message, exit 1."""


def load_result(paths: str) -> dict[str, Any]:
    """One result, or several of one configuration joined with commas (seeds run separately): seeds merged."""
    merged: dict[str, Any] | None = None
    for path in paths.split(","):
        try:
            result = read_json(path)
        except (OSError, FormatError, ValueError) as e:
            raise CompareError(f"{path}: {e}") from None
        if not isinstance(result, dict) or "base_per_query_ndcg@10" not in result:
            raise CompareError(
                f"{path}: no per-query scores (base_per_query_ndcg@10): written by an older bench_quality.py; "
                "rerun it (a kept --workdir makes the rerun instant)"
            )
        if merged is None:
            merged = {**result, "per_seed": list(result["per_seed"])}
            continue
        if result["base_per_query_ndcg@10"] != merged["base_per_query_ndcg@10"]:
            raise CompareError(f"{path}: another benchmark or base model than {paths.split(',')[0]}")
        seen = {s["seed"] for s in merged["per_seed"]}
        if seen & {s["seed"] for s in result["per_seed"]}:
            raise CompareError(f"{path}: a seed it ran is already in {paths}")
        merged["per_seed"] += result["per_seed"]
    assert merged is not None
    return merged


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per common seed and pooled over them: B - A in relative nDCG@10 points, with paired tests over queries."""
    base_a, base_b = a["base_per_query_ndcg@10"], b["base_per_query_ndcg@10"]
    if set(base_a) != set(base_b) or any(abs(base_a[q] - base_b[q]) > 1e-6 for q in base_a):
        raise CompareError("the two results were measured on different queries or base scores: not comparable")
    seeds_a = {s["seed"]: s for s in a["per_seed"]}
    seeds_b = {s["seed"]: s for s in b["per_seed"]}
    common = sorted(set(seeds_a) & set(seeds_b))
    if not common:
        raise CompareError(f"no seed in common (A: {sorted(seeds_a)}, B: {sorted(seeds_b)})")
    qids = sorted(base_a)
    base_mean = float(np.mean([base_a[q] for q in qids]))
    rows, diffs = [], []
    for seed in common:
        sa, sb = seeds_a[seed], seeds_b[seed]
        d = np.array([sb["per_query_ndcg@10"][q] - sa["per_query_ndcg@10"][q] for q in qids])
        diffs.append(d)
        test = sign_flip_test(d)
        ha, hb = sa.get("inputs_sha256") or {}, sb.get("inputs_sha256") or {}
        rows.append(
            {
                "seed": seed,
                "gain_pct_a": sa["gain_pct"],
                "gain_pct_b": sb["gain_pct"],
                "difference_points": round(sb["gain_pct"] - sa["gain_pct"], 3),
                "p_value": round(test.p_value, 5),
                "queries_better": test.better,
                "queries_worse": test.worse,
                "same_llm_questions": bool(ha.get("qa")) and ha.get("qa") == hb.get("qa"),
                "same_training_set": bool(ha.get("train")) and ha.get("train") == hb.get("train"),
            }
        )
    pooled = np.mean(diffs, axis=0)
    test = sign_flip_test(pooled)
    low, high = (100 * x / base_mean for x in paired_bootstrap_ci(pooled))
    differences = [r["difference_points"] for r in rows]
    return {
        "seeds": common,
        "per_seed": rows,
        "mean_gain_pct_a": round(statistics.fmean(r["gain_pct_a"] for r in rows), 3),
        "mean_gain_pct_b": round(statistics.fmean(r["gain_pct_b"] for r in rows), 3),
        "mean_difference_points": round(statistics.fmean(differences), 3),
        "difference_ci95_points": [round(low, 3), round(high, 3)],
        "p_value": round(test.p_value, 5),
        "queries_better": test.better,
        "queries_worse": test.worse,
        "queries_tied": test.tied,
    }


def markdown(name_a: str, name_b: str, params_a: dict, params_b: dict, c: dict[str, Any]) -> str:
    yes = {True: "yes", False: "no"}
    lines = [
        f"A: `{name_a}` (overrides {params_a or 'none'})  ",
        f"B: `{name_b}` (overrides {params_b or 'none'})",
        "",
        "| seed | A gain | B gain | B - A (points) | p (B vs A) | queries B better / worse | same LLM questions | same training set |",
        "|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    for r in c["per_seed"]:
        lines.append(
            f"| {r['seed']} | {r['gain_pct_a']:+.1f}% | {r['gain_pct_b']:+.1f}% | {r['difference_points']:+.1f} | "
            f"{r['p_value']:.3f} | {r['queries_better']} / {r['queries_worse']} | {yes[r['same_llm_questions']]} | "
            f"{yes[r['same_training_set']]} |"
        )
    low, high = c["difference_ci95_points"]
    lines += [
        f"| **mean** | {c['mean_gain_pct_a']:+.1f}% | {c['mean_gain_pct_b']:+.1f}% | "
        f"**{c['mean_difference_points']:+.1f}** [{low:+.1f}, {high:+.1f}] | **{c['p_value']:.3f}** | "
        f"{c['queries_better']} / {c['queries_worse']} | | |",
        "",
        "B - A: relative nDCG@10 gain over the base model, in points; [95% bootstrap interval over queries]. "
        "p: paired two-sided sign-flip test over queries on B - A (pooled: each query's nDCG@10 averaged over the "
        "common seeds).",
    ]
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("result_a", metavar="A.json[,A2.json...]")
@click.argument("result_b", metavar="B.json[,B2.json...]")
@click.option("--out", "out_path", default=None, help="Also write the table here (Markdown; the JSON goes next to it).")
def main(result_a: str, result_b: str, out_path: str | None) -> None:
    """Paired comparison of two bench_quality.py results (B against A) on their common seeds.

    Each side may join several results of one configuration with commas (seeds run in separate calls)."""
    a, b = load_result(result_a), load_result(result_b)
    c = compare(a, b)
    table = markdown(result_a, result_b, a.get("params") or {}, b.get("params") or {}, c)
    click.echo(table)
    if out_path:
        out = Path(out_path)
        out.write_text(table, encoding="utf-8")
        write_json(out.with_suffix(".json"), {"a": result_a, "b": result_b, **c})


if __name__ == "__main__":
    main()
