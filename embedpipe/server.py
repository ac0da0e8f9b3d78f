"""An OpenAI/NIM-compatible embeddings server (FastAPI) with dynamic micro-batching and Prometheus metrics.

`create_app(encoder, settings)` serves any encoder with the `OnnxEncoder` interface (tokenize + encode_ids):
POST /v1/embeddings, GET /v1/models, /v1/health/live, /v1/health/ready, /metrics. Concurrent requests are
merged into one model call (up to `max_batch_size` inputs, waiting at most `max_wait_ms` for company), so a
busy server runs large efficient batches while a lone request is answered at once. Every error is answered
with OpenAI's body `{"error": {"message", "type", "param", "code"}}`; none stops the server.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedpipe.processes import free_port, stop_process, wait_until_ready


@dataclass
class ServerSettings:
    model_name: str
    max_batch_size: int = 64          # inputs per model call
    max_wait_ms: float = 2.0          # how long the first request of a batch waits for others
    max_inputs_per_request: int = 512
    max_tokens_per_input: int = 0     # 0: the model's max_seq_length
    max_payload_bytes: int = 8 * 2**20
    default_input_type: str = "passage"  # what a client that sends no input_type (the openai client) gets
    default_truncate: str = "END"        # END matches sentence-transformers' silent truncation
    encode_batch_size: int = 16       # rows per model run inside a micro-batch (CPU ORT: 8-16 is fastest)
    api_key: str | None = None        # when set, /v1/* needs `Authorization: Bearer <key>`


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] = Field(description="A text or a list of texts (token-id input is not supported).")
    model: str | None = Field(None, description="The served model's name (GET /v1/models).")
    input_type: Literal["query", "passage"] | None = Field(
        None, description="Applies the model's query or passage prompt; absent: the server's default.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Keep the first N dimensions and renormalise.")
    truncate: Literal["NONE", "END"] | None = Field(
        None, description="NONE: over-long input is an error (400); END: cut at the token limit.")
    user: str | None = None


def error_body(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


class MicroBatcher:
    """Merge concurrent requests into one model call, run off the event loop."""

    def __init__(self, fn, max_batch: int, max_wait_s: float, on_batch):
        self.fn, self.max_batch, self.max_wait_s, self.on_batch = fn, max_batch, max_wait_s, on_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        while not self.queue.empty():
            _, fut = self.queue.get_nowait()
            if not fut.done():
                fut.set_exception(ApiError(503, "server is shutting down", type_="server_error"))

    async def submit(self, ids: list[list[int]]) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((ids, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            size = len(batch[0][0])
            if self.max_wait_s > 0 and size < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            while size < self.max_batch and not self.queue.empty():
                item = self.queue.get_nowait()
                batch.append(item)
                size += len(item[0])
            ids = [row for item, _ in batch for row in item]
            try:
                emb = await asyncio.to_thread(self.fn, ids)
            except Exception as e:  # the model failed: every waiting request gets the error, the loop lives on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.on_batch(len(ids))
            start = 0
            for item, fut in batch:
                if not fut.done():  # a cancelled (disconnected) request is skipped
                    fut.set_result(emb[start : start + len(item)])
                start += len(item)


def _metrics(registry: CollectorRegistry) -> dict[str, Any]:
    return {
        "requests": Counter("embed_requests", "HTTP requests by path and status", ["path", "status"],
                            registry=registry),
        "errors": Counter("embed_errors", "Error responses by OpenAI error code", ["code"], registry=registry),
        "latency": Histogram("embed_request_latency_seconds", "POST /v1/embeddings latency", registry=registry,
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
        "batch": Histogram("embed_batch_size", "Inputs per model call (micro-batch size)", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
        "inputs": Counter("embed_inputs", "Texts embedded", registry=registry),
        "tokens": Counter("embed_tokens", "Tokens embedded", registry=registry),
    }


class _Guard:
    """ASGI middleware: API key (401) and payload size (413) checks before any body is parsed."""

    def __init__(self, app, settings: ServerSettings, metrics: dict[str, Any]):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.settings.api_key and path.startswith("/v1/") and not path.startswith("/v1/health"):
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.settings.api_key}":
                return await self._refuse(scope, receive, send, 401, "missing or wrong API key "
                                          "(send 'Authorization: Bearer <key>')", "invalid_api_key")
        limit = self.settings.max_payload_bytes
        length = headers.get(b"content-length")
        too_big = f"request body larger than {limit} bytes"
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(scope, receive, send, 413, too_big, "payload_too_large")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):  # chunked: read it with a cap
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await self._refuse(scope, receive, send, 413, too_big, "payload_too_large")
            replayed = False

            async def receive():  # noqa: F811 - hand the buffered body to the app once
                nonlocal replayed
                if replayed:
                    return {"type": "http.disconnect"}
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send, status, message, code):
        self.metrics["errors"].labels(code).inc()
        self.metrics["requests"].labels(scope["path"], str(status)).inc()
        await error_body(status, message, param=None, code=code)(scope, receive, send)


def create_app(encoder: Any, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `encoder` (an OnnxEncoder or TorchEncoder) under `settings`."""
    registry = CollectorRegistry()
    metrics = _metrics(registry)
    token_limit = min(settings.max_tokens_per_input or encoder.max_seq_length, encoder.max_seq_length)
    state: dict[str, Any] = {"ready": False}

    def run_batch(ids: list[list[int]]) -> np.ndarray:
        return encoder.encode_ids(ids, settings.encode_batch_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(encoder.encode, ["warm-up"])
        batcher = MicroBatcher(run_batch, settings.max_batch_size, settings.max_wait_ms / 1000,
                               metrics["batch"].observe)
        batcher.start()
        state.update(batcher=batcher, ready=True)
        yield
        state["ready"] = False
        await batcher.stop()

    app = FastAPI(title="embedpipe embeddings", version="1", lifespan=lifespan,
                  description="OpenAI/NIM-compatible text embeddings.")

    def fail(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
             code: str | None = None) -> JSONResponse:
        metrics["errors"].labels(code or str(status)).inc()
        return error_body(status, message, type_, param, code)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return fail(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return fail(400, "request body is not valid JSON", code="invalid_json")
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{err.get('msg')}" for err in errors[:5])
        if param == "input":
            message = "'input' must be a string or a list of strings (token-id input is not supported); " + message
        return fail(422, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, str(e.status_code))
        message = f"{request.method} {request.url.path}: {e.detail}"
        return fail(e.status_code, message, code=code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return fail(500, f"internal error: {type(e).__name__}: {e}", type_="server_error", code="internal_error")

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        metrics["requests"].labels(request.url.path if response.status_code != 404 else "other",
                                   str(response.status_code)).inc()
        if request.url.path == "/v1/embeddings":
            metrics["latency"].observe(time.perf_counter() - start)
        return response

    app.add_middleware(_Guard, settings=settings, metrics=metrics)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        if body.model and body.model != settings.model_name:
            raise ApiError(404, f"model '{body.model}' not found; this server serves '{settings.model_name}'",
                           "model", "model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ApiError(400, "'input' is an empty list", "input", "invalid_value")
        if len(texts) > settings.max_inputs_per_request:
            raise ApiError(400, f"{len(texts)} inputs in one request; at most {settings.max_inputs_per_request}",
                           "input", "too_many_inputs")
        empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
        if empty is not None:
            raise ApiError(400, f"input[{empty}] is empty", "input", "invalid_value")
        if body.dimensions is not None and body.dimensions > encoder.dimension:
            raise ApiError(400, f"dimensions {body.dimensions} > the model's {encoder.dimension}", "dimensions",
                           "invalid_value")
        input_type = body.input_type or settings.default_input_type
        prompt = encoder.query_prompt if input_type == "query" else encoder.passage_prompt
        prompted = [prompt + t for t in texts]
        ids = encoder.tokenize(prompted, max_length=None)
        over = [i for i, row in enumerate(ids) if len(row) > token_limit]
        if over:
            if (body.truncate or settings.default_truncate) == "NONE":
                raise ApiError(400, f"input[{over[0]}] has {len(ids[over[0]])} tokens, more than the {token_limit} "
                               f"allowed ({len(over)} input(s) too long); send truncate=END to cut them",
                               "input", "context_length_exceeded")
            for i, row in zip(over, encoder.tokenize([prompted[i] for i in over], max_length=token_limit), strict=True):
                ids[i] = row
        if not state["ready"]:
            raise ApiError(503, "model is loading", type_="server_error", code="not_ready")
        emb = await state["batcher"].submit(ids)
        if body.dimensions is not None and body.dimensions < emb.shape[1]:
            emb = emb[:, : body.dimensions]
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        n_tokens = sum(len(row) for row in ids)
        metrics["inputs"].inc(len(texts))
        metrics["tokens"].inc(n_tokens)
        if body.encoding_format == "base64":
            vectors: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in emb]
        else:
            vectors = emb.astype(np.float32).tolist()
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": settings.model_name,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "embedpipe",
                "dimension": encoder.dimension, "max_seq_length": token_limit, "backend": encoder.variant}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != settings.model_name:
            raise ApiError(404, f"model '{model_id}' not found", "model", "model_not_found")
        return model_card()

    @app.get("/v1/health/live")
    async def live() -> dict[str, Any]:
        return {"object": "health.response", "message": "live"}

    @app.get("/v1/health/ready")
    async def ready() -> Response:
        if not state["ready"]:
            return error_body(503, "model is loading", "server_error", code="not_ready")
        return JSONResponse({"object": "health.response", "message": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --- running the server as a subprocess (deploy_check, tests, benchmarks) ---------------------------------


class ServerProcess:
    """`python stages/serve.py ARGS` on a free loopback port: started, waited for, always stopped (SIGTERM)."""

    def __init__(self, args: list[str], cwd: str | None = None, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 120.0, port: int | None = None):
        import tempfile

        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.cmd = [sys.executable, "stages/serve.py", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.cwd, self.env, self.startup_timeout_s = cwd, env, startup_timeout_s
        self.log = tempfile.NamedTemporaryFile("w+", prefix="embedpipe-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(self.proc, f"{self.base_url}/health/ready", self.startup_timeout_s, "server", self.log_tail)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within timeout_s; returns the exit code."""
        return None if self.proc is None else stop_process(self.proc, timeout_s)

    def __enter__(self) -> ServerProcess:
        return self if self.proc is not None else self.start()

    def close(self) -> int | None:
        """Stop the server and delete its log; returns its exit code."""
        rc = self.stop()
        self.log.close()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)
        return rc

    def __exit__(self, *exc) -> None:
        self.close()
