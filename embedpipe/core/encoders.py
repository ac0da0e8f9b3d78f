"""Encode text with an exported `models/onnx/` folder: tokenizer + onnxruntime session, no torch needed.

`OnnxEncoder.encode(texts, prompt)` has the same meaning as `embedpipe.core.models.encode`: the prompt is
prefixed, inputs are truncated to the model's max_seq_length, and rows come back L2-normalised float32.
The graph itself does pooling and normalisation (`export_onnx` below), so this file only pads.
`TorchEncoder` offers the same interface over a SentenceTransformer, so the server and the benchmarks can
swap backends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = {"fp32": "model.onnx", "fp32_opt": "model_opt.onnx", "int8": "model_int8.onnx",
            "int8_block": "model_int8_block.onnx", "fp16": "model_fp16.onnx"}
# torch_bf16: the fine-tuned weights saved next to the graphs (OUT/torch/), run by torch under bfloat16 autocast; the
# fastest CPU path on CPUs with AVX-512 BF16 / AMX (`embedpipe.core.models.cpu_has_bf16`), emulated and slow elsewhere.
TORCH_VARIANT, TORCH_DIR = "torch_bf16", "torch"
CPU_VARIANTS = ("fp32", "fp32_opt", "int8", "int8_block", TORCH_VARIANT)  # candidates for the CPU default (fp16: GPUs)
# Dynamic int8 quantises each MatMul input with one scale over the whole batch tensor, so a text's vector depends on
# the texts that share its batch: parity measured in the export's batching does not hold under the server's
# (measured: drift 0.008 in export, 0.020 served over HTTP). Served only when asked for (serve.variant: int8).
# int8_block's activation scales are per row and block, so it is batch-invariant.
BATCH_DEPENDENT = frozenset({"int8"})
CONFIG_FILE = "embedpipe.json"
log = logging.getLogger("embedpipe.serving.server")


class ExportNotFound(FileNotFoundError):
    """The ONNX folder or the requested variant does not exist; the message says how to make it."""


def read_export_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ExportNotFound(f"{path} not found: run the export stage first (`dvc repro export`)")
    return json.loads(path.read_text(encoding="utf-8"))


def variant_path(folder: str | Path, variant: str) -> Path:
    """Where an export keeps a variant: its .onnx file, or the torch folder for torch_bf16."""
    return Path(folder) / (TORCH_DIR if variant == TORCH_VARIANT else VARIANTS.get(variant, "-"))


def resolve_variant(folder: str | Path, variant: str) -> str:
    """`auto` -> the export's `default_variant` (the fastest CPU variant that passed parity), else fp32."""
    if variant != "auto":
        return variant
    chosen = read_export_config(folder).get("default_variant", "fp32")
    return chosen if variant_path(folder, chosen).exists() else "fp32"


def open_encoder(
    folder: str | Path, variant: str = "auto", device: str = "cpu", threads: int = 0, compile: bool = False
) -> Any:
    """An exported folder's encoder: ONNX variants on onnxruntime, torch_bf16 on its torch copy (bf16 autocast;
    `compile`: under torch.compile, see TorchEncoder)."""
    folder = Path(folder)
    variant = resolve_variant(folder, variant)
    if variant != TORCH_VARIANT:
        return OnnxEncoder(folder, variant, device, threads)
    from embedpipe.core.models import load_model

    set_torch_threads(threads)
    config, path = read_export_config(folder), folder / TORCH_DIR
    if not (path / "modules.json").is_file():
        raise ExportNotFound(f"{path} not found (the export stage writes it only when torch_bf16 passes its parity check)")
    model = load_model(str(path), device="cuda" if device in ("cuda", "tensorrt") else "cpu",
                       max_seq_length=int(config["max_seq_length"]))
    return TorchEncoder(model, config.get("name", folder.name), config.get("query_prompt", ""),
                        config.get("passage_prompt", ""), bf16=True, compile=compile)


@dataclass(frozen=True)
class EncoderSpec:
    """What the server serves, as plain values: `build_encoder` turns it into an encoder in any process (the server's
    model process rebuilds the same encoder from it)."""

    backend: str                 # onnx | torch
    folder: str                  # the exported folder (onnx: the graphs; torch: its name and prompts, if present)
    variant: str = "auto"        # onnx backend: auto | fp32 | fp32_opt | int8 | int8_block | fp16 | torch_bf16
    device: str = "cpu"          # onnx: cpu | cuda | tensorrt; torch: cpu | cuda | auto
    threads: int = 0             # intra-op threads of onnxruntime or torch (0 = all cores)
    torch_model: str = ""        # torch backend: model folder or name
    max_seq_length: int | None = None
    query_prompt: str = ""       # torch backend: used when the model saved no prompts of its own
    passage_prompt: str = ""
    bf16: bool = False           # torch backend: bfloat16 autocast
    compile: bool = False        # torch paths (torch backend, torch_bf16): torch.compile the transformer


