"""Stage `chunk`: a folder of documents -> passages in BEIR corpus form (data/chunks/corpus.jsonl)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from embedpipe.core.console import summary, warn
from embedpipe.core.io import write_json, write_jsonl
from embedpipe.core.models import resolve_model
from embedpipe.core.params import load_params, section
from embedpipe.documents.chunking import chunk_document, merge_duplicate, token_counter
from embedpipe.documents.reading import Document, DocumentsError, discover, read_document


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Params file.")
@click.option("--docs-dir", default=None, help="Documents folder (overrides chunk.docs_dir).")
@click.option("--out", "out_dir", default="data/chunks", show_default=True, help="Output folder.")
@click.option("--metrics", "metrics_path", default="metrics/chunk.json", show_default=True)
def main(params_path: str, docs_dir: str | None, out_dir: str, metrics_path: str) -> None:
    """Read every document under chunk.docs_dir (.txt .md .rst .html .pdf) and split it into passages.

    Writes OUT/corpus.jsonl (one passage per line: _id, title, text, doc, position) and
    OUT/skipped.jsonl (every file not used, with the reason).
    """
    started = time.time()
    params = load_params(params_path)
    cfg = section(params, "chunk")
    root = Path(docs_dir or cfg["docs_dir"])
    try:
        files, skipped = discover(root)
    except DocumentsError as e:
        raise click.ClickException(str(e)) from None
    if not files and not skipped:
        raise click.ClickException(f"documents folder is empty: {root}")

    files_found = len(files) + sum(1 for s in skipped if not s.path.endswith("/"))
    count = token_counter(resolve_model(section(params, "model")["base_model"]))
    passages: dict[str, dict] = {}
    duplicates = 0
    docs_read = 0
    for path in tqdm(files, desc="chunk", unit="file", disable=None):
        doc = read_document(path, root, int(cfg["max_file_mb"] * 1024 * 1024))
        if not isinstance(doc, Document):
            skipped.append(doc)
            continue
        docs_read += 1
        for record in chunk_document(doc, count, cfg["target_tokens"], cfg["overlap_tokens"], cfg["min_tokens"]):
            if record["_id"] in passages:
                duplicates += 1
                merge_duplicate(passages[record["_id"]], record)  # its ids still point here
            else:
                passages[record["_id"]] = record
    for item in skipped:
        warn(f"skipped {item.path}: {item.reason}")
    if not passages:
        raise click.ClickException(f"no readable text in {root} ({len(skipped)} files skipped, see above)")

    out = Path(out_dir)
    write_jsonl(out / "corpus.jsonl", passages.values())
    write_jsonl(out / "skipped.jsonl", ({"path": s.path, "reason": s.reason} for s in skipped))
    tokens = np.array([count(r["text"]) for r in passages.values()])
    reasons: dict[str, int] = {}
    for item in skipped:
        key = item.reason.split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    metrics = {
        "files_found": files_found,
        "files_read": docs_read,
        "files_skipped": len(skipped),
        "skipped_by_reason": reasons,
        "passages": len(passages),
        "duplicate_passages_removed": duplicates,
        "tokens_p50": int(np.percentile(tokens, 50)),
        "tokens_p95": int(np.percentile(tokens, 95)),
        "tokens_max": int(tokens.max()),
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json(metrics_path, metrics)
    summary("chunk", {k: v for k, v in metrics.items() if k != "skipped_by_reason"})


if __name__ == "__main__":
    sys.exit(main())
