"""Progress with an ETA for every long step, on a terminal and off it.

On a terminal this is tqdm. Under `dvc repro`, CI or a log file tqdm would either print nothing
(`disable=None`) or a wall of carriage returns, so there we print one plain line every `interval`
seconds: done/total, rate and ETA. Both have the same small interface: `update`, `set_postfix`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LineProgress:
    """A tqdm look-alike for non-terminals: a line every `interval` seconds and one at the end."""

    def __init__(self, total: int, desc: str, unit: str = "it", interval: float = 30.0,
                 file: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.interval = int(total), desc, unit, interval
        self.file = file or sys.stderr
        self.n = 0
        self.postfix = ""
        self.start = self.last_print = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = _fmt_seconds((self.total - self.n) / rate) if rate > 0 and self.total else "?"
        extra = f" {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.2f} {self.unit}/s, "
                f"elapsed {_fmt_seconds(elapsed)}, ETA {eta}{extra}")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_print >= self.interval:
            self.last_print = now
            print(self.line(), file=self.file, flush=True)

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        print(self.line() + " done", file=self.file, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it", interval: float = 30.0, file: TextIO | None = None):
    """tqdm on a terminal, `LineProgress` elsewhere. Use as a context manager."""
    stream = file or sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    return LineProgress(total, desc, unit, interval, stream)
