"""Stage `eval`: BEIR retrieval metrics of the base vs the fine-tuned model, or of a live embeddings endpoint."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from embedpipe.core.console import alert, console, summary, warn
from embedpipe.core.embed_store import encode_backends, encode_counts
from embedpipe.core.io import FormatError, load_beir, load_corpus, write_json, write_jsonl
from embedpipe.core.models import ModelNotAvailable
from embedpipe.core.params import ParamsError, load_params, section
from embedpipe.evaluation.report import (
    HEADLINE,
    Result,
    compare_with_reference,
    comparison_lines,
    comparison_metrics,
    display_name,
    evaluate_embedder,
    model_embedder,
    per_query_rows,
    plot_comparison,
    reference_from_file,
    user_question_block,
    user_question_rows,
    write_plot_csv,
    write_report,
    write_trec_run,
)
from embedpipe.evaluation.user_questions import README_HINT, UserQuestions, load_user_questions
from embedpipe.serving.endpoint import EmbeddingEndpoint, EndpointError

DEFAULTS = {
    "top_k": 100,
    "batch_size": 32,
    "fail_on_regression": False,
    "report_queries": 10,
    "report_top": 5,
    "tolerance_at_1": 0.03,
    "tolerance": 0.01,
    "endpoint_batch_size": 32,
    "endpoint_timeout_s": 60,
    "endpoint_max_retries": 5,
    "user_questions": "data/questions.jsonl",
    "user_questions_allow_regression": False,
}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params", "params_path", default="params.yaml", show_default=True, help="Params file (sections eval, model)."
)
@click.option(
    "--beir-dir",
    default="data/prep/eval",
    show_default=True,
    help="BEIR folder to evaluate on: corpus.jsonl, queries.jsonl, qrels/test.tsv. Any labeled set of your own works.",
)
@click.option(
    "--finetuned",
    "finetuned_dir",
    default="models/finetuned",
    show_default=True,
    help="Fine-tuned sentence-transformers folder.",
)
@click.option(
    "--out-dir",
    default="data/eval",
    show_default=True,
    help="Run files, per-query metrics, report.md and the plot go here.",
)
@click.option(
    "--metrics",
    "metrics_path",
    default="metrics/eval.json",
    show_default=True,
    help="Metrics JSON (base, finetuned, delta).",
)
@click.option(
    "--models-only",
    type=click.Choice(["base", "finetuned", "both"]),
    default="both",
    show_default=True,
    help="Which local models to evaluate.",
)
@click.option(
    "--questions",
    "questions_path",
    default=None,
    metavar="PATH",
    help='Your own questions (JSONL, see README) [default: eval.user_questions, data/questions.jsonl; "" = none].',
)
@click.option(
    "--corpus",
    "chunks_path",
    default="data/chunks/corpus.jsonl",
    show_default=True,
    help="Chunked corpus your own questions are searched over (every passage).",
)
@click.option(
    "--endpoint",
    default=None,
    metavar="URL",
    help="Evaluate a live OpenAI-compatible endpoint instead, e.g. http://127.0.0.1:8000/v1.",
)
@click.option("--model", "served_model", default=None, metavar="NAME", help="Model name to send to the endpoint.")
@click.option("--api-key-env", default=None, metavar="VAR", help="Environment variable holding the endpoint's API key.")
@click.option(
    "--reference",
    "reference_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Endpoint mode: compare with the 'finetuned' block of this metrics JSON [default: metrics/eval.json if it exists].",
)
@click.option(
    "--reference-model",
    default=None,
    metavar="PATH",
    help="Endpoint mode: compare with metrics computed here with this local model (slower, always fresh).",
)
@click.option(
    "--dimension", type=int, default=None, help="Endpoint mode: expected vector dimension [default: the reference's]."
)
@click.option(
    "--out", "out_path", default="metrics/serve_eval.json", show_default=True, help="Endpoint mode: result JSON."
)
def main(
    params_path: str,
    beir_dir: str,
    finetuned_dir: str,
    out_dir: str,
    metrics_path: str,
    models_only: str,
    questions_path: str | None,
    chunks_path: str,
    endpoint: str | None,
    served_model: str | None,
    api_key_env: str | None,
    reference_path: str | None,
    reference_model: str | None,
    dimension: int | None,
    out_path: str,
) -> None:
    """Measure retrieval quality on a BEIR test set (recipe step 5).

    \b
    Default: evaluate model.base_model and the fine-tuned model on the same test set, write
    metrics/eval.json ({"base", "finetuned", "delta"}), TREC run files, per-query metrics,
    report.md (breakdowns, most improved / regressed queries) and a plot into --out-dir.
    Exact search over the whole corpus with the model prompts; metrics by pytrec_eval.
    With a questions file (eval.user_questions), also both models on your own questions,
    searched over the whole chunked corpus: the `user_questions` block of the metrics.

    \b
    Endpoint mode (--endpoint URL --model NAME): embed queries and corpus through the
    endpoint, compare with a reference (tolerance 0.03 at @1, 0.01 at @5+) and exit 1 on drift.
    """
    started = time.time()
    try:
        params = load_params(params_path)
        model_cfg = section(params, "model")
        cfg = {**DEFAULTS, **(params.get("eval") or {})}
        corpus, queries, qrels = load_beir(beir_dir)
        if endpoint:
            ok = run_endpoint(
                endpoint,
                served_model,
                api_key_env,
                reference_path,
                reference_model,
                dimension,
                out_path,
                corpus,
                queries,
                qrels,
                cfg,
                model_cfg,
                started,
            )
        else:
            questions = questions_path if questions_path is not None else cfg.get("user_questions")
            ok = run_models(
                beir_dir,
                finetuned_dir,
                out_dir,
                metrics_path,
                models_only,
                corpus,
                queries,
                qrels,
                cfg,
                model_cfg,
                started,
                questions,
                chunks_path,
            )
    except (FormatError, ParamsError, EndpointError, ModelNotAvailable) as e:
        raise click.ClickException(str(e)) from None
    sys.exit(0 if ok else 1)


def user_questions(path: str | None, chunks_path: str) -> tuple[UserQuestions, dict] | None:
    """The user's questions resolved against the chunked corpus, or None (with one line saying how to add them)."""
    if not path:
        return None
    if not Path(path).is_file():
        click.echo(f"No {path}: add your own questions to see whether fine-tuning helped on them ({README_HINT}).")
        return None
    if not Path(chunks_path).is_file():
        warn(f"{path} not judged: no chunked corpus at {chunks_path} to search (run the chunk stage, or give --corpus)")
        return None
    corpus = load_corpus(chunks_path)
    questions = load_user_questions(path, corpus)
    if not questions.qrels:
        click.echo(f"{path} is empty: no questions of your own judged ({README_HINT}).")
        return None
    return questions, corpus


