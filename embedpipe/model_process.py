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
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import traceback
from dataclasses import replace
from typing import Any

import numpy as np

from embedpipe.onnx_encoder import EncoderSpec, build_encoder

log = logging.getLogger("embedpipe.server")


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
    conn.send(("ready", {"variant": encoder.variant, "device": str(encoder.device)}))
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


class ProcessEncoder:
    """`local`'s interface (tokenize, dimension, prompts, ...) with `encode_ids` computed in a child process.

    One model run at a time (a lock), which is how the server calls it (one model thread).
    """

    def __init__(self, spec: EncoderSpec, local: Any = None, startup_timeout_s: float = 600.0):
        self.spec, self.startup_timeout_s = spec, startup_timeout_s
        self._lock = threading.Lock()
        self._context = mp.get_context("spawn")  # fork after torch/onnxruntime made their thread pools is unsafe
        self._proc: Any = None
        self._conn: Any = None
        self._spawn()  # the child loads its model while the parent loads the local copy
        try:
            # the parent's copy only tokenises: on the CPU, one thread, whatever device the model runs on
            self._local = local if local is not None else build_encoder(replace(spec, device="cpu", threads=1))
            self.variant, self.device = self._wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def local(self) -> Any:
        """The parent's own encoder (tokenising, metadata)."""
        return self._local

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __getattr__(self, name: str) -> Any:  # tokenize, dimension, max_seq_length, prompts, variant, device, name
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._local, name)

    def encode(self, texts: list[str], prompt: str = "", batch_size: int = 32) -> np.ndarray:
        return self.encode_ids(self._local.tokenize([prompt + t for t in texts]), batch_size)

    def encode_ids(self, ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                code = self._proc.exitcode if self._proc is not None else None
                log.warning("model process exited (code %s); starting a new one", code)
                self._spawn()
                self._wait_ready()
            try:
                self._conn.send((ids, batch_size))
                status, payload = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                raise ModelProcessError(f"the model process died during a model run (exit code "
                                        f"{self._proc.exitcode}); the next run starts a new one") from None
        if status != "ok":
            raise ModelProcessError(f"model run failed in the model process:\n{payload}")
        return payload

    def close(self) -> None:
        """Stop the child (it exits when its pipe closes; killed if it does not within 10 s)."""
        if self._conn is not None:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._proc = None

    def __enter__(self) -> ProcessEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, child_end = self._context.Pipe()
        self._proc = self._context.Process(target=_child, args=(child_end, self.spec), name="embedpipe-model",
                                           daemon=True)
        self._proc.start()
        child_end.close()  # only the child holds it now: its exit makes our recv() fail instead of hang

    def _wait_ready(self) -> tuple[str, str]:
        """Wait for the child's model; returns the variant and device it runs."""
        if not self._conn.poll(self.startup_timeout_s):
            raise ModelProcessError(f"the model process was not ready after {self.startup_timeout_s:.0f} s")
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            raise ModelProcessError(f"the model process exited with code {self._proc.exitcode} while loading the "
                                    "model") from None
        if status != "ready":
            raise ModelProcessError(f"the model process could not load the model: {payload}")
        return payload["variant"], payload["device"]
