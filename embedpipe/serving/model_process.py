"""The server's model in a process of its own: `ProcessEncoder` has the encoder interface, but its model runs in a
child process, so the server's Python work (HTTP, JSON, tokenising, rendering) never competes with it for the GIL.

Why: torch releases the GIL inside each operator and takes it back after. In one process, every time the model
thread wants it back while an HTTP thread is busy in Python, it waits (up to the 5 ms switch interval), and a
MiniLM forward is ~150 operators: the model idles while the cores are free. Measured on 2 cores: the server kept
1.35-1.4 cores busy at concurrency 8 and lost 38 % of the in-process throughput (docs/export-and-serve.md).
A child process has its own GIL; the parent's model thread only waits on a pipe.

The parent keeps its own encoder for tokenising and the model card (a second copy of the weights in memory; the
parent never runs it). The child is rebuilt from the same `EncoderSpec`. If the child dies (killed, out of
memory), the requests of that model run get a 503 (`ModelUnavailable`) and a fresh child is started. If it hangs
(stopped, deadlocked, swapping), the model call's deadline (`call_timeout_s`) ends the wait: the requests get a
503, the child is killed and a new one started. `available()` says whether a child can answer now (the server's
/v1/health/ready); it also completes or begins a restart, so readiness comes back without traffic. The child
ignores SIGINT and SIGTERM (the parent drains its queue through it on shutdown) and exits when the parent's end of
the pipe closes, so it never outlives the server.

`workers` > 1 starts that many children, each with its share of the cores (`EncoderSpec.threads`), and lets that many
model runs go at once (the server runs one scheduler loop per worker). Why: on a small CPU a model run of a few
inputs cannot keep two intra-op threads busy (they synchronise after every operator); two one-thread workers, each
with its own batch, did ~1.3-1.6x the inputs/s of one two-thread worker in-process (MiniLM bf16, batch 4, 2 cores).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import signal
import threading
import traceback
from dataclasses import replace
from typing import Any

import numpy as np

from embedpipe.core.encoders import EncoderSpec, build_encoder

log = logging.getLogger("embedpipe.serving.server")


class ModelProcessError(RuntimeError):
    """The model process failed to start, or a model run failed in it."""

    status = 500


class ModelUnavailable(ModelProcessError):
    """No answer from the model process: it died during the run, or missed the call deadline (then it was killed).
    A new one is starting; the request may be retried (the server answers 503)."""

    status = 503


def _child(conn, spec: EncoderSpec) -> None:
    """The model process: build the encoder, then answer (ids, batch_size) messages until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        encoder = build_encoder(spec)  # warmed up by its first request (the server sends one before it is ready)
    except BaseException as e:  # noqa: BLE001 - the parent shows it; nothing else can
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"variant": encoder.variant, "device": str(encoder.device),
                         "compiled": bool(getattr(encoder, "compiled", False))}))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server has gone
            return
        if message is None:
            return
        ids, batch_size = message
        try:
            result: tuple[str, Any] = ("ok", encoder.encode_ids(ids, batch_size))
        except Exception:  # noqa: BLE001 - one bad run must not end the process
            result = ("error", traceback.format_exc())
        conn.send(result)


