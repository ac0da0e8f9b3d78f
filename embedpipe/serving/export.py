"""Export a sentence-transformers model to ONNX, derive int8 / fp16 / TensorRT variants, check their parity.

The exported graph goes from token ids to the final normalised sentence embedding (transformer, pooling,
normalisation all inside), so any runtime (onnxruntime, Triton, TensorRT) needs only a tokenizer beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.core.encoders import (  # noqa: F401
    CONFIG_FILE,
    OUTPUT_NAME,
    VARIANTS,
    export_onnx,
    input_names,
    model_prompts,
    padded_batches,
)


def set_default_variant(out_dir: str | Path, variant: str) -> None:
    """Record in embedpipe.json the variant `serve.variant: auto` serves (the fastest that passed parity)."""
    path = Path(out_dir) / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    config["default_variant"] = variant
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def quantize_int8(src: str | Path, dst: str | Path, exclude: Sequence[str] = (), reduce_range: bool = True) -> Path:
    """Dynamic int8 quantisation of the MatMul weights, per channel, leaving the `exclude` MatMuls in fp32.

    Per-tensor/all-ops quantize_dynamic drops cosine to ~0.96 on real text; per-channel MatMul-only gives ~0.99,
    still too far for retrieval (metric drift 0.03 on a real corpus). reduce_range (7-bit weights) avoids the
    u8*s8 pair-sum saturation of AVX2 int8 kernels (VPMADDUBSW) on CPUs without VNNI; keeping the few MatMuls
    whose inputs carry outliers (see matmul_sensitivity) in fp32 removes most of the remaining error.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, reduce_range=reduce_range, op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))
    return Path(dst)


def quantize_int8_blockwise(src: str | Path, dst: str | Path, block_size: int = 32) -> Path:
    """8-bit weights in blocks of block_size along the reduction axis, int8 compute (MatMulNBits, accuracy_level 4).

    With accuracy_level 4 onnxruntime also quantises the activations block by block, not with one scale per
    tensor as dynamic int8 does, so one outlier only coarsens its own block: MiniLM cosine vs fp32 0.9996
    where per-tensor dynamic int8 gives 0.985 (0.996 with the 6 worst MatMuls kept fp32). Needs onnx-ir.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    return Path(dst)


def weight_matmuls(model: Any) -> list[Any]:
    """The MatMul nodes of an onnx.ModelProto whose second input is a weight (what dynamic int8 quantises)."""
    weights = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def int8_matmul_error(x: np.ndarray, w: np.ndarray, reduce_range: bool = True, max_rows: int = 256) -> float:
    """Relative error ||XW - Q(X)Q(W)|| / ||XW|| of one MatMul as onnxruntime's dynamic int8 computes it.

    Activations: uint8, asymmetric, one scale per tensor (DynamicQuantizeLinear, so the scale comes from the
    whole tensor); weights: int8, symmetric, one scale per output column (per_channel), 7 bits with
    reduce_range. The error is estimated on at most max_rows evenly spaced rows (keeps it cheap).
    """
    x2 = x.reshape(-1, x.shape[-1])
    lo, hi = min(float(x2.min()), 0.0), max(float(x2.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / scale)
    x2 = x2[:: max(1, len(x2) // max_rows)].astype(np.float32)
    xq = (np.clip(np.round(x2 / scale) + zero, 0, 255) - zero) * np.float32(scale)
    qmax = 63 if reduce_range else 127
    w = w.astype(np.float32)
    w_scale = np.abs(w).max(axis=0, keepdims=True) / qmax
    w_scale[w_scale == 0] = 1.0
    wq = np.clip(np.round(w / w_scale), -qmax, qmax) * w_scale
    y = x2 @ w
    return float(np.linalg.norm(xq @ wq - y) / max(float(np.linalg.norm(y)), 1e-12))


def matmul_sensitivity(src: str | Path, feeds: Sequence[dict[str, np.ndarray]],
                       reduce_range: bool = True) -> dict[str, float]:
    """Mean relative int8 error of each weight MatMul on real activations, largest first.

    One fp32 run with every MatMul input exposed as an output, then each MatMul's int8 error computed alone
    (no accumulation from earlier layers), so the ranking says which layers quantisation hurts, not where
    errors happen to land.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    nodes = weight_matmuls(model)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
               if i.name in {n.input[1] for n in nodes}}
    outputs = {o.name for o in model.graph.output}
    for name in dict.fromkeys(n.input[0] for n in nodes):
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    errors: dict[str, list[float]] = {n.name: [] for n in nodes}
    for feed in feeds:
        acts = dict(zip([n.input[0] for n in nodes],
                        session.run([n.input[0] for n in nodes], {k: v for k, v in feed.items() if k in wanted})))
        for n in nodes:
            errors[n.name].append(int8_matmul_error(acts[n.input[0]], weights[n.input[1]], reduce_range))
    mean = {k: float(np.mean(v)) for k, v in errors.items()}
    return dict(sorted(mean.items(), key=lambda kv: -kv[1]))


