"""Eval-stage speed on the sample corpus: chunk data/sample_docs, build an inverse-cloze BEIR set
(query = a passage's first sentence, relevant = that passage), run `stages/eval.py` with the base
model as both base and "fine-tuned", report wall time and peak RSS.

    python bench/bench_eval.py
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedpipe.core.io import read_jsonl, write_beir  # noqa: E402
from embedpipe.core.models import load_model  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "stages/chunk.py", "--out", str(tmp / "chunks"), "--metrics", str(tmp / "chunk.json")],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        corpus = read_jsonl(tmp / "chunks" / "corpus.jsonl")
        queries, qrels = [], {}
        for i, rec in enumerate(corpus):
            first = re.split(r"(?<=[.!?])\s", rec["text"].strip(), maxsplit=1)[0][:200]
            if len(first.split()) >= 5:
                queries.append(
                    {"_id": f"q{i}", "text": first, "metadata": {"query_type": "inverse_cloze", "hop_count": 1}}
                )
                qrels[f"q{i}"] = {rec["_id"]: 1}
        write_beir(tmp / "beir", corpus, queries, qrels)
        load_model("all-MiniLM-L6-v2", "cpu").save(str(tmp / "ft"))  # MiniLM plays the fine-tuned model
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "stages/eval.py", "--beir-dir", str(tmp / "beir"), "--finetuned", str(tmp / "ft"),
             "--out-dir", str(tmp / "out"), "--metrics", str(tmp / "eval.json"), "--questions", ""],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.time() - started
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        rss = after.ru_maxrss / 1024
        ndcg = re.search(r"NDCG@10: \S+", proc.stdout)
        print(
            f"eval stage, 2 models, {len(corpus)} passages, {len(queries)} queries: "
            f"{wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss:.0f} MiB, {ndcg.group(0) if ndcg else ''}"
        )


if __name__ == "__main__":
    main()
