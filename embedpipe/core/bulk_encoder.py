"""The bulk encoder: corpus and query encodes on ONNX Runtime (fp32) where that is exact, else torch.

SDG's gates, prep's mining and eval encode whole corpora with the base and the fine-tuned model. On a CPU the
model's fp32 ONNX graph (`embedpipe.core.encoders.export_onnx`: ids -> normalised embedding) run by onnxruntime
gives the same vectors (cosine 1.0 to 1e-6 on real passages) about 2x faster than torch (bench/bench_encode.py).

`model.bulk_encoder` (params.yaml): `auto` = ONNX on the CPU, torch on a GPU; `onnx` = ONNX on any device;
`torch` = always torch. ONNX is used only when it is exact: the graph is exported once per model fingerprint
and sequence length into `<embedding store>/onnx/` and, in every process, the first encode's texts (a sample of
them, the longest included) are encoded by both torch and ONNX; ONNX serves only when every cosine is at least
`PARITY_COSINE_MIN`. (A call whose texts are all in the store under the ONNX fingerprint, for a graph that passed
in an earlier process, is answered from the store without a check: nothing is encoded.) Anything else (no onnxruntime, an export error, a parity miss) falls back to torch with
one printed line saying why. ONNX vectors are stored under a fingerprint of their own (`embed_store`), so the
reference checks (export parity, deploy_check), which stay torch, never compare ONNX with ONNX.

Stages opt in with `use_bulk_encoder(model, setting)`; a model never marked (training's validation, export,
deploy_check, the teacher) encodes with torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS = ("auto", "torch", "onnx")
PARITY_COSINE_MIN = 0.9999  # ONNX must match torch this closely on every sampled text (the export's fp32 gate)
PARITY_SAMPLE = 24          # texts of the first encode checked: evenly spaced + the longest
ONNX_VARIANT = "fp32"       # the plain graph: not slower than fp32_opt in every run here (export parity runs: 17.2 vs
                            # 15.8 and 70.6 vs 63.5 texts/s), and what export_onnx writes with no extra step
ATTR = "_embedpipe_bulk"    # the setting, on the model object
STATE = "_embedpipe_bulk_state"  # the resolved encoder (or the fallback reason), on the model object


def use_bulk_encoder(model: Any, setting: str | None = "auto") -> Any:
    """Mark `model` so that `embed_store.encode_cached` encodes it with the bulk encoder `setting`."""
    setting = str(setting or "auto").lower()
    if setting not in SETTINGS:
        raise ValueError(f"model.bulk_encoder must be one of {' | '.join(SETTINGS)}, got {setting!r}")
    setattr(model, ATTR, setting)
    if hasattr(model, STATE):
        delattr(model, STATE)
    return model


def onnx_fingerprint(fingerprint: str, variant: str = ONNX_VARIANT) -> str:
    """The store fingerprint of this model's ONNX vectors (hashed: the store's folder keeps only a prefix)."""
    return hashlib.sha256(f"{fingerprint}:onnx-{variant}".encode()).hexdigest()


class BulkChoice:
    """What encodes a marked model: `encoder` (an OnnxEncoder) or None (torch), and why when torch."""

    def __init__(self, encoder: Any = None, reason: str = "", parity: dict[str, Any] | None = None) -> None:
        self.encoder, self.reason, self.parity = encoder, reason, parity or {}

    @property
    def backend(self) -> str:
        return f"onnx-{ONNX_VARIANT}" if self.encoder is not None else "torch"


def graph_folder(cache_root: Path, fingerprint: str, max_seq_length: int | None) -> Path:
    return cache_root / f"{fingerprint[:24]}-L{max_seq_length or 0}"


def export_graph(model: Any, folder: Path) -> Path:
    """The model's fp32 graph in `folder` (exported once: written to a temporary folder, renamed into place)."""
    from embedpipe.core.encoders import CONFIG_FILE

    if (folder / CONFIG_FILE).is_file():
        return folder
    from embedpipe.core.encoders import export_onnx

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    device = model.device
    try:
        with warnings.catch_warnings():  # the tracer's warnings concern shapes the graph keeps dynamic
            warnings.simplefilter("ignore")
            export_onnx(model, tmp, getattr(model, "_embedpipe_name", "") or "bulk", "", "")
        try:
            tmp.rename(folder)
        except OSError:  # another process got there first: its graph is the same
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        model.to(device)  # export_onnx moves the model to the CPU
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def verified_on_disk(cache_root: Path | None, fingerprint: str, max_seq_length: int | None) -> bool:
    """Whether an earlier process exported this model's graph and it passed parity on that process's texts."""
    if cache_root is None:
        return False
    path = graph_folder(cache_root, fingerprint, max_seq_length) / "parity.json"
    try:
        return bool(json.loads(path.read_text()).get("passed"))
    except (OSError, ValueError, AttributeError):
        return False


