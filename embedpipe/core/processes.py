"""Child servers on loopback (the embedded LLM server, the embeddings server, Infinity in the serving bench).

`ChildServer` is the one lifecycle they share: a free port, a log file, a readiness wait that shows the log when
the child dies or is late, and a stop (SIGTERM, then SIGKILL) that also runs when the wait fails.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(
    proc: subprocess.Popen,
    url: str,
    timeout_s: float,
    name: str,
    log_tail: Callable[[], str],
    error: type[Exception] = RuntimeError,
) -> None:
    """Poll `url` until it answers 200; raise `error` with the child's log if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"{name} exited with code {proc.returncode} before it was ready:\n{log_tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise error(f"{name} not ready after {timeout_s:.0f} s:\n{log_tail()}")


def stop_process(proc: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM, then SIGKILL if the child has not exited within timeout_s; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ChildServer:
    """`cmd` as a child process, ready when `ready_url` answers 200; `with` starts it and always stops it.

    The child's output goes to `log_path`, or to a temporary file that `close()` deletes. A failed or late start
    raises `error` with the log's tail and stops the child: nothing is left running behind the caller.
    """

    def __init__(self, name: str, cmd: list[str], ready_url: str, *, startup_timeout_s: float = 120.0,
                 stop_timeout_s: float = 20.0, log_path: str | Path | None = None,
                 error: type[Exception] = RuntimeError, **popen_kwargs: Any):
        self.name, self.cmd, self.ready_url = name, cmd, ready_url
        self.startup_timeout_s, self.stop_timeout_s, self.error = startup_timeout_s, stop_timeout_s, error
        self.popen_kwargs = popen_kwargs
        self.temporary_log = log_path is None
        if log_path is None:
            with tempfile.NamedTemporaryFile(prefix=f"embedpipe-{name.split()[0]}-", suffix=".log", delete=False) as f:
                log_path = f.name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    def start(self) -> ChildServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         **self.popen_kwargs)
        try:
            wait_until_ready(self.proc, self.ready_url, self.startup_timeout_s, self.name, self.log_tail, self.error)
        except self.error:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def exit_reason(self) -> str | None:
        """None while the child runs; once it has died, what happened (exit code or signal) and its log's tail."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exited with code {code}"
        return f"the {self.name} {how}; its log ({self.log_path}) ends with:\n{self.log_tail(1500)}"

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within timeout_s; returns the exit code (None: never started)."""
        if self.proc is None:
            return None
        return stop_process(self.proc, self.stop_timeout_s if timeout_s is None else timeout_s)

    def close(self) -> int | None:
        """Stop the child and delete a temporary log; returns its exit code."""
        rc = self.stop()
        if self.temporary_log:
            self.log_path.unlink(missing_ok=True)
        return rc

    def __enter__(self) -> ChildServer:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
