"""Terminal output shared by the stages: a summary table at the end of each stage, warnings, errors."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

# soft_wrap: a message stays one line (the terminal wraps it), so logs and piped output never break a phrase
# across lines; tables still fit the width.
console = Console(stderr=True, highlight=False, soft_wrap=True)


def summary(title: str, rows: Mapping[str, Any]) -> None:
    """Print a two-column table of a stage's key figures."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(str(key), _fmt(value))
    console.print(table)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def alert(message: str) -> None:
    """A result the user must not miss (a regression, a failed check)."""
    console.print(f"[bold red]{message}[/bold red]")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)

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