class _Worker:
    """One model process and the pipe to it; one model run at a time (`lock`)."""

    def __init__(self, spec: EncoderSpec, context: Any, startup_timeout_s: float):
        self.spec, self.context, self.startup_timeout_s = spec, context, startup_timeout_s
        self.proc: Any = None
        self.conn: Any = None
        self.starting = False  # spawned, its "ready" message not received yet
        self.lock = threading.Lock()
        self.spawn()

    def spawn(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, child_end = self.context.Pipe()
        self.proc = self.context.Process(target=_child, args=(child_end, self.spec), name="embedpipe-model",
                                         daemon=True)
        self.proc.start()
        self.starting = True
        child_end.close()  # only the child holds it now: its exit makes our recv() fail instead of hang

    def wait_ready(self) -> tuple[str, str, bool]:
        """Wait for the child's model; returns the variant and device it runs, and whether it is compiled."""
        if not self.conn.poll(self.startup_timeout_s):
            self._kill()
            raise ModelUnavailable(f"the model process was not ready after {self.startup_timeout_s:.0f} s")
        return self._ready_message()

    def _ready_message(self) -> tuple[str, str, bool]:
        try:
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            self.starting = False
            raise ModelUnavailable(f"the model process exited with code {self.proc.exitcode} while loading the "
                                   "model") from None
        self.starting = False
        if status != "ready":
            raise ModelProcessError(f"the model process could not load the model: {payload}")
        return payload["variant"], payload["device"], payload["compiled"]

    def _kill(self) -> None:
        self.proc.kill()  # SIGKILL: also ends a stopped (SIGSTOP) process
        self.proc.join(5)
        self.starting = False

    def _up(self) -> None:
        """A child that can take a run: the current one, a starting one waited for, or a new one."""
        if not self.starting and not self.proc.is_alive():
            log.warning("model process exited (code %s); starting a new one", self.proc.exitcode)
            self.spawn()
        if self.starting:
            self.wait_ready()

    def run(self, ids: list[list[int]], batch_size: int, deadline_s: float = 0.0) -> np.ndarray:
        """One model run; `deadline_s` (0: none) bounds the wait for its answer."""
        with self.lock:
            self._up()
            try:
                self.conn.send((ids, batch_size))
                if deadline_s and not self.conn.poll(deadline_s):
                    pid = self.proc.pid
                    self._kill()
                    log.error("model process pid %s did not answer a model run of %d inputs within %.1f s: killed, "
                              "starting a new one", pid, len(ids), deadline_s)
                    self.spawn()
                    raise ModelUnavailable(f"the model did not answer within {deadline_s:.1f} s; its process "
                                           "was killed and is being restarted")
                status, payload = self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(5)
                raise ModelUnavailable(f"the model process died during a model run (exit code "
                                       f"{self.proc.exitcode}); a new one is starting") from None
        if status != "ok":
            raise ModelProcessError(f"model run failed in the model process:\n{payload}")
        return payload

    def available(self) -> bool:
        """Whether this child can answer now, without waiting. When no run holds the worker, it also takes a
        restarted child's "ready" message, or starts a new child for a dead one."""
        if not self.lock.acquire(blocking=False):  # a run is in progress
            return not self.starting and self.proc is not None and self.proc.is_alive()
        try:
            if self.proc is None:
                return False
            if not self.starting and not self.proc.is_alive():
                log.warning("model process exited (code %s); starting a new one", self.proc.exitcode)
                self.spawn()
            if self.starting and self.conn.poll(0):
                try:
                    self._ready_message()
                except ModelProcessError as e:
                    log.error("%s", e)
                    return False
            return not self.starting and self.proc.is_alive()
        finally:
            self.lock.release()

    def close(self) -> None:
        """Stop the child (it exits when its pipe closes; killed if it does not within 10 s)."""
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.proc = None


class ProcessEncoder:
    """`local`'s interface (tokenize, dimension, prompts, ...) with `encode_ids` computed in child processes.

    `workers` model runs at a time, one per child; a run waits for a free child.

    `call_timeout_s` (0: none) is the deadline of a model call of `call_tokens` tokens (the server sets it to
    its `max_batch_tokens`, a full call); a call of n tokens gets `call_timeout_s * max(1/4, n / call_tokens)`,
    so a hung child is noticed sooner on small calls, while big ones keep a generous bound. A child that misses
    it is killed and restarted, and the call raises `ModelUnavailable`.
    """

    def __init__(self, spec: EncoderSpec, local: Any = None, startup_timeout_s: float = 600.0, workers: int = 1,
                 call_timeout_s: float = 0.0):
        if workers < 1:
            raise ValueError(f"model workers must be >= 1, got {workers}")
        self.spec, self.workers = spec, workers
        self.call_timeout_s, self.call_tokens = call_timeout_s, 512
        context = mp.get_context("spawn")  # fork after torch/onnxruntime made their thread pools is unsafe
        self._workers: list[_Worker] = []
        self._idle: queue.Queue[_Worker] = queue.Queue()
        try:
            # the children load their models while the parent loads the local copy
            self._workers = [_Worker(spec, context, startup_timeout_s) for _ in range(workers)]
            # the parent's copy only tokenises: on the CPU, one thread, whatever device the model runs on
            self._local = local if local is not None else build_encoder(
                replace(spec, device="cpu", threads=1, compile=False))
            for worker in self._workers:
                self.variant, self.device, self.compiled = worker.wait_ready()
                self._idle.put(worker)
        except BaseException:
            self.close()
            raise

    @property
    def local(self) -> Any:
        """The parent's own encoder (tokenising, metadata)."""
        return self._local

    @property
    def pid(self) -> int | None:
        """The first model process's pid."""
        return self._workers[0].proc.pid if self._workers and self._workers[0].proc is not None else None

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc is not None]

    def __getattr__(self, name: str) -> Any:  # tokenize, dimension, max_seq_length, prompts, variant, device, name
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._local, name)

    def available(self) -> bool:
        """Whether some model process can answer now (see `_Worker.available`)."""
        return any([worker.available() for worker in self._workers])  # every one checked: restarts begin

    def encode(self, texts: list[str], prompt: str = "", batch_size: int = 32) -> np.ndarray:
        return self.encode_ids(self._local.tokenize([prompt + t for t in texts]), batch_size)

    def deadline_s(self, ids: list[list[int]]) -> float:
        """The model call's deadline in seconds (0: none), see the class docstring."""
        tokens = sum(len(row) for row in ids)
        return self.call_timeout_s * max(0.25, tokens / max(1, self.call_tokens))

    def encode_ids(self, ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
        worker = self._idle.get()
        try:
            return worker.run(ids, batch_size, self.deadline_s(ids))
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        """Stop every child."""
        for worker in self._workers:
            worker.close()

    def __enter__(self) -> ProcessEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
