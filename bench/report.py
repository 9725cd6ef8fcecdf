"""What every benchmark prints: one table (rich on a terminal, aligned plain text in a pipe), then
notes. Shared by bench/*.py, which run as scripts with this folder on sys.path."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def per_op(rate: float, digits: int = 1) -> str:
    """Seconds per operation of a rate in ops/s, in s, ms or us."""
    seconds = 1 / rate
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.001:
        return f"{seconds * 1000:.{digits}f} ms"
    return f"{seconds * 1e6:.{digits}f} us"


def rate(value: float) -> str:
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def render(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    title: str,
    notes: Sequence[str],
    *,
    left_columns: int = 1,
) -> None:
    """Print the table; the first `left_columns` columns are left-aligned, the rest right-aligned.
    On a terminal, a new section starts wherever the first column changes."""
    if sys.stdout.isatty():
        from rich import box
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for i, header in enumerate(headers):
            table.add_column(header, justify="left" if i < left_columns else "right", no_wrap=True)
        previous = None
        for row in rows:
            if previous is not None and row[0] != previous:
                table.add_section()
            previous = row[0]
            table.add_row(*row)
        console = Console()
        console.print(table)
        for note in notes:
            console.print(note, highlight=False, markup=False)
        return
    lines = [tuple(headers), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]

    def fmt(line: Sequence[str]) -> str:
        padded = (
            cell.ljust(w) if i < left_columns else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    print(title)
    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))
    for note in notes:
        print(note)


def parse_count(text: str, *, minimum: int = 1, what: str = "count") -> int:
    """'100k' → 100000, '2m' → 2000000; argparse-friendly errors."""
    import argparse

    part = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
    try:
        count = int(float(part[:-1] if scale != 1 else part) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {what}: {text!r} (use e.g. 100k)") from None
    if count < minimum:
        raise argparse.ArgumentTypeError(f"a {what} is at least {minimum}")
    return count
