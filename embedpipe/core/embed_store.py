"""Content-addressed embedding store: every text is encoded once per model, whichever stage asks.

Without it a run encodes the corpus six to nine times (SDG's retrieval gate, mining, validation, eval,
export parity, deploy_check); on a 2-core CPU each full encode of a 10k-passage doc set costs ~20 min.

Layout: `<root>/<model fingerprint>-L<max_seq_length>/` holds shards written once and never changed:
`<shard>.keys.npy` (uint8 rows, 16-byte sha256 of prompt + text), `<shard>.vecs.npy` (float32 rows) and
`<shard>.json` (row count, dimension, sha256 of both files), written last as the commit marker. A shard
whose files do not match its manifest is reported and deleted, never trusted; a shard without a manifest
is an interrupted write and is ignored. The fingerprint hashes the weights and the tokenizer, not the
model's name, so a fine-tuned model saved under the same path never hits the base model's vectors.

The store is a cache, not a pipeline output: DVC never sees it, deleting it only costs time. Its root is
`$EMBEDPIPE_EMBED_CACHE` (default `cache/embeddings`; empty or `off` disables it). Every call appends a
line to `<root>/encode_log.jsonl` (texts asked for, texts encoded, model, stage, and `kind`: "passage",
"query" or null, as the caller says) so benchmarks and tests can count encodes per passage.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.core.console import progress, warn

STORE_ENV = "EMBEDPIPE_EMBED_CACHE"
DEFAULT_ROOT = "cache/embeddings"
KEY_BYTES = 16
COMPACT_ABOVE = 32  # shards per model before they are merged into one
ENCODE_CHUNK = 512  # texts per model.encode call (progress granularity)


def store_root() -> Path | None:
    """The store's folder from the environment, or None when disabled."""
    value = os.environ.get(STORE_ENV, DEFAULT_ROOT).strip()
    return None if value in ("", "off", "0", "none") else Path(value)


def text_keys(texts: Sequence[str], prompt: str) -> np.ndarray:
    """(n, 16) uint8: sha256 of prompt + NUL + text, truncated (collisions: ~2^-64 per pair)."""
    keys = np.empty((len(texts), KEY_BYTES), dtype=np.uint8)
    for i, text in enumerate(texts):
        digest = hashlib.sha256(f"{prompt}\0{text}".encode("utf-8", "surrogatepass")).digest()
        keys[i] = np.frombuffer(digest[:KEY_BYTES], dtype=np.uint8)
    return keys


