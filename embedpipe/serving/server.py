"""An OpenAI/NIM-compatible embeddings server (FastAPI) with fair micro-batching, bounded queues and metrics.

`create_app(encoder, settings)` serves any encoder with the `OnnxEncoder` interface (tokenize + encode_ids):
POST /v1/embeddings, GET /v1/models, /v1/health/live, /v1/health/ready, /metrics. `run_server` runs it under
uvicorn with read timeouts and a bounded drain on SIGTERM.

Why it is built this way (each point answers an abuse that froze or crashed an earlier version):
- Nothing heavy runs on the event loop: JSON parsing, validation and tokenising run in a small thread pool,
  the model in its own thread, so /v1/health/live answers while a huge request is being prepared.
- Every input is cut after `max_seq_length * max_chars_per_token` non-whitespace characters before it is
  tokenised, so the work per request is bounded whatever the payload; an input within the token limit is never
  cut (whitespace is not counted, and a cut that is not clearly over the limit is undone), see `_Inputs`.
- The scheduler works on rows, not requests: each model run takes at most `max_batch_size` rows and
  `max_batch_tokens` tokens; small requests first, big ones in chunks in arrival order (FIFO), so a 512-input
  request advances in chunks between small requests instead of blocking them, and equal big requests finish one
  after the other instead of in lock-step (with an anti-starvation rule for the oldest big one).
- The queue is bounded (`max_queued_inputs` → 429 + Retry-After), in-flight requests too
  (`max_concurrent_requests` → 503 + Retry-After), and work for a client that has gone is skipped.
- Every error is answered with OpenAI's body `{"error": {"message", "type", "param", "code"}}`; a 500 never
  carries exception text (the traceback goes to the log with an id the client sees). That includes what the
  HTTP parser refuses (`_protocol_class`): request heads over `max_header_bytes` (431, before the body is read),
  malformed framing (400 / 501).
- A model process that stops answering is noticed by the model call's deadline (`ProcessEncoder`): its requests
  get a 503, it is killed and restarted, and /v1/health/ready says 503 until a model process can answer.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import http
import json
import logging
import math
import os
import re
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from embedpipe.core.processes import ChildServer, free_port

log = logging.getLogger("embedpipe.serving.server")

# Characters that carry no text: Unicode Cc, Cf, Zs, Zl, Zp and str.isspace() (generated from unicodedata
# 14.0; computing it at import takes 1.5 s). An input made only of these gets a 400, like whitespace.
_INVISIBLE = (
    "\x00-\x20\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u1680\u180e\u2000-\u200f"
    "\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
_VISIBLE_RE = re.compile(f"[^{_INVISIBLE}]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_STARVE_STEPS = 4  # the oldest big request, passed over this many model runs in a row, goes first in the next one
MAX_INPUTS_PER_REQUEST = 2048  # OpenAI's ceiling on inputs per request; serve.max_inputs_per_request may be lower


def batch_tokens_for(setting: int | str, variant: str, device: str) -> int:
    """`serve.max_batch_tokens`: a number, or `auto` = what each runtime was measured to want. torch_bf16 on an
    AMX CPU serves 30.5 -> 39.7 inputs/s at 4,096 instead of 512 tokens per call (and one huge request still
    leaves the others' p99 alone: bench_serve --abuse, 0.92x); CPU onnxruntime gains nothing from long batches
    (512); GPUs want full batches (16,384)."""
    if setting != "auto":
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ValueError(f"serve.max_batch_tokens must be a positive integer or auto, got {setting!r}")
        return setting
    if device.split(":")[0] in ("cuda", "tensorrt"):  # torch says cuda:0
        return 16384
    return 4096 if variant == "torch_bf16" else 512


@dataclass
class ServerSettings:
    model_name: str
    max_batch_size: int = 64          # rows per model call
    max_batch_tokens: int = 512       # tokens per model call (a big request advances in chunks of this)
    max_wait_ms: float = 2.0          # how long the first request of a batch waits for others
    max_inputs_per_request: int = 512  # at most MAX_INPUTS_PER_REQUEST (OpenAI's 2,048)
    max_tokens_per_input: int = 0     # 0: the model's max_seq_length
    max_chars_per_token: int = 20     # inputs are cut at token_limit * this many characters before tokenising
    max_payload_bytes: int = 8 * 2**20
    max_queued_inputs: int = 2048     # rows waiting for the model; beyond -> 429
    max_concurrent_requests: int = 128  # POST requests being read/prepared/computed at once; beyond -> 503
    read_timeout_s: float = 10.0      # headers, then the body, must arrive within this (408 / connection closed)
    max_header_bytes: int = 16384     # request line + headers; beyond -> 431 before the body is read
    http: str = "auto"                # uvicorn's HTTP parser: auto (httptools if installed) | httptools | h11
    drain_timeout_s: float = 10.0     # on SIGTERM, work not finished by then gets a 503 and the exit code is 1
    default_input_type: str = "passage"  # what a client that sends no input_type (the openai client) gets
    default_truncate: str = "END"        # END matches sentence-transformers' silent truncation
    encode_batch_size: int = 16       # rows per model run inside a micro-batch (CPU ORT: 8-16 is fastest)
    api_key: str | None = None        # when set, /v1/* needs `Authorization: Bearer <key>`
    docs_enabled: bool = False        # /docs and /openapi.json (behind the key when one is set)
    serving: dict[str, Any] = field(default_factory=dict)  # how the model runs (`serving_description`): GET /v1/models

    def __post_init__(self) -> None:
        if not 1 <= self.max_inputs_per_request <= MAX_INPUTS_PER_REQUEST:
            raise ValueError(f"serve.max_inputs_per_request must be 1..{MAX_INPUTS_PER_REQUEST} (OpenAI's ceiling), "
                             f"got {self.max_inputs_per_request}")
        if self.http not in ("auto", "httptools", "h11"):
            raise ValueError(f"serve.http must be auto, httptools or h11, got {self.http!r}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"serve.max_header_kb must be at least 1, got {self.max_header_bytes / 1024:g}")


def serving_description(serving: dict[str, Any], pids: list[int] | None = None) -> str:
    """One line for people (start-up line, deploy_check's summary) from the structured `serving` record."""
    workers = serving.get("model_processes") or 0
    where = "model in the server process"
    if workers:
        where = f"{workers} model process{'es' if workers > 1 else ''}"
        if pids:
            where += f" pid {', '.join(map(str, pids))}"
        if workers > 1:
            where += f", {serving['threads_per_process']} threads each"
    if serving.get("compiled"):
        where += ", torch.compile"
    elif serving.get("compile_requested"):
        where += ", torch.compile failed: eager"
    return (f"{serving['variant']} on {serving['runtime']}, {serving['device']}, "
            f"{serving['max_batch_tokens']} tokens per model call, {where}")


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="A text, a list of texts, or token ids of the served model's tokenizer (a list of ids, or a "
                    "list of such lists), as OpenAI accepts them; ids are decoded and embedded like text.")
    model: str | None = Field(None, description="The served model's name (GET /v1/models).")
    input_type: Literal["query", "passage"] | None = Field(
        None, description="Applies the model's query or passage prompt; absent: the server's default.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1, description="Keep the first N dimensions and renormalise.")
    truncate: Literal["NONE", "END"] | None = Field(
        None, description="NONE: over-long input is an error (400); END: cut at the token limit.")
    user: str | None = None


def _safe(text: str, limit: int = 500) -> str:
    """Error text that always encodes (lone surrogates escaped) and stays short (paths can be 100 KB)."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": _safe(message), "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


class Job:
    """One request's token ids in the scheduler: rows are computed in chunks, the future gets all of them."""

    def __init__(self, ids: list[list[int]], seq: int, future: asyncio.Future):
        self.ids, self.seq, self.future = ids, seq, future
        self.next = 0                      # first row not yet handed to the model
        self.done = 0                      # rows computed (with several model workers, chunks finish in any order)
        self.out: np.ndarray | None = None
        self.passed = 0                    # model runs in a row that took nothing from this job
        self.chunked = False               # too big for one run: computed in chunks

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.next


class Scheduler:
    """Fair, bounded micro-batching: concurrent requests share model runs, a big request cannot block small ones.

    Each model run takes at most `max_batch_size` rows and `max_batch_tokens` tokens. A run is either several
    requests that all finish in it, or one chunk of a request too big for one run ("big": more tokens than
    `_chunk_tokens`). Rows of cancelled requests (client gone) are never computed. `workers` model runs go at
    once (one loop each; `fn` must allow that many concurrent calls).

    Order: FIFO by arrival, except that small requests may jump ahead of big ones.
    - Small requests (whole in one run) go first, in arrival order, so a small request waits at most one chunk.
    - Big requests are computed in chunks strictly in arrival order: the oldest big request gets every chunk
      until it is done. Equal large requests therefore finish one after the other, in arrival order, instead of
      all at the end in lock-step (smallest-remaining-first with round-robin anti-starvation did that: 16 x 32
      long texts all finished together, so every client waited as long as the last one, and on SIGTERM none of
      them could finish within the drain timeout). With FIFO the work in front of the queue finishes first, so
      what fits in the drain timeout is answered 200 and only the tail gets 503.
    - Bounded unfairness: the oldest big request, passed over `_STARVE_STEPS` runs in a row by small ones, gets
      the next run's chunk first; a big request waits for the big requests that arrived before it, never for
      later ones. Shortest-remaining-first with an age bound was the alternative; it lets a stream of
      medium requests overtake a big one repeatedly, and its order depends on sizes the client cannot see.
    """

    def __init__(self, fn, settings: ServerSettings, metrics: dict[str, Any], executor: ThreadPoolExecutor,
                 min_chunk_tokens: int = 256, workers: int = 1):
        self.fn, self.settings, self.metrics, self.executor = fn, settings, metrics, executor
        self.workers = workers
        self.min_chunk_tokens = min_chunk_tokens  # one full-length input
        self.jobs: list[Job] = []
        self.queued = 0                    # rows not yet handed to the model
        self.rate: float | None = None     # rows/s, smoothed: for Retry-After
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.draining = False              # SIGTERM received: work in progress may finish
        self.closed = False                # the drain timeout passed: everything left was dropped
        self.dropped = 0                   # requests answered 503 because of the shutdown
        self.small_tokens: float | None = None  # tokens per run of whole requests, smoothed (chunk sizing)
        self.last_small = 0.0
        self._seq = 0

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._loop()) for _ in range(self.workers)]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._drop_all()

    def retry_after(self) -> int:
        """Seconds until the queue has room again, at the measured model speed (at least 1)."""
        return max(1, math.ceil(self.queued / self.rate)) if self.rate else 1

    def submit(self, ids: list[list[int]]) -> Job:
        if self.closed:
            self._count_dropped()
            raise ApiError(503, "server is shutting down; retry on another replica", type_="server_error",
                           code="shutting_down")
        limit = self.settings.max_queued_inputs
        if self.queued and self.queued + len(ids) > limit:
            wait = self.retry_after()
            raise ApiError(429, f"server queue is full ({self.queued} inputs waiting, at most {limit}); retry in "
                           f"{wait} s", type_="rate_limit_error", code="queue_full", headers={"Retry-After": str(wait)})
        job = Job(ids, self._seq, asyncio.get_running_loop().create_future())
        self._seq += 1
        self.jobs.append(job)
        self.metrics["submitted"].inc(len(ids))
        self._queue_changed(len(ids))
        self.wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client has gone: forget the rows not computed yet."""
        if job.future.done() or job not in self.jobs:
            return
        job.future.cancel()
        self.metrics["cancelled"].inc(job.remaining)
        self._forget(job)

    def drain(self, timeout_s: float) -> None:
        """Begin the shutdown: finish what is queued for `timeout_s`, then answer the rest 503."""
        self.draining = True
        asyncio.get_running_loop().call_later(timeout_s, self._drop_all)

    def _drop_all(self) -> None:
        self.closed = True
        for job in self.jobs:
            if not job.future.done():
                job.future.set_exception(ApiError(
                    503, f"server shut down before this request finished (drain timeout "
                    f"{self.settings.drain_timeout_s:g} s); retry on another replica", type_="server_error",
                    code="shutting_down"))
                self._count_dropped()
        self.jobs.clear()
        self._queue_changed(-self.queued)

    def _count_dropped(self) -> None:
        self.dropped += 1
        self.metrics["dropped"].inc()

    def _forget(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
            self._queue_changed(-job.remaining)

    def _queue_changed(self, delta: int) -> None:
        self.queued += delta
        self.metrics["queue"].set(self.queued)

    def _pick(self) -> list[tuple[Job, int, int]]:
        """The next model run: (job, first row, end row) triples, see the class docstring."""
        waiting = [j for j in self.jobs if j.remaining]  # self.jobs is in arrival order
        if not waiting:
            return []
        chunk = self._chunk_tokens()
        costs = {id(j): sum(len(row) for row in j.ids[j.next :]) for j in waiting}
        small = [j for j in waiting if costs[id(j)] <= chunk]
        big = [j for j in waiting if costs[id(j)] > chunk]
        order = small + big
        if big and big[0].passed >= _STARVE_STEPS:  # the oldest big request has waited long enough
            order.remove(big[0])
            order.insert(0, big[0])
        picks: list[tuple[Job, int, int]] = []
        rows = tokens = 0
        for job in order:
            cost = costs[id(job)]
            if cost <= chunk and self._fit(job, rows, tokens, self.settings.max_batch_tokens) == job.remaining:
                picks.append((job, job.next, len(job.ids)))
                rows, tokens = rows + job.remaining, tokens + cost
                continue
            if not picks:  # one chunk of a request too big for one run, sized like the others' recent runs
                job.chunked = True
                picks.append((job, job.next, job.next + max(1, self._fit(job, 0, 0, chunk))))
            break
        chosen = {id(job) for job, _, _ in picks}
        for job in waiting:  # only the head of the big requests can starve; the others wait their turn (FIFO)
            job.passed = job.passed + 1 if big and job is big[0] and id(job) not in chosen else 0
        return picks

    def _fit(self, job: Job, rows: int, tokens: int, budget: int) -> int:
        """How many of `job`'s next rows fit in a run that already holds `rows` rows and `tokens` tokens."""
        take = 0
        while take < job.remaining and rows + take < self.settings.max_batch_size:
            n = len(job.ids[job.next + take])
            if rows + take and tokens + n > budget:
                break
            take, tokens = take + 1, tokens + n
        return take

    def _chunk_tokens(self) -> int:
        """Token budget of a big request's chunk: half the recent runs of whole (small) requests, so that a
        small request waits at most about half its own run time for a chunk (but at least one full-length
        input); all of max_batch_tokens when no small requests came in the last second. A request costing
        more than this is "big" and is computed in chunks."""
        top = self.settings.max_batch_tokens
        if self.small_tokens is None or time.monotonic() - self.last_small > 1.0:
            return top
        return max(min(self.min_chunk_tokens, top), min(top, int(self.small_tokens / 2)))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not any(j.remaining for j in self.jobs):
                self.wake.clear()
                await self.wake.wait()
                if self.settings.max_wait_ms > 0 and self.queued < self.settings.max_batch_size:
                    await asyncio.sleep(self.settings.max_wait_ms / 1000)
            picks = self._pick()
            if not picks:
                continue
            ids = [row for job, a, b in picks for row in job.ids[a:b]]
            for job, _, b in picks:
                job.next = b
            self._queue_changed(-len(ids))
            start = time.perf_counter()
            try:
                emb = await loop.run_in_executor(self.executor, self.fn, ids)
            except Exception as e:  # the model failed: these requests get a 500 (or 503), the loop lives on
                self._failed(picks, e)
                continue
            seconds = max(time.perf_counter() - start, 1e-6)
            log.debug("model run: %d rows, %d tokens, %d requests, %.3f s, %d queued", len(ids),
                      sum(map(len, ids)), len(picks), seconds, self.queued)
            speed = len(ids) / seconds
            self.rate = speed if self.rate is None else 0.8 * self.rate + 0.2 * speed
            self.metrics["batch"].observe(len(ids))
            if not any(job.chunked for job, _, _ in picks):
                n_tokens = sum(len(row) for row in ids)
                self.small_tokens = n_tokens if self.small_tokens is None else 0.7 * self.small_tokens + 0.3 * n_tokens
                self.last_small = time.monotonic()
            offset = 0
            for job, a, b in picks:
                if not job.future.done():  # a cancelled (disconnected) or dropped request is skipped
                    if job.out is None:
                        job.out = np.empty((len(job.ids), emb.shape[1]), dtype=np.float32)
                    job.out[a:b] = emb[offset : offset + b - a]
                    job.done += b - a
                    if job.done == len(job.ids):
                        job.future.set_result(job.out)
                        self._forget(job)
                offset += b - a


    def _failed(self, picks: list[tuple[Job, int, int]], e: Exception) -> None:
        """A model run raised: a 503 when the model process did not answer (`ModelUnavailable`: dead or past the
        call deadline, being restarted; retrying is right), else a 500 whose details only the log has."""
        if getattr(e, "status", 500) == 503:
            log.error("model run of %d requests failed: %s", len(picks), e)
            error = ApiError(503, f"{e}; retry", type_="server_error", code="model_unavailable",
                             headers={"Retry-After": "1"})
        else:
            error_id = uuid.uuid4().hex[:12]
            log.error("model run failed (error id %s)", error_id, exc_info=e)
            error = ApiError(500, f"internal error (id {error_id})", type_="server_error", code="internal_error")
        for job, _, _ in picks:
            if not job.future.done():
                job.future.set_exception(error)
            self._forget(job)


