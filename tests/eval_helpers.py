"""Helpers for the eval tests: a tiny BEIR folder, stage runs, and a loopback embeddings server."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from embedpipe.core.io import read_jsonl, write_beir

REPO_ROOT = Path(__file__).resolve().parents[1]

# Hand-written queries over tests/data/tiny_corpus.jsonl; two are multi-hop with two relevant passages.
TINY_QUERIES = [
    ("q1", "How many grind settings does the G3 grinder have?", ["d_4f05ef5b065f63c5"], "contextual", 1),
    ("q2", "How often should I descale the K1 kettle in hard water?", ["d_05123711729adfb6"], "contextual", 1),
    ("q3", "Which K2 temperature preset is meant for green tea?", ["d_ec35e4ab29d224a2"], "structural", 1),
    ("q4", "What part replaces a failed toaster electromagnet?", ["d_31220b33a3793ced"], "contextual", 1),
    ("q5", "What does a steady amber light on the kettle mean?", ["d_68dbc4ab2fcaa352"], "structural", 1),
    (
        "q6",
        "How long is the warranty on the K1 kettle compared with the G3 grinder motor?",
        ["d_5d8f853b8c4d1239", "d_0e6d8c7c3c4a2cf7"],
        "multi_hop",
        2,
    ),
    (
        "q7",
        "Which kettle boils a full kettle faster, the K1 or the K2?",
        ["d_5af4eb565814e637", "d_cf5380269e9afc6e"],
        "multi_hop",
        2,
    ),
]


def scramble_word_embeddings(folder: Path) -> Path:
    """Shuffle the saved model's word-embedding rows in place (seeded): a "fine-tuned" model much worse than base."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    weights = model[0].auto_model.embeddings.word_embeddings.weight
    with torch.no_grad():
        weights.copy_(weights[torch.randperm(weights.shape[0], generator=torch.Generator().manual_seed(0))])
    model.save(str(folder))
    return folder


def make_tiny_beir(folder: Path, corpus_path: Path) -> Path:
    queries = [
        {"_id": qid, "text": text, "metadata": {"query_type": qtype, "hop_count": hops}}
        for qid, text, _, qtype, hops in TINY_QUERIES
    ]
    qrels = {qid: {doc: 1 for doc in docs} for qid, _, docs, _, _ in TINY_QUERIES}
    write_beir(folder, read_jsonl(corpus_path), queries, qrels)
    return folder


def write_params(path: Path, **eval_overrides: Any) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["model"].update(base_model="all-MiniLM-L6-v2", device="cpu")
    # no questions of the user's unless a test asks (the repo's data/questions.jsonl is about data/sample_docs)
    params["eval"] = {**params.get("eval", {}), "user_questions": "", **eval_overrides}
    path.write_text(yaml.safe_dump(params))
    return path


def run_stage(
    *args: str, cwd: Path | None = None, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run stages/eval.py as a real subprocess (exit codes and stderr as a user sees them)."""
    from conftest import stage_env

    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "eval.py"), *args],
        cwd=cwd or REPO_ROOT,
        env={**stage_env(), "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class EmbeddingsServer:
    """An OpenAI-compatible /v1/embeddings server on loopback, serving a SentenceTransformer.

    `mode` injects faults: ok, permuted (items out of order but correctly indexed), shuffled (vectors
    reversed but labelled 0..n-1), wrong_dim, nan, missing, random (valid vectors of another "model"),
    flaky (first request 503), down (always 500).
    """

    def __init__(self, model: Any, port: int) -> None:
        self.model = model
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server.respond(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1"

    def __enter__(self) -> EmbeddingsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def respond(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append(body)
            first = len(self.requests) == 1
            vectors = self._embed(body)
        if path != "/v1/embeddings":
            return 404, {"error": {"message": f"no route {path}"}}
        if self.mode == "down" or (self.mode == "flaky" and first):
            return (500 if self.mode == "down" else 503), {"error": {"message": "model is loading"}}
        if self.mode == "wrong_dim":
            vectors = vectors[:, :128]
        elif self.mode == "nan":
            vectors[-1, 3] = np.nan
        order = list(range(len(vectors)))
        items = [(i, vectors[i]) for i in order]
        if self.mode == "permuted":
            items = items[::-1]
        elif self.mode == "shuffled":
            items = [(i, vectors[j]) for i, j in zip(order, order[::-1], strict=True)]
        elif self.mode == "missing" and len(items) > 1:
            items = items[:-1]
        as_b64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype(np.float32).tobytes()).decode() if as_b64 else v.tolist(),
            }
            for i, v in items
        ]
        return 200, {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    def _embed(self, body: dict[str, Any]) -> np.ndarray:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if self.mode == "random":  # deterministic per text, so batch and single requests agree
            rows = [
                np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=384)
                for t in texts
            ]
            return np.asarray(rows, dtype=np.float32)
        return np.asarray(self.model.encode(texts, normalize_embeddings=True), dtype=np.float32)
