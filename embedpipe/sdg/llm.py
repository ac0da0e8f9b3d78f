"""A crash-safe client for any OpenAI-compatible LLM endpoint (chat or plain completions).

Why not just call `openai` directly: SDG makes hundreds of slow requests, and a run must survive
rate limits, flaky servers, a model that writes broken JSON, and the user pressing Ctrl-C. So:
- every finished request is stored in a SQLite cache keyed by hash(model, api, prompt/messages,
  sampling params); a rerun makes zero requests for finished work, and changing a prompt or the
  model only invalidates the entries it touches;
- 429 (honouring Retry-After), 5xx, timeouts, connection errors and unreadable HTTP bodies are
  retried with exponential backoff and jitter;
- a reply the caller cannot parse (malformed or truncated JSON, off-format text) is re-asked up to
  `parse_retries` times, then recorded as failed with its raw text; one bad item never stops a run;
- at most `concurrency` requests are in flight.
The API key is read from the environment variable *named* in the config and never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

API_KINDS = ("chat", "completions")


class LLMFatalError(RuntimeError):
    """A request can never succeed (bad key, unknown model, bad URL): stop the run with this message."""


class GaveUp(RuntimeError):
    """Transient errors persisted past max_retries: this item fails (not cached, so a rerun retries it)."""


class ParseError(ValueError):
    """The reply text does not have the expected shape; the request is asked again."""




@dataclass
class LLMConfig:
    base_url: str
    model: str
    api: str = "completions"
    api_key_env: str = ""
    temperature: float = 0.7
    max_tokens: int = 96
    timeout: float = 60.0
    max_retries: int = 6
    parse_retries: int = 2
    concurrency: int = 1
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    grammar: bool = False  # a llama.cpp server: send its `grammar` field and its JSON-schema dialect

    def __post_init__(self) -> None:
        if self.api not in API_KINDS:
            raise ValueError(f"sdg.llm.api must be one of {API_KINDS}, got {self.api!r}")


@dataclass
class Result:
    """The outcome of one logical request (after retries, or from the cache)."""

    ok: bool
    value: Any = None
    text: str = ""
    error: str = ""
    cached: bool = False
    not_run: bool = False  # the time budget (sdg.llm.time_budget_s) was spent before this request was sent


@dataclass
class Stats:
    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "retries_by_kind": dict(self.retries),
            "failures_by_kind": dict(self.failures),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
            "latency_mean_s": round(sum(lat) / len(lat), 3) if lat else None,
        }


class RequestCache:
    """SQLite store of finished requests: key -> (status, raw text, usage). One commit per answer (WAL)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, status TEXT NOT NULL, text TEXT NOT NULL,"
            " error TEXT, request TEXT NOT NULL, created REAL NOT NULL)"
        )

    def get(self, key: str) -> tuple[str, str, str] | None:
        with self._lock:
            row = self._db.execute("SELECT status, text, error FROM requests WHERE key = ?", (key,)).fetchone()
        return row

    def put(self, key: str, status: str, text: str, error: str, request: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, ?, ?)",
                (key, status, text, error, json.dumps(request, ensure_ascii=False), time.time()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def request_key(request: dict[str, Any]) -> str:
    """Stable hash of everything that determines the answer (model, api, prompt, sampling params)."""
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class LLMClient:
    """Cached, retrying, bounded-concurrency calls; `ask()` for one request, `map()` for many."""

    def __init__(self, cfg: LLMConfig, cache: RequestCache, retry_failed: bool = False,
                 server_gone: Callable[[], str | None] | None = None):
        """`server_gone`: for a server we started, says why it is no longer running (None while it runs), so that a
        crashed server stops the run with its reason instead of being retried as a network fault."""
        self.cfg = cfg
        self.server_gone = server_gone
        self.cache = cache
        self.retry_failed = retry_failed
        self.stats = Stats()
        self.stop = threading.Event()
        self.deadline: float | None = None  # time.monotonic() after which no new request is sent
        self._stats_lock = threading.Lock()
        api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not api_key:
            raise LLMFatalError(f"environment variable {cfg.api_key_env} (sdg.llm.api_key_env) is not set")
        # max_retries=0: the retry policy below is ours (it also covers unreadable bodies and bad JSON).
        self._client = openai.OpenAI(
            base_url=cfg.base_url, api_key=api_key or "not-needed", timeout=cfg.timeout, max_retries=0
        )

    def set_time_budget(self, seconds: float) -> None:
        """After `seconds` from now, `ask` answers only from the cache (0 or less = no budget).

        Requests already in flight finish and are cached; a rerun with a larger budget resumes.
        """
        self.deadline = time.monotonic() + seconds if seconds > 0 else None

    def budget_spent(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    # -- one request ----------------------------------------------------------------------------
    def build(
        self,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: list[str] | None = None,
        response_format: dict[str, Any] | None = None,
        grammar: str | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """The request body (also the cache key's content). Completions take `prompt`, chat `messages`."""
        req: dict[str, Any] = {
            "model": self.cfg.model,
            "max_tokens": int(max_tokens or self.cfg.max_tokens),
            "temperature": float(self.cfg.temperature if temperature is None else temperature),
        }
        if self.cfg.api == "chat":
            req["messages"] = messages if messages is not None else [{"role": "user", "content": prompt or ""}]
            if response_format:
                req["response_format"] = _llama_cpp_format(response_format) if self.cfg.grammar else response_format
        else:
            req["prompt"] = prompt if prompt is not None else "\n\n".join(m["content"] for m in messages or [])
            if grammar and self.cfg.grammar:
                req["grammar"] = grammar
        if stop:
            req["stop"] = stop
        if seed is not None:
            req["seed"] = int(seed)
        return req

    def ask(self, request: dict[str, Any], parse: Callable[[str], Any] = lambda s: s) -> Result:
        """Answer from the cache, or ask the endpoint (with retries) and store the outcome."""
        key = request_key({"api": self.cfg.api, "base": "openai-compatible", **request})
        row = self.cache.get(key)
        if row is not None and (row[0] == "ok" or not self.retry_failed):
            self._count(cache_hits=1)
            status, text, error = row
            if status == "ok":
                try:
                    return Result(True, parse(text), text, cached=True)
                except ParseError as e:  # the parser changed since: treat as a failure, do not re-ask
                    return Result(False, None, text, f"parse: {e}", cached=True)
            return Result(False, None, text, error or "failed", cached=True)
        if self.budget_spent():
            return Result(False, None, "", "not run: time budget spent", not_run=True)

        text, last_error = "", ""
        for attempt in range(self.cfg.parse_retries + 1):
            body = dict(request)
            if attempt:  # a different seed so that a deterministic server does not repeat the bad reply
                body["seed"] = int(body.get("seed", 0)) + 1000 * attempt
            try:
                text = self._send(body)
            except GaveUp as e:
                return Result(False, None, "", str(e))
            try:
                value = parse(text)
            except ParseError as e:
                last_error = f"parse: {e}"
                self._count(retry="bad_output")
                continue
            self.cache.put(key, "ok", text, "", request)
            return Result(True, value, text)
        self._count(failure="bad_output")
        self.cache.put(key, "failed", text, last_error, request)
        return Result(False, None, text, last_error)

    def _send(self, body: dict[str, Any]) -> str:
        """One logical HTTP request with transport-level retries; returns the reply text."""
        body = dict(body)
        extra = {k: body.pop(k) for k in ("grammar",) if k in body}
        delay = self.cfg.backoff_base
        for attempt in range(self.cfg.max_retries + 1):
            if self.stop.is_set():
                raise KeyboardInterrupt("stopping")
            started = time.time()
            wait_s = None
            try:
                if self.cfg.api == "chat":
                    resp = self._client.chat.completions.create(**body, extra_body=extra or None)
                    text = resp.choices[0].message.content or ""
                else:
                    resp = self._client.completions.create(**body, extra_body=extra or None)
                    text = resp.choices[0].text or ""
                usage = getattr(resp, "usage", None)
                self._count(
                    requests=1,
                    latency=time.time() - started,
                    prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                    completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                )
                return text
            except openai.RateLimitError as e:
                kind, wait_s = "rate_limited", _retry_after(e.response)
            except openai.APITimeoutError:
                kind = "timeout"
            except openai.APIConnectionError:
                kind = "connection"
                if self.server_gone is not None and (why := self.server_gone()):
                    raise LLMFatalError(why) from None
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in (408, 409):
                    raise LLMFatalError(f"{self.cfg.base_url} answered {e.status_code}: {_short(e.message)}") from None
                kind, wait_s = f"http_{e.status_code}", _retry_after(e.response)
            except (ValueError, openai.APIResponseValidationError, AttributeError, IndexError, TypeError):
                kind = "unreadable_response"  # a body that is not the JSON the protocol promises
            self._count(requests=1, retry=kind)
            if attempt == self.cfg.max_retries:
                self._count(failure=kind)
                raise GaveUp(f"gave up after {attempt + 1} attempts (last: {kind})")
            sleep = wait_s if wait_s is not None else min(self.cfg.backoff_max, delay) * (0.5 + random.random())
            delay *= 2
            if self.stop.wait(sleep):
                raise KeyboardInterrupt("stopping")
        raise AssertionError("unreachable")

    # -- many requests --------------------------------------------------------------------------
    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], progress: Any = None) -> Iterator[tuple[int, Any]]:
        """Run fn(item) with at most `concurrency` in flight; yield (index, result) as each finishes.

        On Ctrl-C/SIGTERM the pending items are cancelled and in-flight ones stop at their next retry.
        """
        items = list(items)
        pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency))
        interrupted = False
        pending = {}
        it = iter(enumerate(items))
        try:
            for i, item in it:
                pending[pool.submit(fn, item)] = i
                if len(pending) >= 2 * self.cfg.concurrency:
                    break
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    if progress is not None:
                        progress.update(1)
                    yield i, fut.result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending[pool.submit(fn, nxt[1])] = nxt[0]
        except BaseException:
            interrupted = True
            self.stop.set()
            for fut in pending:
                fut.cancel()
            raise
        finally:
            # Interrupted: do not wait for a request in flight (up to `timeout` s): the caller's cleanup (e.g.
            # stopping the embedded server) must run now; the request's thread ends at its next retry check.
            pool.shutdown(wait=not interrupted, cancel_futures=True)

    def _count(self, requests=0, cache_hits=0, latency=None, prompt_tokens=0, completion_tokens=0, retry=None,
               failure=None) -> None:
        with self._stats_lock:
            s = self.stats
            s.requests += requests
            s.cache_hits += cache_hits
            s.prompt_tokens += prompt_tokens
            s.completion_tokens += completion_tokens
            if latency is not None:
                s.latencies.append(latency)
            if retry:
                s.retries[retry] += 1
            if failure:
                s.failures[failure] += 1


