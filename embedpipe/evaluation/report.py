"""Retrieval evaluation on a BEIR folder: base vs fine-tuned, per-query analysis, report and plot.

Search is `embedpipe.core.retrieval.retrieve` and metrics are `embedpipe.evaluation.metrics` (pytrec_eval); this module
only wires them together and turns the numbers into something a person can act on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.core.io import LLM_FREE_QUERY_TYPES, FormatError, atomic_open, passage_text, read_json
from embedpipe.core.retrieval import Run, retrieve
from embedpipe.evaluation.metrics import Qrels, aggregate, metric_names, per_query_metrics

PerQuery = dict[str, dict[str, float]]
Embedder = Callable[[list[str], str], np.ndarray]  # (texts, "query" | "passage") -> L2-normalised rows

HEADLINE = "ndcg@10"  # the metric a regression is judged on, as in the recipe


@dataclass
class Result:
    """Everything one model produced on one BEIR folder."""

    name: str
    run: Run
    per_query: PerQuery
    metrics: dict[str, float]
    dimension: int


def model_embedder(
    model: Any, query_prompt: str, passage_prompt: str, batch_size: int, progress: bool = False, label: str | None = None
) -> Embedder:
    """Wrap a SentenceTransformer so that queries and passages get their prompts (as in training).

    Encoding goes through the embedding store (`embedpipe.core.embed_store`), so a text this model already
    encoded (SDG and prep for the base model, an earlier eval) is read back instead of encoded again.
    `progress` is accepted for older callers; the store prints progress lines with an ETA for long encodes.
    """
    from embedpipe.core.embed_store import encode_cached

    def embed(texts: list[str], kind: str) -> np.ndarray:
        prompt = query_prompt if kind == "query" else passage_prompt
        return encode_cached(model, texts, prompt, batch_size=batch_size, label=label, desc=f"eval: {kind}s",
                             kind=kind)

    return embed


def evaluate_embedder(
    name: str,
    embed: Embedder,
    corpus: Mapping[str, dict[str, Any]],
    queries: Mapping[str, dict[str, Any]],
    qrels: Qrels,
    k: int = 100,
) -> Result:
    """Embed corpus and queries, retrieve the top k for every query over the whole corpus, score with pytrec_eval."""
    corpus_ids = list(corpus)
    query_ids = list(queries)
    passages = embed([passage_text(corpus[c]) for c in corpus_ids], "passage")
    query_vecs = embed([queries[q]["text"] for q in query_ids], "query")
    run = retrieve(query_vecs, passages, query_ids, corpus_ids, k=k)
    per_query = per_query_metrics(qrels, run)
    return Result(name, run, per_query, by_family(aggregate(per_query)), int(passages.shape[1]))


def by_family(metrics: Mapping[str, float]) -> dict[str, float]:
    """NDCG@1..100, then Recall, Precision, MAP, MRR: the order the recipe prints them in."""
    order = [m for m in metric_names() if m in metrics]
    return {m: metrics[m] for m in order + [m for m in metrics if m not in order]}


# --- comparing two models --------------------------------------------------------------------------


def display_name(metric: str) -> str:
    """`ndcg@10` -> `NDCG@10`, `recall@5` -> `Recall@5`: the recipe's spelling."""
    family, _, k = metric.partition("@")
    pretty = {"ndcg": "NDCG", "map": "MAP", "mrr": "MRR"}.get(family, family.capitalize())
    return f"{pretty}@{k}" if k else pretty


def delta(base: Mapping[str, float], finetuned: Mapping[str, float]) -> dict[str, float]:
    return {m: round(finetuned[m] - base[m], 5) for m in base if m in finetuned}


def comparison_line(metric: str, base: float, finetuned: float) -> str:
    """One line as the recipe prints it: `NDCG@10: 0.55506 → 0.61559 (+0.06053, +10.9%)`."""
    diff = finetuned - base
    relative = f"{diff / base * 100:+.1f}%" if base > 0 else "n/a"
    return f"{display_name(metric)}: {base:.5f} → {finetuned:.5f} ({diff:+.5f}, {relative})"


def comparison_lines(base: Mapping[str, float], finetuned: Mapping[str, float]) -> list[str]:
    return [comparison_line(m, base[m], finetuned[m]) for m in base if m in finetuned]


