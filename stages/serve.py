"""`make serve`: an OpenAI/NIM-compatible embeddings server for models/onnx (or a PyTorch model).

    python stages/serve.py                       # models/onnx, onnxruntime, params serve.variant
    python stages/serve.py --variant int8 --port 9000
    python stages/serve.py --backend torch --torch-model models/finetuned

Then: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").embeddings.create(model=NAME, input=[...])`,
with `extra_body={"input_type": "query"}` for queries.
"""

from __future__ import annotations

import os
import sys

import click

from embedpipe.core.console import console, warn
from embedpipe.core.params import load_params, section


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Params file.")
@click.option("--model-dir", default=None, help="Exported folder (overrides serve.model_dir).")
@click.option("--backend", type=click.Choice(["onnx", "torch"]), default=None, help="Overrides serve.backend.")
@click.option("--variant", type=click.Choice(["auto", "fp32", "fp32_opt", "int8", "int8_block", "fp16", "torch_bf16"]),
              default=None, help="Exported variant (overrides serve.variant; auto: the export's fastest within "
                                 "tolerance; torch_bf16: the export's torch copy under bf16 autocast).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
              help="onnxruntime provider, or torch device (overrides serve.device).")
@click.option("--torch-model", default=None, help="Torch backend: model folder or name (overrides serve.torch_model).")
@click.option("--torch-dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Torch backend: bfloat16 autocast (fast on CPUs with AVX-512 BF16/AMX; overrides serve.torch_dtype).")
@click.option("--model-name", default=None, help="Name to answer to (default: the export's name).")
@click.option("--host", default=None, help="Bind address (overrides serve.host; default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (overrides serve.port).")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (0 = all cores).")
@click.option("--max-batch-size", type=int, default=None, help="Inputs per model call (overrides serve.max_batch_size).")
@click.option("--max-batch-tokens", type=int, default=None,
              help="Tokens per model call (overrides serve.max_batch_tokens; bf16 on AMX wants 2048+).")
@click.option("--max-wait-ms", type=float, default=None, help="Batching wait (overrides serve.max_wait_ms).")
@click.option("--model-process/--no-model-process", default=None,
              help="Run the model in a child process, away from the server's GIL (overrides serve.model_process).")
@click.option("--model-workers", type=int, default=None,
              help="Model processes, each with its share of the cores, running batches at once "
                   "(overrides serve.model_workers; needs the model process).")
@click.option("--torch-compile/--no-torch-compile", default=None,
              help="Torch paths (torch backend, torch_bf16): run the transformer under torch.compile "
                   "(overrides serve.torch_compile).")
@click.option("--http", "http_parser", type=click.Choice(["auto", "httptools", "h11"]), default=None,
              help="uvicorn's HTTP parser (overrides serve.http; auto: httptools when installed).")
@click.option("--model-timeout-s", type=float, default=None,
              help="Model call deadline in seconds; 0 = none (overrides serve.model_timeout_s).")