def _llama_cpp_format(response_format: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `json_schema` response format in the dialect llama.cpp servers accept.

    llama-cpp-python's server only knows `{"type": "json_object", "schema": ...}` (it answers 422 to
    `json_schema`); the C++ llama-server accepts both. The schema becomes a grammar either way.
    """
    if response_format.get("type") == "json_schema":
        return {"type": "json_object", "schema": response_format.get("json_schema", {}).get("schema", {})}
    return response_format


def _retry_after(response: Any) -> float | None:
    """Seconds from a Retry-After / retry-after-ms header, capped at 120 s."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, min(120.0, float(value) * scale))
        except ValueError:
            return None
    return None


def _short(text: Any, n: int = 300) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + "..."


def parse_json_object(text: str) -> dict[str, Any]:
    """Parse a JSON object from model text (tolerating ```json fences); ParseError when truncated/malformed."""
    s = text.strip()
    if s.startswith("```"):
        s = s.strip("`")
        s = s[4:] if s.lower().startswith("json") else s
    start, end = s.find("{"), s.rfind("}")
    if start < 0 or end <= start:
        raise ParseError(f"no JSON object in reply: {_short(text, 80)!r}")
    try:
        obj = json.loads(s[start : end + 1])
    except json.JSONDecodeError as e:
        raise ParseError(f"malformed JSON ({e.msg}): {_short(text, 80)!r}") from None
    if not isinstance(obj, dict):
        raise ParseError("JSON reply is not an object")
    return obj