def _metrics(registry: CollectorRegistry) -> dict[str, Any]:
    return {
        "requests": Counter("embed_requests", "HTTP requests by route template and status (499: client left)",
                            ["path", "status"], registry=registry),
        "errors": Counter("embed_errors", "Error responses by OpenAI error code", ["code"], registry=registry),
        "latency": Histogram("embed_request_latency_seconds", "POST /v1/embeddings latency", registry=registry,
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
        "batch": Histogram("embed_batch_size", "Inputs per model call (micro-batch size)", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
        "inputs": Counter("embed_inputs", "Texts embedded and answered", registry=registry),
        "tokens": Counter("embed_tokens", "Tokens embedded and answered", registry=registry),
        "queue": Gauge("embed_queue_inputs", "Inputs waiting for the model", registry=registry),
        "submitted": Counter("embed_submitted_inputs", "Inputs accepted into the model queue", registry=registry),
        "inflight": Gauge("embed_inflight_requests", "POST requests being read, prepared or computed",
                          registry=registry),
        "cancelled": Counter("embed_cancelled_inputs", "Inputs skipped because their client disconnected",
                             registry=registry),
        "dropped": Counter("embed_dropped_requests", "Requests answered 503 because the drain timeout passed",
                           registry=registry),
    }


class _Guard:
    """ASGI middleware around the app: counts every request by route template, checks the API key (401),
    bounds concurrent POSTs (503), payload size (413) and read time (408), and buffers the body.

    It sits inside Starlette's error middleware, so it also counts the 500s the app raises, and it labels
    unknown paths `other` so that no client can grow /metrics.
    """

    def __init__(self, app, settings: ServerSettings, metrics: dict[str, Any], routes, protected: set[str]):
        self.app, self.settings, self.metrics, self.routes, self.protected = app, settings, metrics, routes, protected
        self.inflight = 0

    def _label(self, scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "other"

    def _authorized(self, value: bytes | None) -> bool:
        """`Authorization: Bearer KEY`, scheme case-insensitive (RFC 7235), key compared in constant time."""
        parts = (value or b"").strip().split(None, 1)
        if len(parts) != 2 or parts[0].lower() != b"bearer":
            return False
        return hmac.compare_digest(parts[1].strip(), (self.settings.api_key or "").encode("utf-8"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = self._label(scope)
        status: list[int] = []

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self._guarded(scope, receive, counting_send)
        except Exception:
            status.append(500)  # Starlette's error middleware, outside, answers it with our 500 handler
            raise
        finally:
            self.metrics["requests"].labels(label, str(status[0] if status else 499)).inc()
            if label == "/v1/embeddings":
                self.metrics["latency"].observe(time.perf_counter() - start)

    @staticmethod
    def _framing_error(raw_headers: list[tuple[bytes, bytes]]) -> tuple[int, str, str] | None:
        """Headers that make the request ambiguous (request smuggling) or that we cannot decode: status, message,
        code. The HTTP parsers refuse most of these themselves (their answer is made JSON in `run_server`);
        this covers what the parser in use lets through."""
        counts: dict[bytes, int] = {}
        for name, _ in raw_headers:
            counts[name] = counts.get(name, 0) + 1
        for name in (b"authorization", b"content-length", b"transfer-encoding"):
            if counts.get(name, 0) > 1:
                return 400, f"more than one {name.decode()} header", "duplicate_header"
        encoding = next((v for k, v in raw_headers if k == b"transfer-encoding"), None)
        if encoding is not None and counts.get(b"content-length"):
            return 400, "both Content-Length and Transfer-Encoding sent", "invalid_request"
        if encoding is not None and encoding.strip().lower() != b"chunked":
            return 501, f"Transfer-Encoding {_safe(encoding.decode('latin-1'), 100)!r} is not supported (only " \
                        "chunked)", "unsupported_transfer_encoding"
        return None

    async def _guarded(self, scope, receive, send):
        path, headers = scope["path"], dict(scope["headers"])
        framing = self._framing_error(scope["headers"])
        if framing is not None:
            return await self._refuse(scope, receive, send, *framing)
        needs_key = path.startswith("/v1/") and not path.startswith("/v1/health") or path in self.protected
        if self.settings.api_key and needs_key and not self._authorized(headers.get(b"authorization")):
            return await self._refuse(scope, receive, send, 401, "missing or wrong API key (send "
                                      "'Authorization: Bearer <key>')", "invalid_api_key")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if self.inflight >= self.settings.max_concurrent_requests:
            return await self._refuse(scope, receive, send, 503, f"server busy ({self.inflight} requests in "
                                      "flight); retry in 1 s", "server_busy", "server_error", {"Retry-After": "1"})
        self.inflight += 1
        self.metrics["inflight"].set(self.inflight)
        try:
            await self._with_body(scope, receive, send, headers)
        finally:
            self.inflight -= 1
            self.metrics["inflight"].set(self.inflight)

    async def _with_body(self, scope, receive, send, headers):
        limit = self.settings.max_payload_bytes
        too_big = f"request body larger than {limit} bytes"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(scope, receive, send, 413, too_big, "payload_too_large")
        deadline = time.monotonic() + self.settings.read_timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                return await self._refuse(scope, receive, send, 408, "request body not received within "
                                          f"{self.settings.read_timeout_s:g} s", "request_timeout")
            if message["type"] == "http.disconnect":
                return  # the client gave up mid-upload: nothing to answer, counted as 499
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._refuse(scope, receive, send, 413, too_big, "payload_too_large")
        body, replayed = b"".join(chunks), False

        async def replay():  # the buffered body once, then the real channel (which reports a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, status, message, code, type_="invalid_request_error",
                      headers: dict[str, str] | None = None):
        """An error before the app runs; `Connection: close` so that an unread body cannot hold the socket."""
        self.metrics["errors"].labels(code).inc()
        headers = {**(headers or {}), "Connection": "close"}
        await error_body(status, message, type_, None, code, headers)(scope, receive, send)


@dataclass
class Prepared:
    ids: list[list[int]]
    dimensions: int | None
    encoding_format: str


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    if param == "input":  # one line, not one per member of the union
        return ("'input' must be a string, a list of strings, a list of token ids or a list of lists of token "
                "ids", param)
    message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: "
                        f"{err.get('msg')}" for err in errors[:5])
    return message, param


def _check_text(text: str, param: str, what: str) -> None:
    if _SURROGATE_RE.search(text):
        raise ApiError(400, f"{what} contains a lone UTF-16 surrogate, which is not valid Unicode text", param,
                       "invalid_value")


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start}: {e.reason})", None,
                       "invalid_json") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                       None, "invalid_json") from None
    except (ValueError, RecursionError):  # a 5,000-digit number, [[[[... 100,000 deep
        raise ApiError(400, "request body is not valid JSON (a number too long or nesting too deep)", None,
                       "invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, 'request body must be a JSON object like {"input": "text"}', None, "invalid_json")
    return obj


class _Inputs:
    """Request limits and preparation: parse, validate, bound, tokenise, render (all in worker threads).

    The character pre-bound: an input is cut after `char_limit` (= token limit x `max_chars_per_token`)
    **non-whitespace** characters, at a word boundary, before it is tokenised, so a 7.9 MB input costs about
    as much as a 5 KB one. Whitespace is not counted: a tokenizer turns any run of it into at most a few tokens
    (WordPiece: none), so `"start here" + 6000 spaces + 30 words` (36 tokens) is never cut. The cut is only
    trusted when the cut text alone has clearly more tokens than the limit; otherwise (words of > 20 characters
    per token, e.g. long [UNK] words) the whole input is tokenised, which costs at most the payload limit. So a
    text is never cut, nor refused under `truncate: NONE`, while its real token count is within the limit.
    """

    MARGIN = 8  # tokens past the limit that make the cut text's count trustworthy (the cut's edge is local)

    def __init__(self, encoder: Any, settings: ServerSettings, token_limit: int):
        self.encoder, self.settings, self.token_limit = encoder, settings, token_limit
        self.char_limit = token_limit * settings.max_chars_per_token
        self._bound_re = re.compile(r"(?:\s*+\S){" + str(self.char_limit) + "}")

    def prepare(self, raw: bytes) -> Prepared:
        """Parse, validate, bound and tokenise one request body."""
        body = self._validated(_parse_json(raw))
        texts = self._texts(body.input)
        if body.dimensions is not None and body.dimensions > self.encoder.dimension:
            raise ApiError(400, f"dimensions {body.dimensions} > the model's {self.encoder.dimension}",
                           "dimensions", "invalid_value")
        input_type = body.input_type or self.settings.default_input_type
        prompt = self.encoder.query_prompt if input_type == "query" else self.encoder.passage_prompt
        ids = self._tokenize([prompt + t for t in texts], len(prompt), body.truncate or
                             self.settings.default_truncate)
        return Prepared(ids, body.dimensions, body.encoding_format)

    def _validated(self, obj: dict[str, Any]) -> EmbeddingRequest:
        try:
            body = EmbeddingRequest.model_validate(obj)
        except ValidationError as e:
            message, param = _validation_message(e.errors())
            raise ApiError(422, message, param, "invalid_value") from None
        name = self.settings.model_name
        if body.model is not None:
            _check_text(body.model, "model", "'model'")
            if not body.model.strip():
                raise ApiError(400, "'model' is empty: send the served model's name or leave it out", "model",
                               "invalid_value")
            if body.model != name:
                raise ApiError(404, f"model '{body.model}' not found; this server serves '{name}'", "model",
                               "model_not_found")
        return body

    def _texts(self, given: Any) -> list[str]:
        """The inputs as texts: token ids (a list of ints, or of lists of ints) decoded with the model's tokenizer."""
        if isinstance(given, str):
            texts: list[Any] = [given]
        elif given and isinstance(given[0], int):
            texts = [given]
        else:
            texts = list(given)
        if not texts:
            raise ApiError(400, "'input' is an empty list", "input", "invalid_value")
        limit = self.settings.max_inputs_per_request
        if len(texts) > limit:
            raise ApiError(400, f"{len(texts)} inputs in one request; at most {limit}", "input", "too_many_inputs")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                texts[i] = text = self._decode(text, i)
            _check_text(text, "input", f"input[{i}]")
            if not _VISIBLE_RE.search(text):
                raise ApiError(400, f"input[{i}] is empty (only whitespace, control or invisible characters)",
                               "input", "invalid_value")
        return texts

    def _decode(self, ids: list[int], i: int) -> str:
        tokenizer = self.encoder.tokenizer
        if not ids:
            raise ApiError(400, f"input[{i}] is an empty list of token ids", "input", "invalid_value")
        if len(ids) > self.char_limit:  # bounds the decoding work like the character pre-bound bounds text
            raise ApiError(400, f"input[{i}] has {len(ids)} token ids; at most {self.char_limit} are accepted "
                           f"(the model reads {self.token_limit})", "input", "context_length_exceeded")
        vocab = len(tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"input[{i}]: token id {bad} is outside the model's vocabulary (0..{vocab - 1}); "
                           "token ids must come from the served model's tokenizer (not tiktoken's)", "input",
                           "invalid_value")
        return tokenizer.decode(ids, skip_special_tokens=True)

    def _cut(self, text: str, start: int) -> str | None:
        """`text` cut after `char_limit` non-whitespace characters after `start` (at the last whitespace within
        256 characters before that point), or None when it has fewer."""
        found = self._bound_re.match(text, start)
        if found is None:
            return None
        end = found.end()
        space = max(text.rfind(" ", max(start, end - 256), end), text.rfind("\n", max(start, end - 256), end))
        return text[: space if space > start else end]

    def _tokenize(self, prompted: list[str], prompt_len: int, truncate: str) -> list[list[int]]:
        """Token ids of each prompted input, cut at the token limit (END) or refused when over it (NONE)."""
        limit = self.token_limit
        cuts = [self._cut(t, prompt_len) if len(t) - prompt_len > self.char_limit else None for t in prompted]
        bounded = [t if c is None else c for t, c in zip(prompted, cuts, strict=True)]
        ids = self.encoder.tokenize(bounded, max_length=None)
        for i, cut in enumerate(cuts):  # a cut input whose cut text is not clearly over-long: its whole text
            if cut is not None and len(ids[i]) <= limit + self.MARGIN:
                ids[i] = self.encoder.tokenize([prompted[i]], max_length=None)[0]
                cuts[i] = None
        over = [i for i, row in enumerate(ids) if len(row) > limit]
        if over and truncate == "NONE":
            i = over[0]
            count = f"{'at least ' if cuts[i] is not None else ''}{len(ids[i])}"
            raise ApiError(400, f"input[{i}] has {count} tokens, more than the {limit} allowed ({len(over)} "
                           "input(s) too long); send truncate=END to cut them", "input", "context_length_exceeded")
        if over:  # END: the tokenizer's own truncation (keeps the closing special tokens)
            again = self.encoder.tokenize([bounded[i] if cuts[i] is not None else prompted[i] for i in over],
                                          max_length=limit)
            for i, row in zip(over, again, strict=True):
                ids[i] = row
        return ids

    def render(self, emb: np.ndarray, prepared: Prepared) -> bytes:
        if prepared.dimensions is not None and prepared.dimensions < emb.shape[1]:
            emb = emb[:, : prepared.dimensions]
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        if prepared.encoding_format == "base64":
            vectors: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in emb]
        else:
            vectors = emb.astype(np.float32).tolist()
        n_tokens = sum(len(row) for row in prepared.ids)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return json.dumps({"object": "list", "data": data, "model": self.settings.model_name,
                           "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}},
                          separators=(",", ":")).encode("utf-8")


def _model_ready(encoder: Any) -> bool:
    """Whether a model process can answer now (an encoder in the server process always can)."""
    check = getattr(encoder, "available", None)
    return bool(check()) if callable(check) else True


def create_app(encoder: Any, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `encoder` (an OnnxEncoder, TorchEncoder or ProcessEncoder) under `settings`."""
    registry = CollectorRegistry()
    metrics = _metrics(registry)
    token_limit = min(settings.max_tokens_per_input or encoder.max_seq_length, encoder.max_seq_length)
    state: dict[str, Any] = {"ready": False, "scheduler": None, "metrics": metrics}
    workers = int(getattr(encoder, "workers", 1))  # a ProcessEncoder may run several model processes
    model_pool = ThreadPoolExecutor(workers, thread_name_prefix="embed-model")
    prep_pool = ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="embed-prep")

    def run_batch(ids: list[list[int]]) -> np.ndarray:
        return encoder.encode_ids(ids, settings.encode_batch_size)

    def begin_drain() -> None:
        state["ready"] = False
        if state["scheduler"] is not None:
            state["scheduler"].drain(settings.drain_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(encoder.encode, ["warm-up"])
        scheduler = Scheduler(run_batch, settings, metrics, model_pool, token_limit, workers=workers)
        scheduler.start()
        state.update(scheduler=scheduler, ready=True)
        yield
        state["ready"] = False
        await scheduler.stop()
        model_pool.shutdown(wait=False, cancel_futures=True)
        prep_pool.shutdown(wait=False, cancel_futures=True)

    docs = settings.docs_enabled
    app = FastAPI(title="embedpipe embeddings", version="1", lifespan=lifespan, redirect_slashes=False,
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None,
                  description="OpenAI/NIM-compatible text embeddings.")
    app.state.embed = state
    state["begin_drain"] = begin_drain

    def count_refusal(status: int, code: str) -> None:  # an answer from below the app (run_server's protocol)
        metrics["requests"].labels("other", str(status)).inc()
        metrics["errors"].labels(code).inc()

    state["count_refusal"] = count_refusal
    _add_error_handlers(app, metrics)
    app.add_middleware(_Guard, settings=settings, metrics=metrics, routes=lambda: app.routes,
                       protected={"/docs", "/openapi.json", "/docs/oauth2-redirect"} if docs else set())
    _add_embeddings_route(app, state, _Inputs(encoder, settings, token_limit), prep_pool)
    _add_info_routes(app, encoder, settings, state, registry, token_limit)
    return app


def _add_error_handlers(app: FastAPI, metrics: dict[str, Any]) -> None:
    """Every error as OpenAI's body, counted by code; a 500 without its exception text."""

    def fail(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
             code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics["errors"].labels(code or str(status)).inc()
        return error_body(status, message, type_, param, code, headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return fail(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        message, param = _validation_message(e.errors())
        return fail(422, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, str(e.status_code))
        return fail(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=e)
        return fail(500, f"internal error (id {error_id}; the server log has the details)", "server_error",
                    code="internal_error")


def _add_embeddings_route(app: FastAPI, state: dict[str, Any], inputs: _Inputs, prep_pool: ThreadPoolExecutor):
    """POST /v1/embeddings: read, prepare (worker thread), queue, wait (or notice the client left), render."""
    metrics = state["metrics"]
    body_doc = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": EmbeddingRequest.model_json_schema()}}}}

    @app.post("/v1/embeddings", openapi_extra=body_doc)
    async def embeddings(request: Request) -> Response:
        scheduler: Scheduler | None = state["scheduler"]
        if scheduler is None or not state["ready"]:
            draining = scheduler is not None and scheduler.draining
            raise ApiError(503, "server is shutting down" if draining else "model is loading", type_="server_error",
                           code="shutting_down" if draining else "not_ready")
        raw = await request.body()
        loop = asyncio.get_running_loop()
        gone = asyncio.ensure_future(_disconnected(request.receive))
        job: Job | None = None
        try:
            prepared = await loop.run_in_executor(prep_pool, inputs.prepare, raw)
            if gone.done():
                return Response(status_code=499)
            job = scheduler.submit(prepared.ids)
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                return Response(status_code=499)  # nobody reads it: counted as 499 by the guard
            emb = job.future.result()
            content = await loop.run_in_executor(prep_pool, inputs.render, emb, prepared)
        finally:
            gone.cancel()
            if job is not None and not job.future.done():
                scheduler.cancel(job)
        metrics["inputs"].inc(len(prepared.ids))
        metrics["tokens"].inc(sum(len(row) for row in prepared.ids))
        return Response(content, media_type="application/json")


def _add_info_routes(app: FastAPI, encoder: Any, settings: ServerSettings, state: dict[str, Any],
                     registry: CollectorRegistry, token_limit: int) -> None:
    """GET /v1/models, /v1/models/{id}, /v1/health/live, /v1/health/ready, /metrics."""

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "embedpipe",
                "dimension": encoder.dimension, "max_seq_length": token_limit, "backend": encoder.variant,
                **({"serving": settings.serving} if settings.serving else {})}

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
            return error_body(503, "model is loading or server shutting down", "server_error", code="not_ready")
        if not await asyncio.to_thread(_model_ready, encoder):
            return error_body(503, "no model process can answer now (restarting)", "server_error",
                              code="model_unavailable")
        return JSONResponse({"object": "health.response", "message": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def _disconnected(receive) -> None:
    """Returns when the client has closed the connection (the body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _http_protocol(name: str = "auto") -> type:
    """uvicorn's HTTP protocol: `httptools` (C parser; `auto` when it is installed) or `h11` (pure Python).

    Under single-passage traffic the parser is a real share of the server's CPU, which it takes from the model.
    """
    if name not in ("auto", "httptools", "h11"):
        raise ValueError(f"serve.http must be auto, httptools or h11, got {name!r}")
    if name != "h11":
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

            return HttpToolsProtocol
        except ImportError:
            if name == "httptools":
                raise
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


class _LimitsProtocol:
    """Mixed into uvicorn's HTTP protocol (httptools or h11) by `_protocol_class`: what uvicorn lacks, a deadline
    for the request head (slow-loris), a bound on its size, and OpenAI-style JSON bodies for the errors answered
    below the app. `embed_settings` and `embed_state` are set on the class `_protocol_class` makes."""

    embed_settings: ServerSettings
    embed_state: dict[str, Any]
    _header_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0          # bytes of the request head (request line + headers) received so far
    _refused = False         # answered at the protocol level: what the client still sends is discarded

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.embed_settings.read_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _reading_head(self) -> bool:
        """Whether the bytes coming now belong to a request head: no request yet, or the last one's body
        has been read (or its answer sent)."""
        return self._idle() or not self.cycle.more_body

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._idle():
            self._arm()
        # The head is fed to the parser at most `max_header_bytes` at a time, counted, and refused beyond
        # the bound before the parser (httptools has no bound of its own) or the app sees any more of it.
        while data:
            if not self._reading_head():
                self._head_bytes = 0
                super().data_received(data)
                break
            room = self.embed_settings.max_header_bytes - self._head_bytes
            if room <= 0:
                self._refuse(431, f"request headers larger than {self.embed_settings.max_header_bytes} bytes",
                             "headers_too_large")
                return
            piece, data, cycle = data[:room], data[room:], self.cycle
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self.cycle is not cycle:  # a request's head ended in this piece
                self._head_bytes = 0
            if self.transport.is_closing() or self._refused:
                return
        if not self._idle():
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser refuses (plain text there): the JSON error instead. It is
        called inside the parser's `except`, so the parser's own reason and status hint are at hand."""
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400)  # h11: 431 (head too big), 501 (transfer coding)
        detail = str(error) if error is not None and str(error) else msg
        if "transfer-encoding" in detail.lower() and "content-length" not in detail.lower():
            status = 501  # llhttp: "Request has invalid `Transfer-Encoding`"
        code = {431: "headers_too_large", 501: "unsupported_transfer_encoding"}.get(status, "invalid_http")
        self._refuse(status, f"malformed HTTP request: {detail}", code)

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer with the JSON error and close; what the client still sends is read and dropped for a
        while first (closing with unread data would reset the connection and lose the answer)."""
        self._refused = True
        count = self.embed_state.get("count_refusal")
        if count is not None:
            count(status, code)
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a response is under way on this connection: no second one
            return
        body = json.dumps({"error": {"message": _safe(message), "type": "invalid_request_error",
                                     "param": None, "code": code}}).encode()
        reason = http.HTTPStatus(status).phrase.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(min(self.embed_settings.read_timeout_s, 2.0), self.transport.close)
        else:
            self.transport.close()

    def eof_received(self):
        if self._refused:
            self.transport.close()
        return super().eof_received()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._header_timer = None
        if self._idle() and not self.transport.is_closing():
            self.transport.close()


def _protocol_class(base: type, settings: ServerSettings, state: dict[str, Any]) -> type:
    """uvicorn's HTTP protocol `base` with `_LimitsProtocol` on top, for this server's settings and state."""
    return type("Protocol", (_LimitsProtocol, base), {"embed_settings": settings, "embed_state": state})


def run_server(app: FastAPI, settings: ServerSettings, host: str, port: int, log_level: str = "warning") -> int:
    """Run `app` under uvicorn until SIGTERM/Ctrl-C; the exit code is 1 if accepted work had to be dropped.

    On SIGTERM: readiness goes 503, new connections are refused, queued work runs for `drain_timeout_s`, then
    what is left is answered with a JSON 503; uvicorn's own hard cancel (plain-text 500) comes 5 s later still.
    Request headers and bodies must arrive within `read_timeout_s` (uvicorn has no such timeout itself).
    """
    import uvicorn

    state = app.state.embed

    Protocol = _protocol_class(_http_protocol(settings.http), settings, state)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            state["begin_drain"]()
            await super().shutdown(sockets)

    def exit_code() -> int:
        scheduler = state.get("scheduler")
        dropped = scheduler.dropped if scheduler is not None else 0
        if dropped:
            print(f"embedpipe serve: {dropped} request(s) dropped at shutdown (drain timeout "
                  f"{settings.drain_timeout_s:g} s): exit code 1", file=sys.stderr)
        return 1 if dropped else 0

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: the exit code then tells supervisors whether
    # every accepted request was answered.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: sys.exit(exit_code()))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=Protocol,
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s + 5), timeout_keep_alive=5,
                            h11_max_incomplete_event_size=2 * settings.max_header_bytes)  # ours refuses first
    Server(config).run()
    return exit_code()


# --- running the server as a subprocess (deploy_check, tests, benchmarks) ---------------------------------


class ServerProcess(ChildServer):
    """`python stages/serve.py ARGS` on a free loopback port: started, waited for, always stopped (SIGTERM)."""

    def __init__(self, args: list[str], cwd: str | None = None, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 120.0, port: int | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [sys.executable, "stages/serve.py", "--host", "127.0.0.1", "--port", str(self.port), *args]
        super().__init__("server", cmd, f"{self.base_url}/health/ready", startup_timeout_s=startup_timeout_s,
                         cwd=cwd, env=env)
