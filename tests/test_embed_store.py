"""The embedding store: hits, misses, model/prompt separation, corruption, compaction, encode counting."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from embedpipe.core import embed_store
from embedpipe.core.console import LineProgress
from embedpipe.core.embed_store import EmbeddingStore, encode_cached, encode_texts, read_encode_log, text_keys


class CountingEncoder:
    """A deterministic fake *function* (not a mock of the store): vector = hash of the text, counted."""

    def __init__(self, dim: int = 8, salt: str = "") -> None:
        self.dim, self.salt, self.calls, self.texts = dim, salt, 0, 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        rows = [np.random.default_rng(abs(hash(self.salt + t)) % 2**32).standard_normal(self.dim) for t in texts]
        out = np.array(rows, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def fresh_stores():
    embed_store._OPEN.clear()
    yield
    embed_store._OPEN.clear()


def run(enc: CountingEncoder, texts: list[str], root, prompt: str = "", fingerprint: str = "f" * 64) -> np.ndarray:
    return encode_texts(enc, texts, prompt=prompt, fingerprint=fingerprint, max_seq_length=128, label="fake",
                        root=root)


def test_hit_miss_and_duplicates(tmp_path):
    enc = CountingEncoder()
    first = run(enc, ["a", "b", "a", "c"], tmp_path)
    assert enc.texts == 3  # "a" twice in one call is encoded once
    np.testing.assert_array_equal(first[0], first[2])
    second = run(enc, ["c", "d", "a"], tmp_path)
    assert enc.texts == 4  # only "d" is new
    np.testing.assert_array_equal(second[0], first[3])
    np.testing.assert_array_equal(second[2], first[0])
    # A new process (fresh index) reads the shards from disk.
    embed_store._OPEN.clear()
    third = run(enc, ["a", "b", "c", "d"], tmp_path)
    assert enc.texts == 4
    np.testing.assert_array_equal(third[3], second[1])
    log = read_encode_log(tmp_path)
    assert [(r["requested"], r["encoded"]) for r in log] == [(4, 3), (3, 1), (4, 0)]


def test_changed_model_or_prompt_never_hits(tmp_path):
    enc = CountingEncoder()
    run(enc, ["a", "b"], tmp_path)
    run(enc, ["a", "b"], tmp_path, prompt="query: ")
    assert enc.texts == 4
    other = CountingEncoder(salt="other model")
    vecs = run(other, ["a", "b"], tmp_path, fingerprint="e" * 64)
    assert other.texts == 2
    np.testing.assert_allclose(vecs, other(["a", "b"]))


def test_disabled_store_encodes_every_time(tmp_path, monkeypatch):
    monkeypatch.setenv(embed_store.STORE_ENV, "off")
    enc = CountingEncoder()
    encode_texts(enc, ["a"], prompt="", fingerprint="f" * 64, max_seq_length=1, label="fake")
    encode_texts(enc, ["a"], prompt="", fingerprint="f" * 64, max_seq_length=1, label="fake")
    assert enc.texts == 2


@pytest.mark.parametrize("damage", ["flip_vector_byte", "truncate_keys", "bad_manifest"])
def test_corrupt_shard_is_detected_and_rebuilt(tmp_path, damage, capsys):
    enc = CountingEncoder()
    good = run(enc, ["a", "b", "c"], tmp_path)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    manifest = next(folder.glob("*.json"))
    stem = str(manifest.with_suffix(""))
    if damage == "flip_vector_byte":
        raw = bytearray(open(stem + ".vecs.npy", "rb").read())
        raw[-1] ^= 0xFF
        open(stem + ".vecs.npy", "wb").write(bytes(raw))
    elif damage == "truncate_keys":
        raw = open(stem + ".keys.npy", "rb").read()
        open(stem + ".keys.npy", "wb").write(raw[:-5])
    else:
        manifest.write_text("{not json")
    embed_store._OPEN.clear()
    again = run(enc, ["a", "b", "c"], tmp_path)
    assert enc.texts == 6  # nothing trusted from the damaged shard
    np.testing.assert_array_equal(again, good)
    assert "corrupt shard" in capsys.readouterr().err
    assert len(list(folder.glob("*.json"))) == 1  # the damaged shard is gone, the new one is there


def test_interrupted_write_is_ignored(tmp_path):
    enc = CountingEncoder()
    run(enc, ["a"], tmp_path)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    np.save(folder / "partial.keys.npy", text_keys(["b"], ""))  # no manifest: an interrupted add()
    embed_store._OPEN.clear()
    run(enc, ["a", "b"], tmp_path)
    assert enc.texts == 2


def test_compaction_keeps_every_vector(tmp_path, monkeypatch):
    monkeypatch.setattr(embed_store, "COMPACT_ABOVE", 3)
    enc = CountingEncoder()
    texts = [f"t{i}" for i in range(6)]
    vecs = [run(enc, [t], tmp_path)[0] for t in texts]
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(list(folder.glob("*.json"))) <= 3
    embed_store._OPEN.clear()
    store = EmbeddingStore(tmp_path, "f" * 64, 128)
    assert len(store) == 6
    out, hits = store.lookup(text_keys(texts, ""))
    assert hits.all()
    np.testing.assert_array_equal(out, np.array(vecs))


def test_real_model_fingerprint_and_vectors(tmp_path, minilm):
    texts = ["The pump stops at 8 bar.", "Descale every eight weeks."]
    vecs = encode_cached(minilm, texts, "", root=tmp_path)
    again = encode_cached(minilm, texts + ["new text"], "", root=tmp_path)
    log = read_encode_log(tmp_path)
    assert [(r["requested"], r["encoded"]) for r in log] == [(2, 0 + 2), (3, 1)]
    np.testing.assert_array_equal(again[:2], vecs)
    direct = minilm.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(vecs, direct, atol=1e-5)
    # Changing a weight in place changes the fingerprint once it is forgotten.
    fp = embed_store.model_fingerprint(minilm)
    param = next(minilm.parameters())
    saved = param.data.clone()
    try:
        param.data.add_(0.01)
        embed_store.forget_fingerprint(minilm)
        assert embed_store.model_fingerprint(minilm) != fp
    finally:
        param.data.copy_(saved)
        embed_store.forget_fingerprint(minilm)
    assert embed_store.model_fingerprint(minilm) == fp
    manifest = json.loads(next(tmp_path.glob("*/*.json")).read_text())
    assert manifest["dim"] == 384 and manifest["model"] == "all-MiniLM-L6-v2"
    # bf16 autocast vectors live under their own fingerprint: never served for fp32 requests, nor the reverse.
    bf16 = encode_cached(minilm, texts, "", root=tmp_path, bf16=True)
    assert read_encode_log(tmp_path)[-1]["encoded"] == 2 and len(list(tmp_path.glob("*-L*"))) == 2
    assert float((bf16 * vecs).sum(1).min()) > 0.999
    np.testing.assert_array_equal(encode_cached(minilm, texts, "", root=tmp_path), vecs)


def test_line_progress_prints_rate_and_eta():
    out = io.StringIO()
    with LineProgress(10, "encode", unit="text", interval=0.0, file=out) as bar:
        bar.update(5)
        bar.set_postfix(kept=3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("encode: 5/10 text (50%)") and "ETA" in lines[0]
    assert lines[-1].endswith("done") and "kept=3" in lines[-1]


def test_interrupted_encode_keeps_finished_chunks(tmp_path, monkeypatch):
    """A run killed mid-corpus resumes: the chunks encoded before the failure are in the store."""
    monkeypatch.setattr(embed_store, "ENCODE_CHUNK", 2)
    texts = [f"t{i}" for i in range(7)]

    class DiesOnThirdChunk(CountingEncoder):
        def __call__(self, chunk: list[str]) -> np.ndarray:
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().__call__(chunk)

    with pytest.raises(KeyboardInterrupt):
        run(DiesOnThirdChunk(), texts, tmp_path)
    embed_store._OPEN.clear()
    enc = CountingEncoder()
    out = run(enc, texts, tmp_path)
    assert enc.texts == 3  # 4 of 7 were stored before the interruption
    np.testing.assert_allclose(out, enc(texts), atol=1e-6)