def model_fingerprint(model: Any) -> str:
    """sha256 over a SentenceTransformer's modules, weights and tokenizer: what its vectors depend on.

    Memoised on the model object; call `forget_fingerprint(model)` after changing its weights in place.
    """
    cached = getattr(model, "_embedpipe_fingerprint", None)
    if cached:
        return cached
    import torch

    h = hashlib.sha256()
    h.update(repr(model).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    tokenizer = getattr(model, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # minus padding/truncation: runtime state that encoding itself changes
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    elif tokenizer is not None:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    fingerprint = h.hexdigest()
    try:
        model._embedpipe_fingerprint = fingerprint
    except AttributeError:
        pass
    return fingerprint


def forget_fingerprint(model: Any) -> None:
    if hasattr(model, "_embedpipe_fingerprint"):
        del model._embedpipe_fingerprint


def model_folder(root: str | Path, fingerprint: str, max_seq_length: int | None) -> Path:
    return Path(root) / f"{fingerprint[:24]}-L{max_seq_length or 0}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EmbeddingStore:
    """Vectors of one model (one fingerprint and sequence length), looked up by text key."""

    def __init__(self, root: str | Path, fingerprint: str, max_seq_length: int | None, label: str = "",
                 backend: str = "") -> None:
        self.folder = model_folder(root, fingerprint, max_seq_length)
        self.fingerprint = fingerprint
        self.label = label
        self.backend = backend
        self._index: dict[bytes, tuple[int, int]] = {}
        self._shards: list[np.ndarray] = []
        self._load()

    # --- reading ---------------------------------------------------------------------------------

    def _load(self) -> None:
        self._index.clear()
        self._shards.clear()
        if not self.folder.is_dir():
            return
        for manifest in sorted(self.folder.glob("*.json")):
            loaded = self._load_shard(manifest)
            if loaded is None:
                continue
            keys, vecs = loaded
            shard = len(self._shards)
            self._shards.append(vecs)
            for row, key in enumerate(keys):
                self._index[key.tobytes()] = (shard, row)

    def _load_shard(self, manifest: Path) -> tuple[np.ndarray, np.ndarray] | None:
        stem = manifest.with_suffix("")
        keys_path, vecs_path = Path(f"{stem}.keys.npy"), Path(f"{stem}.vecs.npy")
        try:
            meta = json.loads(manifest.read_text())
            if (not keys_path.is_file() or not vecs_path.is_file()
                    or _file_sha256(keys_path) != meta["keys_sha256"] or _file_sha256(vecs_path) != meta["vecs_sha256"]):
                raise ValueError("files do not match the manifest's sha256")
            keys = np.load(keys_path, mmap_mode="r")
            vecs = np.load(vecs_path, mmap_mode="r")
            if keys.shape != (meta["rows"], KEY_BYTES) or vecs.shape != (meta["rows"], meta["dim"]):
                raise ValueError(f"shapes {keys.shape} / {vecs.shape} differ from the manifest")
        except (OSError, ValueError, KeyError, TypeError) as e:
            warn(f"embedding store: discarding corrupt shard {stem.name} ({e}); its texts will be re-encoded")
            for path in (manifest, keys_path, vecs_path):
                path.unlink(missing_ok=True)
            return None
        return np.asarray(keys), vecs

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(vectors with zero rows for misses, boolean mask of hits)."""
        hits = np.zeros(len(keys), dtype=bool)
        found: list[tuple[int, np.ndarray]] = []
        for i, key in enumerate(keys):
            where = self._index.get(key.tobytes())
            if where is not None:
                hits[i] = True
                found.append((i, self._shards[where[0]][where[1]]))
        if not found:
            return None, hits
        out = np.zeros((len(keys), found[0][1].shape[0]), dtype=np.float32)
        for i, vec in found:
            out[i] = vec
        return out, hits

    # --- writing ---------------------------------------------------------------------------------

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Write one new shard and index it; merge the shards when there are too many."""
        if len(keys) == 0:
            return
        self._write_shard(keys, vectors)
        if len(list(self.folder.glob("*.json"))) > COMPACT_ABOVE:
            self.compact()

    def _write_shard(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Atomically, as far as readers are concerned: the manifest is renamed into place last."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        keys = np.ascontiguousarray(keys, dtype=np.uint8)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys_path, vecs_path = Path(f"{stem}.keys.npy"), Path(f"{stem}.vecs.npy")
        with keys_path.open("wb") as f:
            np.save(f, keys)
        with vecs_path.open("wb") as f:
            np.save(f, vectors)
        meta = {"rows": len(keys), "dim": int(vectors.shape[1]), "model": self.label,
                "backend": self.backend, "fingerprint": self.fingerprint, "keys_sha256": _file_sha256(keys_path),
                "vecs_sha256": _file_sha256(vecs_path)}
        tmp = Path(f"{stem}.json.tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(f"{stem}.json")
        shard = len(self._shards)
        self._shards.append(vectors)
        for row, key in enumerate(keys):
            self._index[key.tobytes()] = (shard, row)

    def compact(self) -> None:
        """Merge all shards into one (same vectors), then delete the old ones."""
        old = sorted(self.folder.glob("*.json"))
        keys = np.array([np.frombuffer(k, dtype=np.uint8) for k in self._index], dtype=np.uint8)
        vecs = np.stack([self._shards[s][r] for s, r in self._index.values()]).astype(np.float32)
        self._shards, self._index = [], {}
        self._write_shard(keys, vecs)
        for manifest in old:
            stem = manifest.with_suffix("")
            for path in (manifest, Path(f"{stem}.keys.npy"), Path(f"{stem}.vecs.npy")):
                path.unlink(missing_ok=True)


_OPEN: dict[Path, EmbeddingStore] = {}


def open_store(root: Path, fingerprint: str, max_seq_length: int | None, label: str = "",
               backend: str = "") -> EmbeddingStore:
    """One `EmbeddingStore` per model folder and process: shards are read and checked once, not per call."""
    folder = model_folder(root, fingerprint, max_seq_length)
    store = _OPEN.get(folder)
    if store is None or not folder.is_dir() and len(store):
        store = _OPEN[folder] = EmbeddingStore(root, fingerprint, max_seq_length, label, backend)
    return store


def log_encodes(root: Path, label: str, fingerprint: str, requested: int, encoded: int,
                kind: str | None = None, backend: str = "") -> None:
    """One line per call in `<root>/encode_log.jsonl`: how many texts were asked for and really encoded.

    `kind` ("passage" / "query") lets a benchmark count encodes per corpus passage without storing texts.
    """
    root.mkdir(parents=True, exist_ok=True)
    line = {"time": round(time.time(), 3), "stage": os.environ.get("EMBEDPIPE_STAGE") or Path(sys.argv[0]).stem,
            "model": label, "backend": backend, "fingerprint": fingerprint[:24], "kind": kind,
            "requested": requested, "encoded": encoded}
    with (root / "encode_log.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


_COUNTS: dict[str, dict[str, int]] = {}


def encode_counts() -> dict[str, dict[str, int]]:
    """Texts asked for and really encoded in this process, per model label: what a stage's summary reports."""
    return {label: dict(c) for label, c in _COUNTS.items()}


def read_encode_log(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / "encode_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode_texts(
    encode_fn: Callable[[list[str]], np.ndarray],
    texts: Sequence[str],
    *,
    prompt: str,
    fingerprint: str,
    max_seq_length: int | None,
    label: str,
    desc: str = "encode",
    root: Path | None | str = "env",
    kind: str | None = None,
    backend: str = "",
) -> np.ndarray:
    """Vectors for `texts` (with `prompt` prepended by `encode_fn`), encoding only what the store lacks.

    `encode_fn(list_of_texts)` must return L2-normalised float32 rows; it is called on chunks of at most
    ENCODE_CHUNK unique missing texts, with a progress line (and ETA) per chunk when there are many. Each
    chunk is stored as soon as it is encoded, so a killed run resumes where it stopped.
    """
    root = store_root() if root == "env" else (Path(root) if root else None)
    texts = list(texts)
    store = open_store(root, fingerprint, max_seq_length, label, backend) if root is not None else None
    keys = text_keys(texts, prompt)
    out, hits = store.lookup(keys) if store is not None else (None, np.zeros(len(texts), dtype=bool))
    # Unique missing texts, in first-seen order.
    first: dict[bytes, int] = {}
    for i in np.flatnonzero(~hits):
        first.setdefault(keys[i].tobytes(), int(i))
    todo = list(first.values())
    new_vecs: list[np.ndarray] = []
    if todo:
        show = len(todo) > ENCODE_CHUNK
        with progress(len(todo), desc=f"{desc} ({label})", unit="text") if show else _NoProgress() as bar:
            for start in range(0, len(todo), ENCODE_CHUNK):
                rows = todo[start:start + ENCODE_CHUNK]
                vecs = np.asarray(encode_fn([texts[i] for i in rows]), dtype=np.float32)
                if store is not None:  # a shard per chunk: an interrupted encode keeps what it finished
                    store.add(keys[rows], vecs)
                new_vecs.append(vecs)
                bar.update(len(rows))
        fresh = np.concatenate(new_vecs)
        if out is None:
            out = np.zeros((len(texts), fresh.shape[1]), dtype=np.float32)
        row_of = {keys[i].tobytes(): n for n, i in enumerate(todo)}
        for i in np.flatnonzero(~hits):
            out[i] = fresh[row_of[keys[i].tobytes()]]
    counts = _COUNTS.setdefault(label, {"requested": 0, "encoded": 0})
    counts["requested"] += len(texts)
    counts["encoded"] += len(todo)
    if root is not None:
        log_encodes(root, label, fingerprint, len(texts), len(todo), kind, backend)
    if out is None:  # no texts at all
        return np.zeros((0, 0), dtype=np.float32)
    return out


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def encode_cached(
    model: Any,
    texts: Sequence[str],
    prompt: str = "",
    *,
    batch_size: int = 32,
    label: str | None = None,
    desc: str = "encode",
    root: Path | None | str = "env",
    kind: str | None = None,
    bf16: bool = False,
) -> np.ndarray:
    """`embedpipe.core.models.encode` through the store: the one way stages encode with a SentenceTransformer.

    `bf16`: encode under bfloat16 autocast (~2.6x faster on CPUs with AMX, cosine >= 0.9999 to fp32); its
    vectors are stored under their own fingerprint, so fp32 and bf16 vectors never answer for each other.
    A model marked with `embedpipe.core.bulk_encoder.use_bulk_encoder` (and not bf16) encodes on ONNX Runtime when
    that passed its parity check against torch; those vectors too have a fingerprint of their own.
    """
    from embedpipe.core.models import encode

    texts = list(texts)
    if not texts:
        return encode(model, [], prompt)
    name = label or getattr(model, "_embedpipe_name", None) or type(model).__name__
    root = store_root() if root == "env" else (Path(root) if root else None)
    fingerprint = model_fingerprint(model)
    seq = getattr(model, "max_seq_length", None)
    onnx = None
    if not bf16 and getattr(model, "_embedpipe_bulk", "torch") != "torch":
        from embedpipe.core.bulk_encoder import STATE, onnx_fingerprint, resolve, verified_on_disk

        graphs = root / "onnx" if root is not None else None
        if getattr(model, STATE, None) is None and verified_on_disk(graphs, fingerprint, seq):
            # All in the store (an earlier stage encoded them with this graph): no encoder, no parity run needed.
            stored = open_store(root, onnx_fingerprint(fingerprint), seq, name, "onnx-fp32")
            if stored.lookup(text_keys(texts, prompt))[1].all():
                _BACKENDS[name] = "onnx-fp32"
                return encode_texts(_never_called, texts, prompt=prompt, fingerprint=stored.fingerprint,
                                    max_seq_length=seq, label=name, desc=desc, root=root, kind=kind,
                                    backend="onnx-fp32")
        onnx = resolve(model, texts, prompt, fingerprint, graphs).encoder

    def encode_fn(chunk: list[str]) -> np.ndarray:
        if onnx is not None:
            return onnx.encode(chunk, prompt=prompt, batch_size=batch_size)
        import torch

        with torch.inference_mode(), torch.autocast(model.device.type, torch.bfloat16, enabled=bf16):
            return encode(model, chunk, prompt=prompt, batch_size=batch_size)

    backend = "torch-bf16" if bf16 else "torch"
    if bf16:  # a fingerprint of its own (hashed: the store's folder name keeps only a prefix)
        fingerprint = hashlib.sha256(f"{fingerprint}:bf16-autocast".encode()).hexdigest()
    elif onnx is not None:
        fingerprint, backend = onnx_fingerprint(fingerprint), f"onnx-{onnx.variant}"
    _BACKENDS[name] = backend
    return encode_texts(
        encode_fn, texts, prompt=prompt, fingerprint=fingerprint, max_seq_length=seq,
        label=name, desc=desc, root=root, kind=kind, backend=backend,
    )


def _never_called(texts: list[str]) -> np.ndarray:
    raise AssertionError("every text was in the store")


_BACKENDS: dict[str, str] = {}


def encode_backends() -> dict[str, str]:
    """The backend each model label last encoded with in this process (torch, torch-bf16, onnx-fp32)."""
    return dict(_BACKENDS)