def metadata_value(query: Mapping[str, Any], field: str) -> str:
    """A query's metadata field as a group label; queries of users' own BEIR folders may lack it."""
    value = (query.get("metadata") or {}).get(field)
    return "unknown" if value is None or value == "" else str(value)


def breakdown(
    queries: Mapping[str, dict[str, Any]],
    per_query: Mapping[str, PerQuery],
    field: str,
    metrics: Sequence[str] = (HEADLINE, "recall@10"),
) -> dict[str, dict[str, float]]:
    """Mean metrics per group of `field` (query_type, hop_count) for every model, e.g.
    {"multi_hop": {"queries": 12, "base/ndcg@10": 0.41, "finetuned/ndcg@10": 0.52, ...}}."""
    groups: dict[str, list[str]] = {}
    judged = next(iter(per_query.values()))
    for qid in judged:
        groups.setdefault(metadata_value(queries.get(qid, {}), field), []).append(qid)
    table: dict[str, dict[str, float]] = {}
    for group in sorted(groups, key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else 0, g)):
        qids = groups[group]
        row: dict[str, float] = {"queries": len(qids)}
        for model, scores in per_query.items():
            for metric in metrics:
                row[f"{model}/{metric}"] = round(sum(scores[q][metric] for q in qids) / len(qids), 5)
        table[group] = row
    return table


def gain_significance(
    queries: Mapping[str, dict[str, Any]], base: PerQuery, finetuned: PerQuery, metric: str = HEADLINE
) -> dict[str, Any]:
    """How sure the per-query gain is: mean, 95% bootstrap interval, sign-flip p, and what the test is made of.

    `llm_written` counts test queries an LLM wrote (SDG metadata query_type other than inverse_cloze), so a
    reader sees whether the gain rests on LLM questions or on pseudo-queries cut from the passages.
    """
    from embedpipe.evaluation.significance import paired_bootstrap_ci, sign_flip_test

    qids = [q for q in base if q in finetuned]
    diffs = np.array([finetuned[q][metric] - base[q][metric] for q in qids])
    test = sign_flip_test(diffs)
    low, high = paired_bootstrap_ci(diffs)
    kinds = [metadata_value(queries.get(q, {}), "query_type") for q in qids]
    return {
        "metric": metric,
        "queries": len(qids),
        "llm_written": sum(k not in (*LLM_FREE_QUERY_TYPES, "unknown") for k in kinds),
        "inverse_cloze": kinds.count("inverse_cloze"),
        "mean_gain": round(float(diffs.mean()), 5),
        "ci95": [round(low, 5), round(high, 5)],
        "p_value": round(test.p_value, 5),
        "queries_better": test.better,
        "queries_worse": test.worse,
        "queries_tied": test.tied,
    }


def per_query_rows(
    queries: Mapping[str, dict[str, Any]], qrels: Qrels, results: Mapping[str, Result]
) -> list[dict[str, Any]]:
    """`per_query.jsonl`: one row per judged query, its SDG metadata and every model's metrics."""
    return [
        {
            "query_id": qid,
            "query_type": metadata_value(queries[qid], "query_type"),
            "hop_count": metadata_value(queries[qid], "hop_count"),
            **{label: r.per_query[qid] for label, r in results.items()},
        }
        for qid in qrels
    ]


def comparison_metrics(
    queries: Mapping[str, dict[str, Any]], qrels: Qrels, corpus: Mapping[str, Any], results: Mapping[str, Result]
) -> dict[str, Any]:
    """`metrics/eval.json`: each model's metrics, and with two models the delta, its significance and the
    regression flag (fine-tuned below base on nDCG@10); sizes and breakdowns by query type and hop count."""
    scores = {label: r.metrics for label, r in results.items()}
    per_query = {label: r.per_query for label, r in results.items()}
    metrics: dict[str, Any] = dict(scores)
    if len(results) == 2:
        metrics["delta"] = delta(scores["base"], scores["finetuned"])
        metrics["significance"] = gain_significance(queries, per_query["base"], per_query["finetuned"])
        metrics["regression"] = scores["finetuned"][HEADLINE] < scores["base"][HEADLINE]
    metrics.update(
        queries=len(qrels),
        passages=len(corpus),
        dimension=next(iter(results.values())).dimension,
        by_query_type=breakdown(queries, per_query, "query_type"),
        by_hop_count=breakdown(queries, per_query, "hop_count"),
    )
    return metrics


