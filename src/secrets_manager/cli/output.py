"""Everything the CLI prints: one-line errors and warnings on stderr, tables or JSON on stdout.

Tables use rich on a terminal and plain tab-separated lines in a pipe, so scripts can parse them;
progress bars likewise appear on a terminal only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import click

PROG = "secrets-manager"


def error_line(message: str) -> None:
    click.echo(f"{PROG}: error: {_one_line(message)}", err=True)


def warning_line(message: str) -> None:
    click.echo(f"{PROG}: warning: {_one_line(message)}", err=True)


def info_line(message: str) -> None:
    click.echo(f"{PROG}: {_one_line(message)}", err=True)


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False))


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns, box=None, header_style="bold", pad_edge=False)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        for row in rows:
            click.echo("\t".join(row))


@contextmanager
def progress_bars(description: str) -> Iterator[Callable[[str, int, int], None]]:
    """A reporter `report(label, done, total)` that draws one rich progress bar per label on stderr
    when stderr is a terminal, and does nothing otherwise (a long job stays quiet in a pipe)."""
    if not sys.stderr.isatty():
        yield lambda _label, _done, _total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        tasks: dict[str, TaskID] = {}

        def report(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(f"{description} {label}", total=total)
            progress.update(tasks[label], completed=done, total=total)

        yield report


def timestamp(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(message: str) -> str:
    return " ".join(message.split())