def build_encoder(spec: EncoderSpec) -> Any:
    """The encoder `spec` describes (raises ExportNotFound, ModelNotAvailable or ValueError with a fix-it message)."""
    if spec.backend == "onnx":
        return open_encoder(spec.folder, spec.variant, onnx_device(spec.device), threads=spec.threads,
                            compile=spec.compile)
    from embedpipe.core.models import load_model

    set_torch_threads(spec.threads)
    model = load_model(spec.torch_model, device=spec.device, max_seq_length=spec.max_seq_length)
    folder = Path(spec.folder)
    exported = read_export_config(folder) if (folder / CONFIG_FILE).is_file() else {}
    query, passage = model_prompts(model, spec.query_prompt, spec.passage_prompt)
    return TorchEncoder(
        model, exported.get("name", Path(spec.torch_model).name), query, passage, bf16=spec.bf16, compile=spec.compile
    )


def onnx_device(device: str) -> str:
    """The onnx backend's device: `auto` = cuda when onnxruntime has CUDA, else cpu."""
    if device != "auto":
        return device
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def runs_torch_on_cpu(spec: EncoderSpec) -> bool:
    """Whether `spec` serves with torch on the CPU: the torch backend, or the export's torch_bf16 variant."""
    if spec.backend == "torch":
        from embedpipe.core.models import detect_device

        return detect_device(spec.device) == "cpu"
    try:
        variant = resolve_variant(spec.folder, spec.variant)
    except (ExportNotFound, ValueError):
        return False  # the encoder itself will say what is wrong
    return variant == TORCH_VARIANT and onnx_device(spec.device) == "cpu"


def serving_plan(spec: EncoderSpec, workers: int | str, compile: bool | str, model_process: bool) -> tuple[int, bool]:
    """(model workers, torch.compile) for `serve.model_workers` / `serve.torch_compile`, `auto` resolved.

    auto = 2 workers under torch.compile when torch serves on the CPU and a C++ compiler is there (inductor needs
    one); otherwise 1 worker, eager. Measured on 2 AMX cores, torch_bf16 at c=8: 90.8 inputs/s with one eager worker,
    133.7 with two compiled ones; at c=1 54.4 vs 49.0 (docs/export-and-serve.md). ONNX variants keep one worker: two
    one-thread workers cost them 41 % at c=1. More than 2 cores: unmeasured, still 2 workers (cores split evenly).
    """
    torch_cpu = runs_torch_on_cpu(spec)
    if compile == "auto":
        compile = torch_cpu and bool(shutil.which("c++") or shutil.which("g++"))
    elif not isinstance(compile, bool):
        raise ValueError(f"serve.torch_compile must be true, false or auto, got {compile!r}")
    if workers == "auto":
        workers = 2 if torch_cpu and compile and model_process and (os.cpu_count() or 1) >= 2 else 1
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"serve.model_workers must be auto or an integer >= 1, got {workers!r}")
    if workers > 1 and not model_process:
        raise ValueError(f"serve.model_workers {workers} needs the model process (serve.model_process: true)")
    return workers, compile


def worker_spec(spec: EncoderSpec, workers: int, compile: bool) -> EncoderSpec:
    """`spec` as each of `workers` model processes runs it: its share of the cores (unless threads are set) and
    `compile`."""
    threads = spec.threads or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0)
    return replace(spec, threads=threads, compile=compile)