def user_question_block(
    questions: Any, corpus_path: str, n_passages: int, results: Mapping[str, Result], finetuned_model: str
) -> dict[str, Any]:
    """`metrics/eval.json`'s `user_questions`: the user's own questions (embedpipe.evaluation.user_questions), searched over
    the whole chunked corpus. Per model nDCG@10, MRR@10, Recall@10; with two models the delta, the paired
    sign-flip p-value of the nDCG@10 difference, which questions got better or worse, and `regression`
    (fine-tuned mean nDCG@10 below base: export and deploy_check then refuse to ship)."""
    from embedpipe.evaluation.significance import sign_flip_test
    from embedpipe.evaluation.user_questions import METRICS

    qids = list(questions.qrels)
    block: dict[str, Any] = {"file": questions.path, "questions": len(qids), "corpus": corpus_path,
                             "passages": n_passages, "finetuned_model": finetuned_model}
    for label, r in results.items():
        block[label] = {m: r.metrics[m] for m in METRICS}
    if set(results) >= {"base", "finetuned"}:
        base, tuned = results["base"].per_query, results["finetuned"].per_query
        diffs = [tuned[q][HEADLINE] - base[q][HEADLINE] for q in qids]
        test = sign_flip_test(diffs)
        block["delta"] = delta(block["base"], block["finetuned"])
        block["significance"] = {"metric": HEADLINE, "mean_gain": round(test.mean_diff, 5),
                                 "p_value": round(test.p_value, 5), "exact": test.exact,
                                 "queries_better": test.better, "queries_worse": test.worse,
                                 "queries_tied": test.tied}
        block["regression"] = block["finetuned"][HEADLINE] < block["base"][HEADLINE]

        def row(q: str, d: float) -> dict[str, Any]:
            return {"line": questions.lines[q], "question": questions.queries[q]["text"],
                    "base": round(base[q][HEADLINE], 5), "finetuned": round(tuned[q][HEADLINE], 5),
                    "change": round(d, 5)}

        moved = sorted(zip(qids, diffs, strict=True), key=lambda x: (-abs(x[1]), questions.lines[x[0]]))
        block["better"] = [row(q, d) for q, d in moved if d > 0]
        block["worse"] = [row(q, d) for q, d in moved if d < 0]
    return block


def user_question_rows(questions: Any, results: Mapping[str, Result]) -> list[dict[str, Any]]:
    """`data/eval/user_questions.jsonl`: per question its line, text, relevant passages, and per model the
    metrics and the rank of the first relevant passage (null: not in the top k)."""
    rows = []
    for qid, rel in questions.qrels.items():
        row: dict[str, Any] = {"line": questions.lines[qid], "question": questions.queries[qid]["text"],
                               "relevant": sorted(rel)}
        for label, r in results.items():
            ranked = sorted(r.run.get(qid, {}).items(), key=lambda kv: (-kv[1], kv[0]))
            first = next((i for i, (doc, _) in enumerate(ranked, 1) if doc in rel), None)
            row[label] = {**{m: r.per_query[qid][m] for m in ("ndcg@10", "mrr@10", "recall@10")}, "first_rank": first}
        rows.append(row)
    return rows


def user_question_report(block: Mapping[str, Any]) -> list[str]:
    """The report.md section on the user's own questions (after the synthetic test's metrics)."""
    from embedpipe.evaluation.user_questions import METRICS

    lines = ["## Your own questions", "",
             f"`{block['file']}`: {block['questions']} questions searched over the whole chunked corpus "
             f"(`{block['corpus']}`, {block['passages']} passages).", ""]
    models = [m for m in ("base", "finetuned") if m in block]
    rows = [[display_name(m)] + [block[label][m] for label in models] + ([block["delta"][m]] if "delta" in block else [])
            for m in METRICS]
    lines += _md_table(["metric"] + models + (["delta"] if "delta" in block else []), rows) + [""]
    if "significance" in block:
        sig = block["significance"]
        verdict = ("**worse than the base model: export and deploy_check will not ship it** "
                   "(unless `eval.user_questions_allow_regression: true`)" if block["regression"]
                   else "not worse than the base model")
        lines += [f"nDCG@10 {sig['mean_gain']:+.4f} per question on average, paired sign-flip p = {sig['p_value']:.3f} "
                  f"({sig['queries_better']} better, {sig['queries_worse']} worse, {sig['queries_tied']} tied): "
                  f"{verdict}.", ""]
        for title, key in (("Better", "better"), ("Worse", "worse")):
            lines += [f"### {title} on nDCG@10 ({len(block[key])})", ""]
            if not block[key]:
                lines += ["(none)", ""]
                continue
            lines += _md_table(["line", "question", "base", "fine-tuned", "change"],
                               [[r["line"], r["question"], r["base"], r["finetuned"], r["change"]] for r in block[key]])
            lines.append("")
    return lines