@click.option("--log-level", default="warning", show_default=True, help="uvicorn log level.")
def main(params_path, model_dir, backend, variant, device, torch_model, torch_dtype, model_name, host, port, threads,
         max_batch_size, max_batch_tokens, max_wait_ms, model_process, model_workers, torch_compile, http_parser,
         model_timeout_s, log_level) -> None:
    """Serve POST /v1/embeddings (OpenAI + NIM fields), /v1/models, /v1/health/{live,ready} and /metrics.

    Requests without input_type get serve.default_input_type's prompt; truncate defaults to
    serve.default_truncate. On SIGTERM / Ctrl-C, work in flight gets serve.drain_timeout_s to finish; the
    exit code is 1 if any accepted request had to be answered 503 instead.
    """
    from embedpipe.core.encoders import (
        EncoderSpec,
        ExportNotFound,
        build_encoder,
        serving_plan,
        worker_spec,
    )
    from embedpipe.core.models import ModelNotAvailable
    from embedpipe.serving.model_process import ModelProcessError, ProcessEncoder
    from embedpipe.serving.server import (
        ServerSettings,
        batch_tokens_for,
        create_app,
        run_server,
        serving_description,
    )

    params = load_params(params_path)
    cfg, mcfg = section(params, "serve"), section(params, "model")
    backend = backend or cfg["backend"]
    separate = cfg.get("model_process", True) if model_process is None else model_process
    spec = EncoderSpec(
        backend=backend, folder=str(model_dir or cfg["model_dir"]), variant=variant or cfg["variant"],
        device=device or cfg["device"], threads=cfg["threads"] if threads is None else threads,
        torch_model=torch_model or cfg["torch_model"], max_seq_length=mcfg["max_seq_length"],
        query_prompt=mcfg.get("query_prompt", ""), passage_prompt=mcfg.get("passage_prompt", ""),
        bf16=(torch_dtype or cfg.get("torch_dtype", "float32")) == "bfloat16")
    try:
        workers, compile_torch = serving_plan(
            spec,
            cfg.get("model_workers", "auto") if model_workers is None else model_workers,
            cfg.get("torch_compile", "auto") if torch_compile is None else torch_compile,
            separate,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    spec = worker_spec(spec, workers, compile_torch)
    api_key = None
    if cfg.get("api_key_env"):
        api_key = os.environ.get(cfg["api_key_env"])
        if not api_key:
            raise click.ClickException(f"serve.api_key_env is '{cfg['api_key_env']}' but that variable is not set "
                                       "(set it, or set serve.api_key_env to '' for no key)")
    try:
        call_timeout_s = cfg.get("model_timeout_s", 60) if model_timeout_s is None else model_timeout_s
        encoder = (ProcessEncoder(spec, workers=workers, call_timeout_s=call_timeout_s) if separate
                   else build_encoder(spec))
    except (ExportNotFound, ModelNotAvailable, ModelProcessError, RuntimeError, ValueError) as e:
        raise click.ClickException(str(e)) from None

    try:  # from here on, the model process (if any) is stopped however we leave
        try:
            batch_tokens = max_batch_tokens or batch_tokens_for(cfg["max_batch_tokens"], encoder.variant, str(encoder.device))
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        local = encoder.local if separate else encoder
        if separate:
            encoder.call_tokens = batch_tokens  # model_timeout_s is the deadline of a call this big
        serving = serving_record(encoder, local, spec, workers if separate else 0, batch_tokens)
        settings = _settings(
            cfg, ServerSettings,
            model_name=model_name or cfg.get("model_name") or encoder.name,
            max_batch_size=max_batch_size or cfg["max_batch_size"],
            max_batch_tokens=batch_tokens,
            max_wait_ms=cfg["max_wait_ms"] if max_wait_ms is None else max_wait_ms,
            http=http_parser or cfg.get("http", "auto"),
            api_key=api_key,
            serving=serving,
        )
        host = host or cfg["host"]
        port = port or cfg["port"]
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            warn(f"binding {host} without an API key: anyone who can reach this port can use the model")
        console.print(f"serving '{settings.model_name}' ({serving_description(serving, encoder.pids if separate else None)}) on "
                      f"http://{host}:{port}/v1  (dimension {encoder.dimension}, max {encoder.max_seq_length} tokens)")
        code = run_server(create_app(encoder, settings), settings, host, port, log_level)
    finally:
        if separate:
            encoder.close()
    sys.exit(code)


def serving_record(encoder, local, spec, model_processes: int, batch_tokens: int) -> dict:
    """How this server runs the model (GET /v1/models/{name} `serving`; deploy_check records it)."""
    from embedpipe.core.encoders import TorchEncoder

    return {
        "variant": encoder.variant,
        "runtime": "torch" if isinstance(local, TorchEncoder) else "onnxruntime",
        "device": str(encoder.device),
        "max_batch_tokens": batch_tokens,
        "model_processes": model_processes,
        "threads_per_process": spec.threads,
        "compile_requested": bool(spec.compile),
        "compiled": bool(getattr(encoder, "compiled", False)),
    }


def _settings(cfg: dict, settings_class: type, **given):
    """ServerSettings from the `serve:` params plus `given` (CLI overrides, computed values)."""
    try:
        return settings_class(
            max_inputs_per_request=cfg["max_inputs_per_request"],
            max_tokens_per_input=cfg["max_tokens_per_input"],
            max_chars_per_token=cfg["max_chars_per_token"],
            max_payload_bytes=int(cfg["max_payload_mb"] * 2**20),
            max_queued_inputs=cfg["max_queued_inputs"],
            max_concurrent_requests=cfg["max_concurrent_requests"],
            read_timeout_s=cfg["read_timeout_s"],
            max_header_bytes=int(cfg.get("max_header_kb", 16) * 1024),
            drain_timeout_s=cfg["drain_timeout_s"],
            default_input_type=cfg["default_input_type"],
            default_truncate=cfg["default_truncate"],
            encode_batch_size=cfg["encode_batch_size"],
            docs_enabled=bool(cfg["docs_enabled"]),
            **given,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