def load_local(name: str, model_cfg: dict[str, Any]) -> Any:
    """A local model for corpus-sized encodes: on the bulk encoder (ONNX Runtime where exact, `model.bulk_encoder`)."""
    from embedpipe.core.bulk_encoder import use_bulk_encoder
    from embedpipe.core.models import load_model

    model = load_model(name, model_cfg.get("device"), model_cfg.get("max_seq_length"))
    return use_bulk_encoder(model, model_cfg.get("bulk_encoder", "auto"))


def evaluate_local(
    label: str,
    name: str,
    corpus: dict,
    queries: dict,
    qrels: dict,
    cfg: dict[str, Any],
    model_cfg: dict[str, Any],
    user: tuple[UserQuestions, dict] | None = None,
) -> Result | tuple[Result, Result]:
    """Load one local model, evaluate it, and let it go (two models never sit in memory together).
    With `user` (questions, chunked corpus) it also evaluates the user's questions: (test result, user result)."""
    console.print(f"[bold]{label}[/bold]: {name}")
    model = load_local(name, model_cfg)
    embed = model_embedder(
        model,
        model_cfg.get("query_prompt") or "",
        model_cfg.get("passage_prompt") or "",
        int(cfg["batch_size"]),
    )
    result = evaluate_embedder(label, embed, corpus, queries, qrels, k=int(cfg["top_k"]))
    if user is None:
        del model
        return result
    questions, chunks = user
    mine = evaluate_embedder(label, embed, chunks, questions.queries, questions.qrels, k=int(cfg["top_k"]))
    del model
    return result, mine


