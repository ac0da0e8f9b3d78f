"""The five-domain suite's numbers: per-domain rows, the pooled gain over every query, the held-out block.

Pure functions over per-query nDCG@10 (no models, no files), so the arithmetic is tested on hand-made numbers.
Pooled figures count each query once: its fine-tuned nDCG@10 averaged over seeds minus its base nDCG@10; the
gain is 100 * mean(differences) / mean(base) over the pooled queries (the same as the mean over seeds of the
per-seed relative gain, when every query is scored on every seed), and p is the paired sign-flip test over
those differences. A domain with few queries therefore weighs less than one with many, as each question does.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedpipe.evaluation.significance import paired_bootstrap_ci, sign_flip_test

HELD_OUT = ("sqlite-faq", "zsh-faq")  # confirm a default here once; never choose a lever on these
TUNING = ("django-faq", "sqlalchemy-faq", "celery-faq")


@dataclass
class DomainRun:
    """One domain's scores: base per query, fine-tuned per query for each seed, and what each seed's run did."""

    name: str
    base: dict[str, float]
    finetuned: dict[int, dict[str, float]]  # seed -> query id -> nDCG@10
    steps_taken: dict[int, int] = field(default_factory=dict)
    steps_planned: dict[int, int] = field(default_factory=dict)
    mpnet: dict[str, float] | None = None  # all-mpnet-base-v2 zero-shot, per query

    def differences(self) -> np.ndarray:
        """Per query: fine-tuned nDCG@10 averaged over the seeds, minus base."""
        qids = sorted(self.base)
        ft = np.mean([[self.finetuned[s][q] for q in qids] for s in sorted(self.finetuned)], axis=0)
        return ft - np.array([self.base[q] for q in qids])


def _gain(diffs: np.ndarray, base: np.ndarray) -> float:
    return float(100 * diffs.mean() / base.mean()) if base.mean() else float("nan")


def pooled(runs: list[DomainRun]) -> dict[str, Any]:
    """Gain, p-value, bootstrap interval and query counts over the queries of `runs` together."""
    diffs = np.concatenate([r.differences() for r in runs])
    base = np.concatenate([[r.base[q] for q in sorted(r.base)] for r in runs])
    test = sign_flip_test(diffs)
    low, high = (100 * x / base.mean() for x in paired_bootstrap_ci(diffs))
    return {
        "n_queries": int(diffs.size),
        "base_ndcg_at_10": round(float(base.mean()), 5),
        "finetuned_ndcg_at_10": round(float(base.mean() + diffs.mean()), 5),
        "mean_gain_pct": round(_gain(diffs, base), 3),
        "gain_pct_ci95": [round(low, 3), round(high, 3)],
        "p_value": round(test.p_value, 5),
        "queries_better": test.better,
        "queries_worse": test.worse,
        "queries_tied": test.tied,
    }


def domain_row(run: DomainRun) -> dict[str, Any]:
    """The per-benchmark row of suite.json (means over seeds)."""
    seeds = sorted(run.finetuned)
    qids = sorted(run.base)
    base = float(np.mean([run.base[q] for q in qids]))
    per_seed = {s: float(np.mean([run.finetuned[s][q] for q in qids])) for s in seeds}
    gains = [100 * (v - base) / base for v in per_seed.values()]
    test = sign_flip_test(run.differences())
    row: dict[str, Any] = {
        "name": run.name,
        "n_queries": len(qids),
        "base_ndcg_at_10": round(base, 5),
        "finetuned_ndcg_at_10": round(statistics.fmean(per_seed.values()), 5),
        "mean_gain_pct": round(statistics.fmean(gains), 3),
        "gain_pct_std": round(statistics.stdev(gains), 3) if len(gains) > 1 else 0.0,
        "gain_pct_by_seed": {str(s): round(g, 3) for s, g in zip(seeds, gains)},
        "p_value": round(test.p_value, 5),
        "queries_better": test.better,
        "queries_worse": test.worse,
        "steps_taken": _mean_or_none(run.steps_taken.values()),
        "steps_planned": _mean_or_none(run.steps_planned.values()),
        "mpnet_ndcg_at_10": round(float(np.mean([run.mpnet[q] for q in qids])), 5) if run.mpnet else None,
    }
    return row


def _mean_or_none(values: Any) -> float | None:
    values = list(values)
    return round(statistics.fmean(values), 2) if values else None


def suite_result(runs: list[DomainRun], held_out: tuple[str, ...] = HELD_OUT) -> dict[str, Any]:
    """suite.json's numbers: pooled over all domains, per domain, and pooled over the held-out domains."""
    if not runs:
        raise ValueError("no domain to report")
    seeds = sorted({s for r in runs for s in r.finetuned})
    missing = [r.name for r in runs if sorted(r.finetuned) != seeds]
    if missing:
        raise ValueError(f"domains without every seed {seeds}: {', '.join(missing)}")
    held = [r for r in runs if r.name in held_out]
    all_pooled = pooled(runs)
    return {
        "seeds": seeds,
        "mean_gain_pct": all_pooled["mean_gain_pct"],
        "p_value": all_pooled["p_value"],
        "n_queries": all_pooled["n_queries"],
        "pooled": all_pooled,
        "per_benchmark": [domain_row(r) for r in runs],
        "domains_below_base": sum(domain_row(r)["mean_gain_pct"] < 0 for r in runs),
        "held_out": {"benchmarks": [r.name for r in held], **(_held_block(held))},
        "tuning": {"benchmarks": [r.name for r in runs if r.name not in held_out], **_held_block(
            [r for r in runs if r.name not in held_out])},
    }


