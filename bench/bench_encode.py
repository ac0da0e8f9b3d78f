"""Benchmark: the bulk encoder (ONNX Runtime fp32, `embedpipe.core.bulk_encoder`) vs torch on a corpus encode.

The texts are real passages: the sample docs (or `--docs DIR`) chunked as the chunk stage does, repeated up to
`--passages` (default 1,000). Both encoders run in this process, side by side: the passages are split into
blocks and each block is encoded by torch and by ONNX in turn (alternating which goes first), so a load that
comes and goes on a shared machine hits both alike. The ONNX encoder is the one the pipeline uses (exported and
parity-checked by `bulk_encoder.resolve`, whose time is reported as `setup_s`, not in the ratio).

    EMBEDPIPE_BF16=off python bench/bench_encode.py          # -> bench/results/encode.json

Writes `backend`, `speedup_vs_torch` (torch seconds / ONNX seconds over the same blocks), `cosine_min` (ONNX vs
torch over every passage), `n_passages`, `bf16` (false: both sides run fp32, as the bulk encoder always does;
`cpu_native_bf16` says whether `bf16: auto` would take bfloat16 elsewhere on this CPU; run with EMBEDPIPE_BF16=off
to measure as an fp32-only CPU) and `cpu`. Target: >= 1.6x torch, cosine >= 0.9999.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_SPEEDUP = 1.6


def passages_from(docs: Path, model_location: str, n: int) -> tuple[list[str], int]:
    """n passages chunked from `docs` (200-token target, the chunk stage's defaults), repeated when fewer."""
    from embedpipe.documents.chunking import chunk_document, token_counter
    from embedpipe.documents.reading import Document, discover, read_document

    files, _ = discover(docs)
    count = token_counter(model_location)
    unique: list[str] = []
    for path in files:
        doc = read_document(path, docs, 20 * 1024 * 1024)
        if isinstance(doc, Document):
            unique += [r["text"] for r in chunk_document(doc, count, 200, 30, 120)]
        if len(unique) >= n:
            break
    if not unique:
        raise click.ClickException(f"no passages in {docs}")
    return [unique[i % len(unique)] for i in range(n)], min(len(unique), n)


def cpu_name() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_description

    return cpu_description()



@click.command()
@click.option("--docs", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=ROOT / "data" / "sample_docs", show_default=True, help="Documents to chunk into passages.")
@click.option("--passages", "n_passages", default=1000, show_default=True, help="Passages encoded by each side.")
@click.option("--blocks", default=4, show_default=True, help="Blocks the passages are timed in (alternating order).")
@click.option("--batch-size", default=32, show_default=True, help="The stages' encode batch size.")
@click.option("--max-seq-length", default=256, show_default=True)
@click.option("--out", "out_path", default=str(ROOT / "bench" / "results" / "encode.json"), show_default=True)
def main(docs: Path, n_passages: int, blocks: int, batch_size: int, max_seq_length: int, out_path: str) -> None:
    from embedpipe.core.bulk_encoder import resolve, use_bulk_encoder
    from embedpipe.core.embed_store import model_fingerprint
    from embedpipe.core.models import cpu_has_bf16, encode, load_model, resolve_model

    model = load_model("all-MiniLM-L6-v2", device="cpu", max_seq_length=max_seq_length)
    texts, distinct = passages_from(docs, resolve_model("all-MiniLM-L6-v2"), n_passages)
    use_bulk_encoder(model, "onnx")
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        t0 = time.perf_counter()
        choice = resolve(model, texts, "", model_fingerprint(model), Path(tmp))
        setup_s = time.perf_counter() - t0
        if choice.encoder is None:
            raise click.ClickException(f"the bulk encoder fell back to torch: {choice.reason}")
        onnx = choice.encoder
        encode(model, texts[:batch_size], batch_size=batch_size)  # warm-up, both sides
        onnx.encode(texts[:batch_size], batch_size=batch_size)
        torch_s = onnx_s = 0.0
        ref, got = [], []
        size = -(-len(texts) // blocks)
        for b in range(blocks):
            block = texts[b * size:(b + 1) * size]
            order = ("torch", "onnx") if b % 2 == 0 else ("onnx", "torch")
            for side in order:
                t = time.perf_counter()
                if side == "torch":
                    ref.append(encode(model, block, batch_size=batch_size))
                    torch_s += time.perf_counter() - t
                else:
                    got.append(onnx.encode(block, batch_size=batch_size))
                    onnx_s += time.perf_counter() - t
            print(f"block {b + 1}/{blocks}: torch {torch_s:.1f} s, onnx {onnx_s:.1f} s so far", flush=True)
    ref_all, got_all = np.concatenate(ref), np.concatenate(got)
    cos = (ref_all * got_all).sum(1) / (np.linalg.norm(ref_all, axis=1) * np.linalg.norm(got_all, axis=1))
    speedup = torch_s / onnx_s
    result = {
        "backend": choice.backend, "speedup_vs_torch": round(speedup, 2), "target_speedup": TARGET_SPEEDUP,
        "target_met": bool(speedup >= TARGET_SPEEDUP), "cosine_min": round(float(cos.min()), 7),
        "cosine_mean": round(float(cos.mean()), 7), "n_passages": len(texts), "distinct_passages": distinct,
        "docs": str(docs.relative_to(ROOT) if docs.is_relative_to(ROOT) else docs), "batch_size": batch_size,
        "max_seq_length": max_seq_length, "torch_s": round(torch_s, 2), "onnx_s": round(onnx_s, 2),
        "torch_passages_per_s": round(len(texts) / torch_s, 1), "onnx_passages_per_s": round(len(texts) / onnx_s, 1),
        "setup_s": round(setup_s, 2), "parity_sample": choice.parity, "blocks": blocks,
        "bf16": False, "cpu_native_bf16": cpu_has_bf16(), "cpu": cpu_name(), "model": "all-MiniLM-L6-v2",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("backend", "speedup_vs_torch", "cosine_min", "n_passages", "bf16")}))
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
