"""Stage `export`: models/finetuned -> models/onnx (fp32, optimised fp32, int8_block; fp16 and TensorRT on a GPU;
dynamic int8 on request; Triton).

Only variants that can win on this machine are built (`variant_plan`): no fp16 without a GPU, no dynamic int8
unless `export.int8: true`, torch_bf16 only on CPUs with native bfloat16; each skipped variant is named with its
reason in the summary and in metrics/export.json (`variants.<name>.skipped`, `skipped_variants`).

Every variant is checked against the PyTorch model on the test set (cosine per text, and the retrieval
metrics through the same code as the eval stage); the fp32 graph failing its check fails the stage, any other
variant failing its check is dropped. On CPUs with native bfloat16 (AVX-512 BF16 / AMX) the torch model under bf16
autocast is checked the same way (`torch_bf16`, saved to OUT/torch/ when it passes). The fastest batch-invariant
CPU variant that passed (not dynamic int8) becomes the served default (`default_variant` in embedpipe.json, used by
`serve.variant: auto`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm import tqdm

from embedpipe.core.console import alert, console, summary, warn
from embedpipe.core.embed_store import encode_cached, encode_counts
from embedpipe.core.encoders import (
    BATCH_DEPENDENT,
    CPU_VARIANTS,
    TORCH_DIR,
    TORCH_VARIANT,
    VARIANTS,
    OnnxEncoder,
    TorchEncoder,
)
from embedpipe.core.io import FormatError, load_beir, load_corpus, passage_text, write_json
from embedpipe.core.models import BF16_SWITCH, ModelNotAvailable, cpu_has_bf16, encode, load_model
from embedpipe.core.params import load_params, section
from embedpipe.core.retrieval import bounded_corpus, retrieve
from embedpipe.evaluation.metrics import evaluate
from embedpipe.evaluation.user_questions import shipping_verdict
from embedpipe.serving.export import (
    build_int8,
    build_trt_plan,
    convert_fp16,
    cosine_parity,
    export_onnx,
    file_mb,
    input_names,
    metric_drift,
    model_prompts,
    optimize_fp32,
    quantize_int8_blockwise,
    set_default_variant,
    tensorrt_provider_options,
    tensorrt_status,
    timed,
    write_triton_repo,
)


def load_texts(eval_dir: Path, fallback_corpus: Path, max_passages: int = 0, seed: int = 0) -> dict[str, Any]:
    """The test set (for cosine AND retrieval parity) or, without one, any passages (cosine only).

    Every ONNX variant encodes these texts, so a big test corpus is cut to its relevant passages + a fixed
    sample up to `max_passages` (export.parity_max_passages): 5 variants x 5,000 passages is an hour on 2 cores.
    """
    try:
        corpus, queries, qrels = load_beir(eval_dir)
        relevant = {pid for docs in qrels.values() for pid in docs if pid in corpus}
        ids, _ = bounded_corpus(list(corpus), relevant, max_passages, seed)
        return {"source": str(eval_dir), "corpus_ids": ids, "query_ids": list(queries), "qrels": qrels,
                "passages": [passage_text(corpus[pid]) for pid in ids],
                "queries": [q["text"] for q in queries.values()], "corpus_total": len(corpus)}
    except FormatError as e:
        warn(f"no usable test set ({e}); checking cosine parity on {fallback_corpus} only, no retrieval metrics")
    if not fallback_corpus.is_file():
        raise click.ClickException(f"no texts to check parity on: neither {eval_dir} nor {fallback_corpus} exists")
    corpus = load_corpus(fallback_corpus)
    ids, _ = bounded_corpus(list(corpus), set(), max_passages, seed)
    return {"source": str(fallback_corpus), "corpus_ids": ids, "query_ids": [], "qrels": None,
            "passages": [passage_text(corpus[pid]) for pid in ids], "queries": [], "corpus_total": len(corpus)}


def has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def variant_plan(cfg: dict[str, Any], gpu: bool, native_bf16: bool) -> tuple[dict[str, bool], dict[str, str]]:
    """Which optional variants to build ({variant: True}) and which to skip ({variant: reason}).

    Only what can win on this machine is built by default: fp16 needs a GPU (on a CPU its kernels are slower than
    fp32's), dynamic int8 only on request (its vectors depend on the batch, so it is never the served default),
    torch_bf16 only on CPUs with native bfloat16 (emulated bf16 is slow). Each reason names the key that asks anyway.
    """
    build: dict[str, bool] = {}
    skipped: dict[str, str] = {}

    def flag(key: str, default: Any) -> str:
        value = cfg.get(key, default)
        return str(value).lower() if not isinstance(value, bool) else ("true" if value else "false")

    if flag("optimize", True) == "true":
        build["fp32_opt"] = True
    else:
        skipped["fp32_opt"] = "export.optimize: false"
    if flag("int8", False) == "true":
        build["int8"] = True
    else:
        skipped["int8"] = ("dynamic int8 is built only on request (export.int8: true): its vectors depend on the "
                           "batch, so it is never the served default")
    if flag("int8_block", True) == "true":
        build["int8_block"] = True
    else:
        skipped["int8_block"] = "export.int8_block: false"
    fp16 = flag("fp16", "auto")
    if fp16 == "true" or (fp16 == "auto" and gpu):
        build["fp16"] = True
    else:
        skipped["fp16"] = ("no CUDA GPU here: fp16 serves GPUs (export.fp16: true builds it anyway)" if fp16 == "auto"
                           else "export.fp16: false")
    bf16 = flag("torch_bf16", "auto")
    if bf16 == "true" or (bf16 == "auto" and native_bf16):
        build[TORCH_VARIANT] = True
    elif bf16 == "auto":
        off = os.environ.get(BF16_SWITCH, "").strip().lower() in ("off", "0", "false", "no")
        skipped[TORCH_VARIANT] = (f"{BF16_SWITCH}=off: bfloat16 is treated as emulated" if off else
                                  "this CPU has no native bfloat16 (AVX-512 BF16 / AMX)") + \
            "; export.torch_bf16: true checks it anyway"
    else:
        skipped[TORCH_VARIANT] = "export.torch_bf16: false"
    return build, skipped


def run_encoder(fn, data: dict[str, Any], query_prompt: str, passage_prompt: str) -> tuple[np.ndarray, float, dict]:
    """Encode passages + queries with fn(texts, prompt); return (all rows, seconds, retrieval metrics or {})."""
    (p, q), seconds = timed(lambda: (fn(data["passages"], passage_prompt), fn(data["queries"], query_prompt)))
    metrics = {}
    if data["qrels"]:
        metrics = evaluate(data["qrels"], retrieve(q, p, data["query_ids"], data["corpus_ids"], k=100))
    return np.concatenate([p, q]), seconds, metrics


def torch_reference(model: Any, data: dict[str, Any], query_prompt: str, passage_prompt: str,
                    timing_texts: int = 32) -> tuple[np.ndarray, float, dict, dict[str, Any]]:
    """PyTorch vectors for the parity check, read from the embedding store where a torch encode put them (eval
    with `model.bulk_encoder: torch`, an earlier export), else encoded here.

    Returns (rows, torch seconds for all texts, retrieval metrics, info). When the store had (nearly) every
    vector, torch's speed is measured on `timing_texts` texts spread over the set, not by encoding it all again.
    """
    label = getattr(model, "_embedpipe_name", None) or "torch"
    before = encode_counts().get(label, {}).get("encoded", 0)
    t0 = time.perf_counter()
    p = encode_cached(model, data["passages"], passage_prompt, desc="export: torch reference", kind="passage")
    q = encode_cached(model, data["queries"], query_prompt, desc="export: torch reference", kind="query")
    seconds = time.perf_counter() - t0
    encoded = encode_counts().get(label, {}).get("encoded", 0) - before
    n_texts = len(data["passages"]) + len(data["queries"])
    if encoded >= timing_texts:
        rate, measured_on = encoded / seconds, encoded
    else:
        texts = [passage_prompt + t for t in data["passages"]] + [query_prompt + t for t in data["queries"]]
        sample = texts[:: max(1, len(texts) // timing_texts)][:timing_texts]
        _, sample_s = timed(lambda: encode(model, sample))
        rate, measured_on = len(sample) / sample_s, len(sample)
    metrics = {}
    if data["qrels"]:
        metrics = evaluate(data["qrels"], retrieve(q, p, data["query_ids"], data["corpus_ids"], k=100))
    info = {"vectors": "embedding store", "encoded": encoded, "reused": n_texts - encoded,
            "speed_measured_on_texts": measured_on}
    return np.concatenate([p, q]), n_texts / rate, metrics, info


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Params file.")
@click.option("--model-in", default=None, help="Model folder or name to export (overrides export.input).")
@click.option("--out", "out_dir", default=None, help="Output folder (overrides export.out_dir).")
@click.option("--eval-dir", default=None, help="BEIR test set for the parity check (overrides export.eval_dir).")
@click.option("--metrics", "metrics_path", default="metrics/export.json", show_default=True)
@click.option("--eval-metrics", default="metrics/eval.json", show_default=True,
              help="Eval's metrics: a model worse than base on your own questions (user_questions) is not exported.")
def main(params_path: str, model_in: str | None, out_dir: str | None, eval_dir: str | None, metrics_path: str,
         eval_metrics: str) -> None:
    """Export the fine-tuned model to ONNX (one graph: token ids -> normalised embedding) and check parity.

    Writes OUT/model.onnx, OUT/model_opt.onnx, OUT/model_int8_block.onnx (on request OUT/model_int8.onnx; with a GPU
    OUT/model_fp16.onnx), each kept only
    when its check passes), on CPUs with native bfloat16 OUT/torch/ (the torch_bf16 variant, when it passes),
    the tokenizer, OUT/embedpipe.json (prompts, max length, dimension, name, the served default), OUT/triton/
    (a Triton model repository) and, on a GPU with TensorRT, an engine. Fails when the fp32 graph does not match,
    and refuses to start when eval found the model worse than base on your own questions (user_questions in
    --eval-metrics) unless eval.user_questions_allow_regression is true.
    """
    started = time.time()
    params = load_params(params_path)
    cfg, mcfg = section(params, "export"), section(params, "model")
    source = model_in or cfg["input"]
    allow = bool((params.get("eval") or {}).get("user_questions_allow_regression", False))
    ship, why = shipping_verdict(eval_metrics, allow, source)
    if not ship:
        alert(f"NOT EXPORTED: {why}")
        sys.exit(1)
    console.print(f"your questions: {why}")
    out = Path(out_dir or cfg["out_dir"])
    try:
        model = load_model(source, device="cpu", max_seq_length=mcfg["max_seq_length"])
    except ModelNotAvailable as e:
        raise click.ClickException(str(e)) from None
    query_prompt, passage_prompt = model_prompts(model, mcfg.get("query_prompt", ""), mcfg.get("passage_prompt", ""))
    name = cfg.get("model_name") or Path(source).name
    if out.exists() and any(out.iterdir()):
        if not (out / "embedpipe.json").is_file():
            raise click.ClickException(f"{out} exists and is not an earlier export: refusing to overwrite it")
        shutil.rmtree(out)  # a stale variant must not survive a new export

    with console.status("exporting to ONNX"):
        _, export_s = timed(lambda: export_onnx(model, out, name, query_prompt, passage_prompt, int(cfg["opset"])))
    names = input_names(model)
    data = load_texts(Path(eval_dir or cfg["eval_dir"]), Path(cfg["fallback_corpus"]),
                      int(cfg.get("parity_max_passages") or 0), int(cfg.get("parity_seed") or 0))
    n_texts = len(data["passages"]) + len(data["queries"])
    if n_texts < int(cfg["min_parity_texts"]):
        warn(f"parity is checked on only {n_texts} texts (< {cfg['min_parity_texts']}): a larger test set is safer")

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's "consider pre-processing" advice
    variants, build, wanted, skipped, trt_reason = build_variants(model, out, cfg, data, passage_prompt)
    report, ref_info = check_variants(model, out, cfg, data, variants, build, wanted, skipped, trt_reason, names,
                                      name, query_prompt, passage_prompt)
    tol, cos_min = float(cfg["metric_tolerance"]), float(cfg["cosine_min"])
    passed = [v for v in CPU_VARIANTS if v not in BATCH_DEPENDENT and report.get(v, {}).get("passed")]
    default = max(passed, key=lambda v: report[v]["texts_per_s"]) if passed else "fp32"
    set_default_variant(out, default)

    triton_name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    triton = write_triton_repo(out / VARIANTS["fp32"], out / "triton", triton_name, names,
                               model.get_embedding_dimension(), int(cfg["triton"]["max_batch"]),
                               int(cfg["triton"]["queue_delay_us"]))
    result = {"model_name": name, "source": source, "opset": int(cfg["opset"]), "export_s": round(export_s, 2),
              "max_seq_length": model.max_seq_length, "dimension": model.get_embedding_dimension(),
              "parity_texts": n_texts, "parity_passages": len(data["passages"]),
              "parity_corpus_passages": data["corpus_total"], "parity_source": data["source"],
              "cosine_min_required": cos_min,
              "metric_tolerance": tol, "default_variant": default, "variants": report,
              "skipped_variants": {v: e["skipped"] for v, e in report.items() if "skipped" in e},
              "triton_repo": str(triton),
              "wall_time_s": round(time.time() - started, 2)}
    write_json(metrics_path, result)

    rows = summary_rows(report, name, n_texts, data, ref_info, default, triton, result["wall_time_s"])
    summary("export", rows)
    if not report["fp32"]["passed"]:
        alert(f"ONNX fp32 does not match PyTorch (cosine min {report['fp32']['cosine_min']}, required {cos_min}; "
              f"metric drift {report['fp32'].get('metric_max_drift')}, allowed {tol})")
        sys.exit(1)


def build_variants(model: Any, out: Path, cfg: dict, data: dict,
                   passage_prompt: str) -> tuple[list[str], dict, dict, dict, str | None]:
    """Build the variants this machine can use next to OUT/model.onnx -> (variants, build notes, wanted, skipped
    with reasons, why TensorRT is not built or None)."""
    variants = ["fp32"]
    build: dict[str, dict[str, Any]] = {}
    wanted, skipped = variant_plan(cfg, has_cuda(), cpu_has_bf16())
    for variant, reason in skipped.items():
        console.print(f"{variant}: skipped ({reason})")
    if wanted.get("fp32_opt"):
        hf = getattr(model[0], "auto_model", None)
        heads, hidden = (getattr(hf.config, "num_attention_heads", 0), getattr(hf.config, "hidden_size", 0)) if hf else (0, 0)
        try:
            with console.status("optimising the fp32 graph (onnxruntime transformer optimizer)"):
                build["fp32_opt"] = {"fused": optimize_fp32(out / VARIANTS["fp32"], out / VARIANTS["fp32_opt"],
                                                            heads, hidden)}
            variants.append("fp32_opt")
        except Exception as e:  # an architecture the optimizer does not know: fp32 still serves
            warn(f"fp32_opt: the transformer optimizer failed ({type(e).__name__}: {e}); skipped")
            skipped["fp32_opt"] = f"the transformer optimizer failed ({type(e).__name__})"
    if wanted.get("int8"):
        calib = load_corpus(Path(cfg["fallback_corpus"])) if Path(cfg["fallback_corpus"]).is_file() else {}
        calib_texts = [passage_text(r) for r in calib.values()] or data["passages"]
        with console.status("int8: measuring per-MatMul sensitivity and quantising"):
            build["int8"] = build_int8(model, out, calib_texts, passage_prompt, int(cfg["int8_fp32_matmuls"]),
                                       bool(cfg["int8_reduce_range"]), int(cfg["calibration_passages"]))
        variants.append("int8")
    if wanted.get("int8_block"):
        with console.status("int8_block: block-wise int8 (MatMulNBits)"):
            quantize_int8_blockwise(out / VARIANTS["fp32"], out / VARIANTS["int8_block"], int(cfg["int8_block_size"]))
        build["int8_block"] = {"block_size": int(cfg["int8_block_size"])}
        variants.append("int8_block")
    if wanted.get("fp16"):
        convert_fp16(out / VARIANTS["fp32"], out / VARIANTS["fp16"])
        variants.append("fp16")
    trt_reason = tensorrt_status() if cfg["tensorrt"]["enabled"] else "disabled in params (export.tensorrt.enabled)"
    if trt_reason is None:
        variants.append("tensorrt")
    else:
        console.print(f"TensorRT: skipped ({trt_reason})")

    return variants, build, wanted, skipped, trt_reason


def check_variants(model: Any, out: Path, cfg: dict, data: dict, variants: list[str], build: dict, wanted: dict,
                   skipped: dict, trt_reason: str | None, names: list[str], name: str, query_prompt: str,
                   passage_prompt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parity of every variant against torch (variants failing theirs are deleted) -> (report, torch vectors' info)."""
    n_texts = len(data["passages"]) + len(data["queries"])
    threads = int(cfg.get("threads", 0))
    # Torch vectors (never the bulk encoder's ONNX ones: another fingerprint) from the store, else encoded here.
    ref, torch_s, ref_metrics, ref_info = torch_reference(model, data, query_prompt, passage_prompt)
    report: dict[str, Any] = {"torch": {"seconds": round(torch_s, 3), "texts_per_s": round(n_texts / torch_s, 1),
                                        "metrics": ref_metrics, **ref_info}}
    tol, cos_min = float(cfg["metric_tolerance"]), float(cfg["cosine_min"])

    def check(variant: str, encode_fn, size_mb: float) -> dict[str, Any]:
        """Parity of one variant against the torch vectors: cosine per text, metric drift, speed."""
        encode_fn(data["passages"][:2])  # warm-up (TensorRT builds its engine here)
        emb, seconds, metrics = run_encoder(encode_fn, data, query_prompt, passage_prompt)
        entry = {"file_mb": size_mb, **cosine_parity(ref, emb), "speed_vs_torch": round(torch_s / seconds, 2),
                 "texts_per_s": round(n_texts / seconds, 1), "metrics": metrics, **build.get(variant, {})}
        if metrics:
            entry["metric_max_drift"] = metric_drift(ref_metrics, metrics)
            ok = entry["metric_max_drift"] <= tol and (variant != "fp32" or entry["cosine_min"] >= cos_min)
        else:
            ok = entry["cosine_min"] >= (cos_min if variant == "fp32" else float(cfg["quantized_cosine_min"]))
        entry["passed"] = bool(ok)
        return entry

    for variant in tqdm(variants, desc="parity", unit="variant", disable=None):
        if variant == "tensorrt":
            opts = tensorrt_provider_options(out / "trt_cache", names, int(cfg["tensorrt"]["max_batch"]),
                                             model.max_seq_length, bool(cfg["tensorrt"]["fp16"]))
            encoder = OnnxEncoder(out, "fp32", device="tensorrt", provider_options=opts)
            path = out / VARIANTS["fp32"]
        else:
            device = "cuda" if variant == "fp16" and cfg.get("fp16_device") == "cuda" else "cpu"
            try:
                encoder = OnnxEncoder(out, variant, device=device, threads=threads)
            except Exception as e:  # e.g. fp16 kernels missing on this CPU build
                warn(f"{variant}: cannot run here ({type(e).__name__}: {e}); kept unchecked")
                report[variant] = {"file_mb": file_mb(out / VARIANTS[variant]), "checked": False}
                continue
            path = out / VARIANTS[variant]
        report[variant] = entry = check(variant, encoder.encode, file_mb(path))
        if not entry["passed"] and variant in ("fp32_opt", "int8", "int8_block", "fp16"):
            warn(f"{variant} failed its parity check (see metrics): dropped")
            (out / VARIANTS[variant]).unlink()
    if wanted.get(TORCH_VARIANT):
        with console.status("torch_bf16: parity under bfloat16 autocast"):
            entry = check(TORCH_VARIANT, TorchEncoder(model, name, query_prompt, passage_prompt, bf16=True).encode, 0.0)
        if entry["passed"]:
            model.save(str(out / TORCH_DIR))
            entry["file_mb"] = file_mb(out / TORCH_DIR)
        else:
            warn(f"{TORCH_VARIANT} failed its parity check (see metrics): not saved")
        report[TORCH_VARIANT] = entry
    for variant, reason in skipped.items():
        report[variant] = {"skipped": reason}
    if report.get("tensorrt", {}).get("passed") and shutil.which("trtexec"):
        plan = build_trt_plan(out / VARIANTS["fp32"], out / "model.plan", names, int(cfg["tensorrt"]["max_batch"]),
                              model.max_seq_length, bool(cfg["tensorrt"]["fp16"]), bool(cfg["tensorrt"]["fp8"]))
        report["tensorrt"]["plan_mb"] = file_mb(plan)
    elif trt_reason is not None:
        report["tensorrt"] = {"skipped": trt_reason}

    return report, ref_info