def most_changed(base: PerQuery, finetuned: PerQuery, n: int = 10, metric: str = HEADLINE) -> tuple[list, list]:
    """The n queries that gained most and the n that lost most on `metric` (ties by query id)."""
    changes = sorted(((finetuned[q][metric] - base[q][metric], q) for q in base if q in finetuned), key=lambda x: x[1])
    improved = [(q, d) for d, q in sorted(changes, key=lambda x: -x[0]) if d > 0][:n]
    regressed = [(q, d) for d, q in sorted(changes, key=lambda x: x[0]) if d < 0][:n]
    return improved, regressed


# --- files -----------------------------------------------------------------------------------------


def write_trec_run(path: str | Path, run: Run, tag: str) -> None:
    """TREC run format (`qid Q0 docid rank score tag`), readable by trec_eval and pytrec_eval."""
    with atomic_open(path) as f:
        for qid, docs in run.items():
            ranked = sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))
            for rank, (doc_id, score) in enumerate(ranked, 1):
                f.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n")


def plot_rows(results: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Long-form rows for the DVC bar plot: one bar per (metric, model), e.g. `NDCG@10 finetuned`."""
    names = next(iter(results.values())).keys()
    return [
        {"metric": f"{display_name(m)} {model}", "value": scores[m]} for m in names for model, scores in results.items()
    ]


def write_plot_csv(path: str | Path, results: Mapping[str, Mapping[str, float]]) -> None:
    with atomic_open(path) as f:
        f.write("metric,value\n")
        for row in plot_rows(results):
            f.write(f"{row['metric']},{row['value']:.5f}\n")


def plot_comparison(path: str | Path, results: Mapping[str, Mapping[str, float]], title: str) -> None:
    """Grouped bars, one group per metric, one bar per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(results.values())).keys())
    x = np.arange(len(names))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.6), 4.5))
    for i, (model, scores) in enumerate(results.items()):
        ax.bar(x + (i - (len(results) - 1) / 2) * width, [scores[m] for m in names], width, label=model)
    ax.set_xticks(x, [display_name(m) for m in names], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.15)  # headroom for the legend
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", ncol=len(results))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _snippet(record: Mapping[str, Any], width: int = 90) -> str:
    text = " ".join(passage_text(record).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _query_block(
    qid: str,
    change: float,
    queries: Mapping[str, dict[str, Any]],
    corpus: Mapping[str, dict[str, Any]],
    qrels: Qrels,
    results: Mapping[str, Result],
    top: int,
) -> list[str]:
    query = queries[qid]
    scores = ", ".join(f"{name} {r.per_query[qid][HEADLINE]:.3f}" for name, r in results.items())
    lines = [
        f"### `{qid}` ({change:+.3f} nDCG@10)",
        "",
        f"> {' '.join(query['text'].split())}",
        "",
        f"type `{metadata_value(query, 'query_type')}`, hops `{metadata_value(query, 'hop_count')}`; "
        f"nDCG@10: {scores}; relevant: {', '.join(f'`{d}`' for d in qrels[qid])}",
        "",
    ]
    for name, result in results.items():
        ranked = sorted(result.run.get(qid, {}).items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        rows = [
            (rank, "✓" if qrels[qid].get(doc, 0) > 0 else "", f"`{doc}`", f"{score:.3f}", _snippet(corpus[doc]))
            for rank, (doc, score) in enumerate(ranked, 1)
        ]
        lines += [f"**{name}** top {top}:", ""] + _md_table(["#", "rel", "passage", "score", "text"], rows) + [""]
    return lines


def write_report(
    path: str | Path,
    *,
    beir_dir: str,
    corpus: Mapping[str, dict[str, Any]],
    queries: Mapping[str, dict[str, Any]],
    qrels: Qrels,
    results: Mapping[str, Result],
    breakdowns: Mapping[str, Mapping[str, Mapping[str, float]]],
    k: int = 100,
    n_queries: int = 10,
    top: int = 5,
    user_questions: Mapping[str, Any] | None = None,
) -> None:
    """Markdown report for error analysis: metrics, the user's own questions, breakdowns, and the queries that
    moved most."""
    names = list(results)
    lines = [
        "# Retrieval evaluation",
        "",
        f"Test set `{beir_dir}`: {len(queries)} queries over {len(corpus)} passages "
        f"(exact search over the whole corpus, top {k}).",
        "",
        "## Metrics",
        "",
    ]
    metric_names = list(results[names[0]].metrics)
    rows = [[display_name(m)] + [results[n].metrics[m] for n in names] for m in metric_names]
    header = ["metric"] + names
    if len(names) == 2:
        base, tuned = (results[n].metrics for n in names)
        rows = [row + [round(tuned[m] - base[m], 5)] for row, m in zip(rows, metric_names, strict=True)]
        header.append("delta")
    lines += _md_table(header, rows) + [""]
    if user_questions:
        lines += user_question_report(user_questions)
    for field, table in breakdowns.items():
        lines += [f"## By {field}", ""]
        cols = [c for c in next(iter(table.values())) if c != "queries"] if table else []
        lines += _md_table(
            [field, "queries"] + cols, [[g, int(r["queries"])] + [r[c] for c in cols] for g, r in table.items()]
        )
        lines.append("")
    if len(names) == 2:
        base_pq, tuned_pq = (results[n].per_query for n in names)
        improved, regressed = most_changed(base_pq, tuned_pq, n_queries)
        for title, items in (("Most improved queries", improved), ("Most regressed queries", regressed)):
            lines += [f"## {title} (nDCG@10, up to {n_queries})", ""]
            if not items:
                lines += ["(none)", ""]
            for qid, change in items:
                lines += _query_block(qid, change, queries, corpus, qrels, results, top)
    with atomic_open(path) as f:
        f.write("\n".join(lines).rstrip() + "\n")


# --- endpoint vs reference -------------------------------------------------------------------------


def tolerance_for(metric: str, tolerance_at_1: float, tolerance: float) -> float:
    """The recipe's conversion-noise allowance: looser at @1 (one swap moves it a lot), tighter at @5+."""
    return tolerance_at_1 if metric.endswith("@1") else tolerance


def reference_from_file(path: str, n_queries: int, n_passages: int) -> tuple[dict[str, float], int | None]:
    """The fine-tuned metrics of an earlier eval (`metrics/eval.json`) and its dimension, refused when they were
    computed on another test set (another number of queries or passages)."""
    data = read_json(path)
    block = data.get("finetuned") if isinstance(data, dict) else None
    if not isinstance(block, dict) or not block:
        raise FormatError(f"{path}: no 'finetuned' metrics block to compare with (run the eval stage first)")
    for key, here in (("queries", n_queries), ("passages", n_passages)):
        if key in data and data[key] != here:
            raise FormatError(
                f"{path}: reference was computed on {data[key]} {key}, this test set has {here}: "
                "compare on the same --beir-dir, or use --reference-model"
            )
    dim = data.get("dimension")
    return block, int(dim) if isinstance(dim, int) else None


def compare_with_reference(
    measured: Mapping[str, float], reference: Mapping[str, float], tolerance_at_1: float, tolerance: float
) -> dict[str, dict[str, Any]]:
    """Per metric: measured, reference, delta, tolerance and whether |delta| is within it."""
    rows: dict[str, dict[str, Any]] = {}
    for metric, value in measured.items():
        if metric not in reference or not isinstance(reference[metric], int | float):
            continue
        ref = float(reference[metric])
        tol = tolerance_for(metric, tolerance_at_1, tolerance)
        diff = round(value - ref, 5)
        rows[metric] = {
            "endpoint": value,
            "reference": ref,
            "delta": diff,
            "tolerance": tol,
            "pass": bool(math.isfinite(value) and abs(diff) <= tol + 1e-9),
        }
    return rows