def calibration_feeds(model: Any, passages: Sequence[str], prompt: str, n: int,
                      batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Token-id batches of up to n of the corpus' own passages (evenly spaced), as the graph takes them."""
    step = max(1, len(passages) // max(n, 1))
    texts = [prompt + t for t in list(passages)[::step][:n]]
    ids = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    pad = model.tokenizer.pad_token_id or 0
    return [{"input_ids": i, "attention_mask": m, "token_type_ids": np.zeros_like(i)}
            for _, i, m in padded_batches(ids, batch_size, pad)]


def build_int8(model: Any, out_dir: str | Path, passages: Sequence[str], prompt: str, fp32_matmuls: int = 6,
               reduce_range: bool = True, calibration_passages: int = 64) -> dict[str, Any]:
    """OUT/model_int8.onnx from OUT/model.onnx: dynamic int8, the `fp32_matmuls` MatMuls with the largest
    int8 error (measured on `passages`) kept in fp32. Returns what was done, for the metrics."""
    out_dir = Path(out_dir)
    excluded: list[str] = []
    info: dict[str, Any] = {"reduce_range": reduce_range}
    if fp32_matmuls > 0:
        feeds = calibration_feeds(model, passages, prompt, calibration_passages)
        errors = matmul_sensitivity(out_dir / VARIANTS["fp32"], feeds, reduce_range)
        excluded = list(errors)[:fp32_matmuls]
        info["calibration_passages"] = sum(len(f["input_ids"]) for f in feeds)
        info["matmul_int8_error"] = {k: round(v, 5) for k, v in list(errors.items())[: fp32_matmuls + 3]}
    quantize_int8(out_dir / VARIANTS["fp32"], out_dir / VARIANTS["int8"], excluded, reduce_range)
    info["fp32_matmuls"] = excluded
    return info


def optimize_fp32(src: str | Path, dst: str | Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """onnxruntime's transformer optimizer (model_type bert): fused attention, (Skip)LayerNorm, Gelu; fp32.

    Returns the fused-operator counts, so the stage can say when nothing fused (a new architecture).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0)
    optimized.save_model_to_file(str(dst))
    return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and activations with fp32 inputs/outputs (for GPUs), via onnxruntime's own converter."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return Path(dst)


def cosine_parity(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Row-wise cosine between two sets of (normalised) embeddings of the same texts."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    oth = other / np.linalg.norm(other, axis=1, keepdims=True)
    cos = np.sum(ref * oth, axis=1)
    return {"cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6),
            "max_abs_diff": round(float(np.abs(reference - other).max()), 6)}


def metric_drift(reference: dict[str, float], other: dict[str, float], min_k: int = 5) -> float:
    """Largest absolute difference over the metrics at cut-off >= min_k (the noisy @1 is left out)."""
    diffs = [abs(reference[m] - other[m]) for m in reference
             if m in other and "@" in m and int(m.split("@")[1]) >= min_k]
    return round(max(diffs), 6) if diffs else 0.0


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def file_mb(path: str | Path) -> float:
    """Size of a file, or of every file in a folder, in MiB."""
    path = Path(path)
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return round(sum(os.path.getsize(f) for f in files) / 2**20, 2)


# --- TensorRT ---------------------------------------------------------------------------------------------


def tensorrt_status() -> str | None:
    """None when a TensorRT build can run here, else the one-line reason it cannot."""
    import onnxruntime as ort

    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        return "no CUDA GPU on this machine"
    if "TensorrtExecutionProvider" not in ort.get_available_providers() and shutil.which("trtexec") is None:
        return "neither onnxruntime's TensorrtExecutionProvider (onnxruntime-gpu + tensorrt) nor trtexec is installed"
    return None


def tensorrt_shapes(names: Sequence[str], max_batch: int, max_len: int, opt_batch: int = 16) -> dict[str, str]:
    """Optimisation profile strings (min/opt/max) in the `name:BxS,...` form both trtexec and ORT take."""
    opt_len = max(1, max_len // 2)

    def fmt(b: int, s: int) -> str:
        return ",".join(f"{n}:{b}x{s}" for n in names)

    return {"min": fmt(1, 1), "opt": fmt(min(opt_batch, max_batch), opt_len), "max": fmt(max_batch, max_len)}


def tensorrt_provider_options(cache_dir: str | Path, names: Sequence[str], max_batch: int, max_len: int,
                              fp16: bool = True) -> dict[str, Any]:
    """Options for onnxruntime's TensorrtExecutionProvider: one cached engine for the whole profile."""
    shapes = tensorrt_shapes(names, max_batch, max_len)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return {
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_profile_min_shapes": shapes["min"],
        "trt_profile_opt_shapes": shapes["opt"],
        "trt_profile_max_shapes": shapes["max"],
    }


def build_trt_plan(onnx_path: str | Path, plan_path: str | Path, names: Sequence[str], max_batch: int,
                   max_len: int, fp16: bool = True, fp8: bool = False) -> Path:
    """A standalone serialized engine (for Triton's tensorrt_plan backend) built with trtexec.

    fp8 needs an explicitly quantised (Q/DQ) ONNX graph, e.g. from NVIDIA ModelOpt, and an Ada/Hopper GPU;
    with a plain graph trtexec's --fp8 only allows fp8 kernels where it finds them.
    """
    shapes = tensorrt_shapes(names, max_batch, max_len)
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}", f"--minShapes={shapes['min']}",
           f"--optShapes={shapes['opt']}", f"--maxShapes={shapes['max']}"]
    cmd += ["--fp16"] if fp16 else []
    cmd += ["--fp8"] if fp8 else []
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return Path(plan_path)


# --- Triton -----------------------------------------------------------------------------------------------


def write_triton_repo(onnx_path: str | Path, repo_dir: str | Path, name: str, names: Sequence[str],
                      dimension: int, max_batch: int = 64, queue_delay_us: int = 2000) -> Path:
    """A Triton model repository: REPO/NAME/1/model.onnx + REPO/NAME/config.pbtxt (onnxruntime backend).

    Triton serves token ids (tokenize client-side with the tokenizer in models/onnx/) and returns the
    normalised embedding; dynamic batching merges concurrent requests.
    """
    model_dir = Path(repo_dir) / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.onnx"
    target.unlink(missing_ok=True)
    try:
        os.link(onnx_path, target)
    except OSError:
        shutil.copyfile(onnx_path, target)
    inputs = "\n".join(
        f'  {{ name: "{n}" data_type: TYPE_INT64 dims: [ -1 ] }}{"," if i < len(names) - 1 else ""}'
        for i, n in enumerate(names)
    )
    config = (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch}\n"
        f"input [\n{inputs}\n]\n"
        f'output [\n  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {dimension} ] }}\n]\n'
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
    )
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    return model_dir
