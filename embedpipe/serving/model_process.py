"""The server's model in a process of its own: `ProcessEncoder` has the encoder interface, but its model runs in a
child process, so the server's Python work (HTTP, JSON, tokenising, rendering) never competes with it for the GIL.

Why: torch releases the GIL inside each operator and takes it back after. In one process, every time the model
thread wants it back while an HTTP thread is busy in Python, it waits (up to the 5 ms switch interval), and a
MiniLM forward is ~150 operators: the model idles while the cores are free. Measured on 2 cores: the server kept
1.35-1.4 cores busy at concurrency 8 and lost 38 % of the in-process throughput (docs/export-and-serve.md).
A child process has its own GIL; the parent's model thread only waits on a pipe.

The parent keeps its own encoder for tokenising and the model card (a second copy of the weights in memory; the
parent never runs it). The child is rebuilt from the same `EncoderSpec`. If the child dies (killed, out of
memory), the requests of that model run get a 500 and the next run starts a fresh child. It ignores SIGINT and
SIGTERM (the parent drains its queue through it on shutdown) and exits when the parent's end of the pipe closes,
so it never outlives the server.

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
import traceback
from dataclasses import replace
from typing import Any

import numpy as np

from embedpipe.core.encoders import EncoderSpec, build_encoder

log = logging.getLogger("embedpipe.serving.server")


class ModelProcessError(RuntimeError):
    """The model process failed to start, or died during a model run."""


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
    """One model process and the pipe to it; one model run at a time."""

    def __init__(self, spec: EncoderSpec, context: Any, startup_timeout_s: float):
        self.spec, self.context, self.startup_timeout_s = spec, context, startup_timeout_s
        self.proc: Any = None
        self.conn: Any = None
        self.spawn()

    def spawn(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, child_end = self.context.Pipe()
        self.proc = self.context.Process(target=_child, args=(child_end, self.spec), name="embedpipe-model",
                                         daemon=True)
        self.proc.start()
        child_end.close()  # only the child holds it now: its exit makes our recv() fail instead of hang

    def wait_ready(self) -> tuple[str, str, bool]:
        """Wait for the child's model; returns the variant and device it runs, and whether it is compiled."""
        if not self.conn.poll(self.startup_timeout_s):
            raise ModelProcessError(f"the model process was not ready after {self.startup_timeout_s:.0f} s")
        try:
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise ModelProcessError(f"the model process exited with code {self.proc.exitcode} while loading the "
                                    "model") from None
        if status != "ready":
            raise ModelProcessError(f"the model process could not load the model: {payload}")
        return payload["variant"], payload["device"], payload["compiled"]

    def run(self, ids: list[list[int]], batch_size: int) -> np.ndarray:
        if self.proc is None or not self.proc.is_alive():
            code = self.proc.exitcode if self.proc is not None else None
            log.warning("model process exited (code %s); starting a new one", code)
            self.spawn()
            self.wait_ready()
        try:
            self.conn.send((ids, batch_size))
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise ModelProcessError(f"the model process died during a model run (exit code "
                                    f"{self.proc.exitcode}); the next run starts a new one") from None
        if status != "ok":
            raise ModelProcessError(f"model run failed in the model process:\n{payload}")
        return payload

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
    """

    def __init__(self, spec: EncoderSpec, local: Any = None, startup_timeout_s: float = 600.0, workers: int = 1):
        if workers < 1:
            raise ValueError(f"model workers must be >= 1, got {workers}")
        self.spec, self.workers = spec, workers
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

    def encode(self, texts: list[str], prompt: str = "", batch_size: int = 32) -> np.ndarray:
        return self.encode_ids(self._local.tokenize([prompt + t for t in texts]), batch_size)

    def encode_ids(self, ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
        worker = self._idle.get()
        try:
            return worker.run(ids, batch_size)
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