def run_models(
    beir_dir: str,
    finetuned_dir: str,
    out_dir: str,
    metrics_path: str,
    models_only: str,
    corpus: dict,
    queries: dict,
    qrels: dict,
    cfg: dict[str, Any],
    model_cfg: dict[str, Any],
    started: float,
    questions_path: str | None = None,
    chunks_path: str = "data/chunks/corpus.jsonl",
) -> bool:
    """Evaluate base and/or fine-tuned model (and the user's questions, when there are some); write every output;
    return False only on a fatal regression."""
    wanted = ["base", "finetuned"] if models_only == "both" else [models_only]
    if (
        "finetuned" in wanted
        and not (Path(finetuned_dir) / "config.json").is_file()
        and not any(Path(finetuned_dir).glob("*.safetensors"))
    ):
        raise FormatError(
            f"{finetuned_dir}: no fine-tuned model there (run the finetune stage first, or use --models-only base)"
        )
    names = {"base": str(model_cfg["base_model"]), "finetuned": finetuned_dir}
    user = user_questions(questions_path, chunks_path)  # a bad file fails here, before any model is loaded
    evaluated = {label: evaluate_local(label, names[label], corpus, queries, qrels, cfg, model_cfg, user)
                 for label in wanted}
    results = {label: r[0] if user else r for label, r in evaluated.items()}
    mine = {label: r[1] for label, r in evaluated.items()} if user else {}

    out = Path(out_dir)
    for label, result in results.items():
        write_trec_run(out / f"run_{label}.trec", result.run, label)
    write_jsonl(out / "per_query.jsonl", per_query_rows(queries, qrels, results))
    metrics = comparison_metrics(queries, qrels, corpus, results)
    if user:
        metrics["user_questions"] = user_question_block(user[0], chunks_path, len(user[1]), mine, finetuned_dir)
        write_jsonl(out / "user_questions.jsonl", user_question_rows(user[0], mine))
    breakdowns = {"query_type": metrics["by_query_type"], "hop_count": metrics["by_hop_count"]}
    write_report(
        out / "report.md",
        beir_dir=beir_dir,
        corpus=corpus,
        queries=queries,
        qrels=qrels,
        results=results,
        breakdowns=breakdowns,
        k=int(cfg["top_k"]),
        n_queries=int(cfg["report_queries"]),
        top=int(cfg["report_top"]),
        user_questions=metrics.get("user_questions"),
    )
    scores = {label: r.metrics for label, r in results.items()}
    plot_comparison(out / "eval_plot.png", scores, f"Retrieval on {len(qrels)} test queries")
    write_plot_csv(Path(metrics_path).with_name(Path(metrics_path).stem + "_plot.csv"), scores)
    write_json(metrics_path, metrics)
    regression = bool(metrics.get("regression"))

    print_summary(metrics, scores, results, names, mine, len(qrels), len(corpus), out, started)
    if regression:
        return not bool(cfg["fail_on_regression"])
    return True


def print_summary(metrics: dict, scores: dict, results: dict, names: dict, mine: dict, n_queries: int, n_passages: int,
                  out: Path, started: float) -> None:
    """The comparison lines, the eval summary, and an alert for each regression (synthetic test, your questions)."""
    regression = bool(metrics.get("regression"))
    if len(results) == 2:
        click.echo("Comparison (base → fine-tuned)")
        for line in comparison_lines(scores["base"], scores["finetuned"]):
            click.echo(f"  {line}")
    rows: dict[str, Any] = {"queries": n_queries, "passages": n_passages}
    for label, s in scores.items():
        rows.update({f"{label} {display_name(m)}": s[m] for m in (HEADLINE, "recall@10", "mrr@10")})
    if "significance" in metrics:
        sig = metrics["significance"]
        rows["nDCG@10 gain (95% CI)"] = f"{sig['mean_gain']:+.4f} [{sig['ci95'][0]:+.4f}, {sig['ci95'][1]:+.4f}]"
        rows["sign-flip p"] = f"{sig['p_value']:.3f} ({sig['queries_better']} better, {sig['queries_worse']} worse)"
        rows["test queries LLM-written"] = f"{sig['llm_written']} of {sig['queries']}"
    block = metrics.get("user_questions")
    if block:
        for label in mine:
            rows[f"your questions: {label} nDCG@10"] = block[label][HEADLINE]
        if "significance" in block:
            sig = block["significance"]
            rows["your questions: sign-flip p"] = (f"{sig['p_value']:.3f} ({sig['queries_better']} better, "
                                                   f"{sig['queries_worse']} worse of {block['questions']})")
    counts = encode_counts()
    for label in results:
        c = counts.get(names[label], {"requested": 0, "encoded": 0})
        on = encode_backends().get(names[label], "torch")
        rows[f"{label} texts encoded"] = f"{c['encoded']} of {c['requested']} on {on} (the rest from the embedding store)"
    rows.update({"report": str(out / "report.md"), "wall time (s)": f"{time.time() - started:.1f}"})
    summary("eval", rows)
    if regression:
        d = metrics["delta"][HEADLINE]
        alert(
            f"REGRESSION: the fine-tuned model is worse than the base model on nDCG@10 ({d:+.5f}). "
            f"See {out / 'report.md'} for the queries that lost most."
        )
    if block and block.get("regression"):
        d = block["delta"][HEADLINE]
        alert(
            f"WORSE ON YOUR QUESTIONS: the fine-tuned model's nDCG@10 on {block['file']} is lower than the base "
            f"model's ({d:+.5f}); export and deploy_check will refuse to ship it unless "
            f"eval.user_questions_allow_regression is true. The questions that lost are in {out / 'report.md'}."
        )