def summary_rows(report: dict, name: str, n_texts: int, data: dict, ref_info: dict, default: str, triton: Any,
                 wall_s: float) -> dict[str, Any]:
    """The export summary: one line per variant with its verdict."""
    rows: dict[str, Any] = {"model": name,
                            "texts checked": f"{n_texts} ({len(data['passages'])} of {data['corpus_total']} passages)",
                            "torch texts/s": report["torch"]["texts_per_s"],
                            "torch vectors": f"{ref_info['reused']} from the embedding store, "
                                             f"{ref_info['encoded']} encoded",
                            "variant": "verdict: size, cosine min, metric drift @5+, speed vs torch"}
    for variant, entry in report.items():
        if variant == "torch":
            continue
        if "skipped" in entry:
            rows[variant] = f"skipped: {entry['skipped']}"
        elif not entry.get("checked", True):
            rows[variant] = f"{entry['file_mb']} MB, not checked here"
        else:
            drift = f", metric drift {entry['metric_max_drift']:.4f}" if "metric_max_drift" in entry else ""
            verdict = "kept" if entry["passed"] else "FAILED"
            rows[variant] = (f"{verdict}: {entry['file_mb']} MB, cos min {entry['cosine_min']:.5f}{drift}, "
                             f"{entry['speed_vs_torch']}x")
    rows["default variant"] = f"{default} (fastest batch-invariant CPU variant within tolerance; serve.variant auto)"
    rows["triton repo"] = str(triton)
    rows["wall time s"] = wall_s
    return rows


if __name__ == "__main__":
    sys.exit(main())