def _held_block(runs: list[DomainRun]) -> dict[str, Any]:
    if not runs:
        return {"mean_gain_pct": None, "p_value": None, "n_queries": 0}
    p = pooled(runs)
    return {"mean_gain_pct": p["mean_gain_pct"], "p_value": p["p_value"], "n_queries": p["n_queries"]}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def markdown(result: dict[str, Any]) -> str:
    """The table a person reads: one row per domain, the held-out and pooled rows below."""
    lines = [
        "# Five-domain suite: fine-tuned vs base on human questions",
        "",
        f"Seeds {result['seeds']}; overrides: {result['overrides'] or 'none (the defaults)'}; CPU {result['cpu']}; "
        f"bf16 {'on' if result['bf16'] else 'off'}; commit {result['commit']}; {result['date']}.",
        "",
        "| domain | queries | base nDCG@10 | fine-tuned | gain (± seeds) | p | better/worse | mpnet zero-shot | steps |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in result["per_benchmark"]:
        mark = " (held out)" if r["name"] in result["held_out"]["benchmarks"] else ""
        mpnet = "-" if r["mpnet_ndcg_at_10"] is None else f"{r['mpnet_ndcg_at_10']:.4f}"
        lines.append(
            f"| {r['name']}{mark} | {r['n_queries']} | {r['base_ndcg_at_10']:.4f} | {r['finetuned_ndcg_at_10']:.4f} "
            f"| {_pct(r['mean_gain_pct'])} ± {r['gain_pct_std']:.1f} | {r['p_value']:.3f} "
            f"| {r['queries_better']}/{r['queries_worse']} | {mpnet} | {r['steps_taken']} of {r['steps_planned']} |"
        )
    h, p = result["held_out"], result["pooled"]
    if h["benchmarks"]:
        lines.append(f"| **held out pooled** | {h['n_queries']} | | | **{_pct(h['mean_gain_pct'])}** "
                     f"| {h['p_value']:.3f} | | | |")
    lines.append(
        f"| **all pooled** | {p['n_queries']} | {p['base_ndcg_at_10']:.4f} | {p['finetuned_ndcg_at_10']:.4f} "
        f"| **{_pct(p['mean_gain_pct'])}** [{p['gain_pct_ci95'][0]:+.1f}, {p['gain_pct_ci95'][1]:+.1f}] "
        f"| {p['p_value']:.4f} | {p['queries_better']}/{p['queries_worse']} | | |"
    )
    lines += [
        "",
        "Pooled rows count each question once (its nDCG@10 averaged over seeds); p: paired sign-flip test over "
        "questions; [..]: 95 % bootstrap interval over questions. Tuning split: "
        f"{', '.join(result['tuning']['benchmarks'])}; held out: {', '.join(h['benchmarks']) or 'none'}.",
        "",
    ]
    return "\n".join(lines)
