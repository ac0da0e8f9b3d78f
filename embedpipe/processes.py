"""Child servers on loopback (the embedded LLM server, the embeddings server): a free port, a readiness wait, a stop.

Shared by `llm_server` (sdg) and `server.ServerProcess` (deploy_check, tests, benchmarks) so that both start,
wait for and stop their child the same way.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable

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
