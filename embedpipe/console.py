"""Terminal output shared by the stages: a summary table at the end of each stage, warnings, errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

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