def set_torch_threads(threads: int) -> None:
    """torch's intra-op threads in this process (0: leave torch's default, all cores)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def providers_for(device: str) -> list[Any]:
    """onnxruntime providers for `cpu`, `cuda` or `tensorrt`, each falling back to the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = {"cpu": [], "cuda": ["CUDAExecutionProvider"], "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}
    if device not in wanted:
        raise ValueError(f"unknown device '{device}' (cpu | cuda | tensorrt)")
    missing = [p for p in wanted[device] if p not in available]
    if missing:
        raise RuntimeError(
            f"onnxruntime here has no {', '.join(missing)} (available: {', '.join(available)}); "
            "install onnxruntime-gpu on a CUDA machine, or use device cpu"
        )
    return [*wanted[device], "CPUExecutionProvider"]


def padded_batches(ids: list[list[int]], batch_size: int, pad: int):
    """(row indices, input_ids, attention_mask) batches of similar lengths (less padding), int64 arrays."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = ids[i]
            mask[r, : len(ids[i])] = 1
        yield rows, input_ids, mask


class _PaddedEncoder:
    """Shared batching: sort by length (less padding), pad, run, restore order."""

    tokenizer: Any
    max_seq_length: int
    dimension: int

    def tokenize(self, texts: list[str], max_length: int | None = -1) -> list[list[int]]:
        """Token ids with special tokens, truncated to max_length (-1: max_seq_length; None: not truncated)."""
        if not texts:
            return []
        max_length = self.max_seq_length if max_length == -1 else max_length
        kwargs = {"truncation": True, "max_length": max_length} if max_length else {"truncation": False}
        enc = self.tokenizer(list(texts), add_special_tokens=True, return_attention_mask=False,
                             return_token_type_ids=False, verbose=False, **kwargs)
        return enc["input_ids"]

    def encode(self, texts: list[str], prompt: str = "", batch_size: int = 32) -> np.ndarray:
        """L2-normalised float32 rows, one per text (prompt prefixed, truncated to max_seq_length)."""
        return self.encode_ids(self.tokenize([prompt + t for t in texts]), batch_size)

    def encode_ids(self, ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(ids), self.dimension), dtype=np.float32)
        for rows, input_ids, mask in padded_batches(ids, batch_size, self.tokenizer.pad_token_id or 0):
            out[rows] = self._run(input_ids, mask)
        return out

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OnnxEncoder(_PaddedEncoder):
    """An exported model folder run by onnxruntime (variant auto | fp32 | fp32_opt | int8 | int8_block | fp16; device cpu |
    cuda | tensorrt). `auto` is the variant the export stage measured fastest within tolerance."""

    def __init__(self, folder: str | Path, variant: str = "fp32", device: str = "cpu", threads: int = 0,
                 provider_options: dict[str, Any] | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(folder)
        self.config = read_export_config(folder)
        variant = resolve_variant(folder, variant)
        if variant not in VARIANTS:
            hint = " (a torch variant: open it with open_encoder)" if variant == TORCH_VARIANT else ""
            raise ValueError(f"unknown ONNX variant '{variant}' (auto | {' | '.join(VARIANTS)}){hint}")
        path = folder / VARIANTS[variant]
        if not path.is_file():
            raise ExportNotFound(f"{path} not found (the export stage writes it only when it passes its parity check)")
        self.name = self.config.get("name", folder.name)
        self.variant, self.device = variant, device
        self.max_seq_length = int(self.config["max_seq_length"])
        self.dimension = int(self.config["dimension"])
        self.query_prompt = self.config.get("query_prompt", "")
        self.passage_prompt = self.config.get("passage_prompt", "")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between runs: the idle pool would otherwise steal the cores the server's event loop
        # (tokenising, JSON) and other processes need; costs nothing measurable on batched work.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = providers_for(device)
        if provider_options and providers[0] != "CPUExecutionProvider":
            providers[0] = (providers[0], provider_options)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self._inputs = {i.name for i in self.session.get_inputs()}

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        (emb,) = self.session.run(["sentence_embedding"], feeds)
        return emb.astype(np.float32, copy=False)


class TorchEncoder(_PaddedEncoder):
    """A SentenceTransformer behind the same interface (the server's `torch` backend and the reference).

    `bf16`: run under bfloat16 autocast (weights stay fp32, pooling and normalisation in fp32). On CPUs with
    AVX-512 BF16 or AMX this is the fastest CPU path measured (MiniLM, django-faq: 1.6-1.9x fp32 torch in-process, cosine min
    0.99997, metric drift 0.0035; `bench/bench_serve.py --compare-variants`); elsewhere bf16 is emulated and slow.

    `compile`: the transformer runs under torch.compile (inductor, dynamic shapes). At the server's small batches
    eager torch spends much of a forward between its ~150 operators; the compiled graph fuses them. It costs a
    compilation at start (seconds with a warm inductor cache in /tmp, up to a minute cold), done here by encoding
    a few batches of different shapes, so that no request pays for it.
    """

    def __init__(
        self,
        model: Any,
        name: str,
        query_prompt: str = "",
        passage_prompt: str = "",
        bf16: bool = False,
        compile: bool = False,
    ):
        self.model, self.bf16, self.compiled = model, bf16, False
        self.name, self.variant, self.device = name, "torch_bf16" if bf16 else "torch", str(model.device)
        self.tokenizer = model.tokenizer
        self.max_seq_length = int(model.max_seq_length)
        self.dimension = int(model.get_embedding_dimension())
        self.query_prompt, self.passage_prompt = query_prompt, passage_prompt
        self.config = {"name": name, "max_seq_length": self.max_seq_length, "dimension": self.dimension,
                       "query_prompt": query_prompt, "passage_prompt": passage_prompt}
        if compile:
            self.compiled = self._compile()

    def _compile(self) -> bool:
        """torch.compile the transformer and compile it now, on a few shapes; on any failure (no C++ compiler, an
        unsupported operator) warn and keep the eager model. Returns whether the compiled model is in use."""
        import torch

        hf_model = self.model[0].auto_model  # sentence-transformers calls its `forward` directly: compile that
        eager = hf_model.forward
        hf_model.forward = torch.compile(eager, dynamic=True)
        try:  # batch 1 is compiled apart from the general shape (dynamo specialises sizes 0 and 1)
            for rows, width in ((1, 8), (3, 24), (8, 64)):
                self.encode_ids([[self.tokenizer.cls_token_id or 0] * width] * rows, batch_size=rows)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager model still serves
            hf_model.forward = eager
            log.warning("torch.compile failed (%s: %s); running the eager model", type(e).__name__, str(e)[:300])
            return False
        return True

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        features: dict[str, Any] = {"input_ids": torch.from_numpy(input_ids).to(self.model.device),
                                    "attention_mask": torch.from_numpy(attention_mask).to(self.model.device),
                                    "modality": "text"}
        if "token_type_ids" in self.tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode(), torch.autocast(self.model.device.type, torch.bfloat16, enabled=self.bf16):
            emb = self.model(features)["sentence_embedding"]
        return F.normalize(emb.float(), dim=-1).cpu().numpy()

OUTPUT_NAME = "sentence_embedding"

def model_prompts(model: Any, query_prompt: str = "", passage_prompt: str = "") -> tuple[str, str]:
    """The model's saved prompts ({"query", "passage"|"document"}) win over the params' ones."""
    prompts = getattr(model, "prompts", None) or {}
    query = prompts.get("query", query_prompt) or query_prompt
    passage = prompts.get("passage", prompts.get("document", passage_prompt)) or passage_prompt
    return query, passage

def input_names(model: Any) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in model.tokenizer.model_input_names:
        names.append("token_type_ids")
    return names

def export_onnx(model: Any, out_dir: str | Path, name: str, query_prompt: str, passage_prompt: str,
                opset: int = 17) -> Path:
    """Write out_dir/model.onnx (one graph: ids -> normalised embedding), the tokenizer and embedpipe.json."""
    import torch

    pooling = [m for m in model if type(m).__name__ == "Pooling"]
    if pooling and not getattr(pooling[0], "include_prompt", True) and (query_prompt or passage_prompt):
        raise ValueError("the model's Pooling excludes prompt tokens (include_prompt=False); this exporter "
                         "pools over all tokens, so it would not match. Export without prompts or re-save the model.")
    names = input_names(model)

    class Graph(torch.nn.Module):
        """The ST modules as one forward(input_ids, attention_mask[, token_type_ids]) -> embedding."""

        def __init__(self, st: Any):
            super().__init__()
            self.st = st

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            features = {"input_ids": input_ids, "attention_mask": attention_mask, "modality": "text"}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            emb = self.st(features)["sentence_embedding"]
            return torch.nn.functional.normalize(emb, p=2.0, dim=-1)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    sample = model.tokenizer(["an example sentence to trace", "short"], padding=True, return_tensors="pt")
    args = tuple(sample[n] for n in names)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names} | {OUTPUT_NAME: {0: "batch"}}
    path = out_dir / VARIANTS["fp32"]
    # Eager attention traces to the MatMul/Softmax pattern onnxruntime's transformer optimizer fuses into its
    # Attention op (the SDPA trace is not recognised); same math, so parity is unchanged.
    hf = getattr(model[0], "auto_model", None)
    attn = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    eager = attn not in (None, "eager") and hasattr(hf, "set_attn_implementation")
    try:
        if eager:
            hf.set_attn_implementation("eager")
        with torch.no_grad():
            torch.onnx.export(Graph(model).eval(), args, str(path), input_names=names, output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    finally:
        if eager:
            hf.set_attn_implementation(attn)
    model.tokenizer.save_pretrained(str(out_dir))
    config = {
        "name": name,
        "query_prompt": query_prompt,
        "passage_prompt": passage_prompt,
        "max_seq_length": int(model.max_seq_length),
        "dimension": int(model.get_embedding_dimension()),
        "inputs": names,
        "output": OUTPUT_NAME,
        "opset": opset,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path