def load_reference(
    reference_path: str | None,
    reference_model: str | None,
    corpus: dict,
    queries: dict,
    qrels: dict,
    cfg: dict[str, Any],
    model_cfg: dict[str, Any],
) -> tuple[dict[str, float] | None, str, int | None]:
    """The metrics the endpoint must match: (metrics or None, where they come from, expected dimension)."""
    if reference_model:
        result = evaluate_local("reference", reference_model, corpus, queries, qrels, cfg, model_cfg)
        return result.metrics, f"model {reference_model}", result.dimension
    if reference_path is None:
        if not Path("metrics/eval.json").is_file():
            warn("no --reference or --reference-model given and no metrics/eval.json: reporting metrics only")
            return None, "none", None
        reference_path = "metrics/eval.json"
    metrics, dim = reference_from_file(reference_path, len(qrels), len(corpus))
    return metrics, f"{reference_path} (finetuned)", dim


def run_endpoint(
    url: str,
    served_model: str | None,
    api_key_env: str | None,
    reference_path: str | None,
    reference_model: str | None,
    dimension: int | None,
    out_path: str,
    corpus: dict,
    queries: dict,
    qrels: dict,
    cfg: dict[str, Any],
    model_cfg: dict[str, Any],
    started: float,
) -> bool:
    """Evaluate a live endpoint and compare it with the reference; False on drift or endpoint fault."""
    if not served_model:
        raise click.UsageError("--endpoint needs --model NAME (the model name the server expects)")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise click.UsageError(f"--api-key-env {api_key_env}: that environment variable is not set")
    reference, source, ref_dim = load_reference(reference_path, reference_model, corpus, queries, qrels, cfg, model_cfg)
    client = EmbeddingEndpoint(
        url,
        served_model,
        api_key,
        batch_size=int(cfg["endpoint_batch_size"]),
        timeout=float(cfg["endpoint_timeout_s"]),
        max_retries=int(cfg["endpoint_max_retries"]),
        dimension=dimension or ref_dim,
    )
    console.print(f"[bold]endpoint[/bold]: {url} (model {served_model})")
    record: dict[str, Any] = {"endpoint": url, "model": served_model, "reference_source": source}
    try:
        result = evaluate_embedder(
            "endpoint", lambda texts, kind: client.embed(texts, kind), corpus, queries, qrels, k=int(cfg["top_k"])
        )
    except EndpointError as e:
        write_json(out_path, {**record, "passed": False, "error": str(e)})
        alert(f"ENDPOINT FAULT: {e}")
        return False

    record.update(queries=len(qrels), passages=len(corpus), dimension=result.dimension, endpoint_metrics=result.metrics)
    if reference is None:
        record["passed"] = True
        write_json(out_path, record)
        summary("eval (endpoint)", {display_name(m): v for m, v in result.metrics.items()})
        return True

    rows = compare_with_reference(result.metrics, reference, float(cfg["tolerance_at_1"]), float(cfg["tolerance"]))
    passed = bool(rows) and all(r["pass"] for r in rows.values())
    record.update(
        reference=reference,
        delta={m: r["delta"] for m, r in rows.items()},
        tolerance={"@1": float(cfg["tolerance_at_1"]), "@5+": float(cfg["tolerance"])},
        checks={m: r["pass"] for m, r in rows.items()},
        passed=passed,
    )
    write_json(out_path, record)
    click.echo(f"Endpoint vs reference ({source})")
    for metric, r in rows.items():
        mark = "✓" if r["pass"] else "✗"
        click.echo(
            f"  {mark} {display_name(metric)}: {r['endpoint']:.5f} vs {r['reference']:.5f} "
            f"({r['delta']:+.5f}, tolerance {r['tolerance']:.2f})"
        )
    failed = [display_name(m) for m, r in rows.items() if not r["pass"]]
    summary(
        "eval (endpoint)",
        {
            "queries": len(qrels),
            "passages": len(corpus),
            "dimension": result.dimension,
            "metrics within tolerance": f"{len(rows) - len(failed)}/{len(rows)}",
            "wall time (s)": f"{time.time() - started:.1f}",
        },
    )
    if not rows:
        alert(f"DRIFT CHECK IMPOSSIBLE: the reference {source} shares no metric with the endpoint's")
    elif failed:
        alert(f"DRIFT: the endpoint's metrics differ from the reference beyond tolerance: {', '.join(failed)}")
    else:
        console.print("[bold green]endpoint matches the reference within tolerance[/bold green]")
    return passed


if __name__ == "__main__":
    main()
