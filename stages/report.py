"""Stage `report`: one Markdown page with every stage's key figures, for a pull request (metrics/report.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from embedpipe.core.console import console, summary
from embedpipe.core.io import atomic_open, read_json

# (metrics file, title, keys shown; None = every scalar top-level key)
SECTIONS: list[tuple[str, str, list[str] | None]] = [
    ("chunk.json", "Documents → passages", None),
    ("sdg.json", "Synthetic questions", None),
    ("prep.json", "Split and hard negatives", None),
    ("train.json", "Fine-tuning", None),
    ("export.json", "Export", None),
]
HEADLINE = ["ndcg@1", "ndcg@5", "ndcg@10", "ndcg@100", "recall@1", "recall@5", "recall@10", "recall@100",
            "precision@10", "map@10", "mrr@10"]


def _scalars(data: dict[str, Any], keys: list[str] | None) -> list[tuple[str, Any]]:
    items = [(k, data[k]) for k in keys if k in data] if keys else list(data.items())
    return [(k, v) for k, v in items if isinstance(v, (int, float, str, bool))]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def comparison_rows(eval_metrics: dict[str, Any]) -> list[str]:
    base, tuned = eval_metrics.get("base", {}), eval_metrics.get("finetuned", {})
    rows = ["| metric | base | fine-tuned | Δ | Δ% |", "|---|---:|---:|---:|---:|"]
    for name in HEADLINE:
        if name in base and name in tuned:
            b, t = base[name], tuned[name]
            pct = f"{(t - b) / b * 100:+.1f}%" if b else "n/a"
            rows.append(f"| {name} | {b:.4f} | {t:.4f} | {t - b:+.4f} | {pct} |")
    return rows


def pipeline_headline(folder: Path) -> dict[str, Any]:
    """The few figures a user looks at first, from whichever stages have run."""
    def get(name: str, key: str) -> Any:
        path = folder / name
        return read_json(path).get(key) if path.is_file() else None

    rows = {
        "passages": get("chunk.json", "passages"),
        "QA pairs accepted": get("sdg.json", "accepted"),
        "training examples": get("train.json", "examples"),
        "fine-tuned model kept": get("train.json", "saved_model"),
    }
    variants = get("export.json", "variants") or {}
    kept = [name for name, v in variants.items() if isinstance(v, dict) and v.get("passed")]
    if variants:
        fp32 = variants.get("fp32", {})
        rows["export parity (fp32 cosine min)"] = fp32.get("cosine_min")
        rows["ONNX variants kept"] = ", ".join(kept) or "none"
    return {k: v for k, v in rows.items() if v is not None}


def metrics_diff(rev: str) -> str:
    """`dvc metrics diff --md REV`, or a note when git/DVC cannot compare (first commit, no git)."""
    try:
        out = subprocess.run(["dvc", "metrics", "diff", "--md", rev], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"_dvc metrics diff unavailable: {e}_"
    if out.returncode != 0:
        return f"_dvc metrics diff {rev} unavailable: {(out.stderr or out.stdout).strip().splitlines()[-1:]}_"
    return out.stdout.strip() or f"_no metric changed since {rev}_"


@click.command()
@click.option("--metrics-dir", default="metrics", show_default=True, help="Folder of the stages' metrics JSON.")
@click.option("--plot", default="data/eval/eval_plot.png", show_default=True, help="Eval plot to link.")
@click.option("--diff-rev", default="HEAD", show_default=True, help="Git revision for `dvc metrics diff`.")
@click.option("--out", default="metrics/report.md", show_default=True)
def main(metrics_dir: str, plot: str, diff_rev: str, out: str) -> None:
    """Collect every stage's metrics into one Markdown report and print the headline figures."""
    folder = Path(metrics_dir)
    lines = ["# Embedding fine-tuning report", ""]
    headline = pipeline_headline(folder)
    for name, title, keys in SECTIONS:
        path = folder / name
        if not path.is_file():
            continue
        data = read_json(path)
        lines += [f"## {title}", "", "| | |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _scalars(data, keys)]
        lines.append("")
    eval_path = folder / "eval.json"
    if eval_path.is_file():
        eval_metrics = read_json(eval_path)
        lines += ["## Retrieval quality on the held-out test set (base → fine-tuned)", ""]
        lines += comparison_rows(eval_metrics) + [""]
        if Path(plot).is_file():
            lines += [f"![base vs fine-tuned]({os.path.relpath(plot, Path(out).parent)})", ""]
        b, t = eval_metrics.get("base", {}), eval_metrics.get("finetuned", {})
        for name in ("ndcg@10", "recall@10"):
            if name in b and name in t:
                headline[f"{name} base → fine-tuned"] = f"{b[name]:.4f} → {t[name]:.4f} ({t[name] - b[name]:+.4f})"
        mine = eval_metrics.get("user_questions") or {}
        if "delta" in mine:
            sig = mine["significance"]
            lines += [f"## Your own questions (`{mine['file']}`, {mine['questions']} questions, base → fine-tuned)", ""]
            lines += comparison_rows(mine) + [""]
            lines += [f"Sign-flip p = {sig['p_value']:.3f} ({sig['queries_better']} better, {sig['queries_worse']} "
                      f"worse, {sig['queries_tied']} tied)" + (": **worse than the base model** (export and deploy_check refuse it unless "
                                                              "`eval.user_questions_allow_regression`)"
                                                              if mine.get("regression") else "") + ".", ""]
            b, t = mine["base"]["ndcg@10"], mine["finetuned"]["ndcg@10"]
            headline["your questions ndcg@10"] = f"{b:.4f} → {t:.4f} ({t - b:+.4f}, p {sig['p_value']:.3f})"
    serve_path = folder / "serve_eval.json"
    if serve_path.is_file():
        serve = read_json(serve_path)
        passed = serve.get("passed")
        lines += ["## Deployed endpoint check", "", f"Served model matches the local model: **{'yes' if passed else 'NO'}**", ""]
        headline["served model check"] = "pass" if passed else "FAIL"
    lines += ["## Metrics changed since " + diff_rev, "", metrics_diff(diff_rev), ""]
    with atomic_open(out) as f:
        f.write("\n".join(lines))
    if headline:
        summary("pipeline", headline)
    console.print(f"report written to {out}")


if __name__ == "__main__":
    sys.exit(main())