def parity_sample(texts: list[str], n: int = PARITY_SAMPLE) -> list[str]:
    """Up to n texts: two thirds evenly spaced, the rest the longest (they exercise truncation)."""
    unique = list(dict.fromkeys(texts))
    if len(unique) <= n:
        return unique
    k = n - n // 3
    spaced = unique[:: max(1, len(unique) // k)][:k]
    chosen = set(spaced)
    longest = [t for t in sorted(unique, key=len, reverse=True) if t not in chosen]
    return spaced + longest[: n - len(spaced)]


def check_parity(model: Any, encoder: Any, texts: list[str], prompt: str) -> dict[str, Any]:
    """Cosine of ONNX vs torch on a sample of `texts` (with the prompt), and whether it passes."""
    from embedpipe.core.models import encode

    sample = parity_sample(texts)
    ref = encode(model, sample, prompt=prompt)
    got = encoder.encode(sample, prompt=prompt)
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    cos_min = float(cos.min()) if len(cos) else 1.0
    return {"texts": len(sample), "cosine_min": round(cos_min, 7), "passed": bool(cos_min >= PARITY_COSINE_MIN)}


def _reason_not_onnx(model: Any, setting: str) -> str | None:
    """Why this model encodes with torch before anything is tried, or None to try ONNX."""
    if setting == "torch":
        return "model.bulk_encoder: torch"
    device = getattr(getattr(model, "device", None), "type", "cpu")
    if setting == "auto" and device != "cpu":
        return f"model.bulk_encoder auto: torch on {device}"
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"onnxruntime is not installed ({e})"
    return None


def resolve(model: Any, texts: list[str], prompt: str, fingerprint: str, cache_root: Path | None) -> BulkChoice:
    """The encoder for a marked model, decided once per process (on the first encode's texts), then memoised."""
    from embedpipe.core.console import warn

    choice = getattr(model, STATE, None)
    if choice is not None:
        return choice
    setting = getattr(model, ATTR, "torch")
    reason = _reason_not_onnx(model, setting)
    parity: dict[str, Any] = {}
    encoder = None
    if reason is None:
        try:
            from embedpipe.core.encoders import OnnxEncoder

            root = cache_root if cache_root is not None else Path(tempfile.mkdtemp(prefix="embedpipe-onnx-"))
            folder = graph_folder(root, fingerprint, getattr(model, "max_seq_length", None))
            t0 = time.perf_counter()
            export_graph(model, folder)
            encoder = OnnxEncoder(folder, ONNX_VARIANT, device="cpu")
            parity = check_parity(model, encoder, texts, prompt)
            parity["setup_s"] = round(time.perf_counter() - t0, 2)
            if not parity["passed"]:
                reason = (f"ONNX parity failed: cosine min {parity['cosine_min']} < {PARITY_COSINE_MIN} "
                          f"on {parity['texts']} texts")
                encoder = None
            else:
                (folder / "parity.json").write_text(json.dumps({**parity, "time": round(time.time())}) + "\n")
        except Exception as e:  # noqa: BLE001 - any export/runtime failure: torch still encodes
            reason, encoder = f"ONNX unavailable ({type(e).__name__}: {str(e)[:200]})", None
    choice = BulkChoice(encoder, reason or "", parity)
    label = getattr(model, "_embedpipe_name", None) or type(model).__name__
    if encoder is None and setting != "torch" and not reason.startswith("model.bulk_encoder auto"):
        warn(f"bulk encoder for {label}: torch ({reason})")
    try:
        setattr(model, STATE, choice)
    except AttributeError:
        pass
    return choice
