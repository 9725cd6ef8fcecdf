"""Everything the CLI prints: one-line errors and warnings on stderr, tables or JSON on stdout.

Tables use rich on a terminal and plain tab-separated lines in a pipe, so scripts can parse them;
progress bars likewise appear on a terminal only.

Text that came from a store (descriptions, tags, authors: a store written before metadata was
checked, or a Vault or AWS store written by another tool, may hold anything) never reaches the
terminal raw: every cell of a table and every message line shows control characters escaped
(`\\x1b`, `\\n`, `\\t`), so it cannot move the cursor, retitle the window or forge a row or column.
JSON escapes C0 controls itself; `print_json` also escapes DEL, the C1 controls (0x9b is CSI on
some terminals) and the characters below, which `json.dumps` leaves raw; the document decodes the same.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from secrets_manager.errors import InvalidInputError, shell_join
from secrets_manager.store.base import utc_text
from secrets_manager.store.url import url_without_password

PROG = "secrets-manager"


_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
# Besides control characters (Cc): line and paragraph separators, and the bidirectional overrides
# and isolates that reorder what a terminal shows ("Trojan Source").
_ALSO_ESCAPED = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# What json.dumps(ensure_ascii=False) leaves raw of those; they occur only inside JSON strings.
# Lone surrogates too (a forged record's "\\ud800"): UTF-8 cannot write them.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# What a terminal acts on rather than shows, in a value `get` would print: C0 controls but tab and
# newline (a carriage return only before a newline: CRLF text), DEL and the C1 controls.
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|\r(?!\n)")
_AGE = re.compile(r"([0-9]+)([smhd])")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def printable(text: str) -> str:
    """`text` with every control character written as an escape (`\\t`, `\\n`, `\\r`, `\\x1b`,
    `\\u202e`), safe to print on a terminal and in one tab-separated field."""
    if text.isprintable():
        return text
    return "".join(_escaped(char) for char in text)


def _escaped(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if unicodedata.category(char) in ("Cc", "Cs") or char in _ALSO_ESCAPED:
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def terminal_control(text: str) -> str | None:
    """The first character of `text` a terminal would act on (escape, bell, a lone carriage
    return…), escaped for an error line; None if it shows as it is."""
    found = _TERMINAL_CONTROLS.search(text)
    return printable(found[0]) if found else None


class OutputClosed(Exception):  # not an OSError: click would turn EPIPE into exit 1
    """The reader of standard output went away (`| head`): the command ends quietly, exit 0."""


class OutputFailed(Exception):
    """Standard output cannot be written (a full disk, a closed descriptor): exit 1 naming it."""

    def __init__(self, reason: str, done: str | None = None) -> None:
        self.reason, self.done = reason, done
        super().__init__(self.message())

    def message(self) -> str:
        if self.done:
            return f"{self.done}, but its output could not be written to standard output: {self.reason}"
        return (
            f"cannot write the output to standard output: {self.reason}; check where it goes "
            "(a full disk, a closed file)"
        )


class StandardOutput(io.RawIOBase):
    """File descriptor 1 for `sys.stdout`, whose write errors are OutputClosed and OutputFailed,
    so main can tell them from any other OSError. `closed_at_start`: fd 1 was closed when the
    process started (`>&-`; main put /dev/null there so no file opened later lands on it), and
    any output fails."""

    def __init__(self, *, closed_at_start: bool) -> None:
        super().__init__()
        self._closed_at_start = closed_at_start
        self._discarding = False

    def discard(self) -> None:
        """After a failure has been reported: drop what is left (the exit's flush must not fail)."""
        self._discarding = True

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return not self._closed_at_start and os.isatty(1)

    def write(self, data: Any) -> int:
        if self._discarding:
            return len(data)
        if self._closed_at_start:
            raise OutputFailed("it is closed")
        try:
            return os.write(1, data)
        except BrokenPipeError:
            raise OutputClosed() from None
        except OSError as exc:
            raise OutputFailed(exc.strerror or type(exc).__name__) from None


class StandardError(io.RawIOBase):
    """File descriptor 2 for `sys.stderr`: what cannot be written there (a reader gone, a full
    disk, fd 2 closed when the process started) is dropped, so a lost warning or error line
    neither fails a command that did its work nor changes its exit code, as in other Unix tools.
    `closed_at_start`: fd 2 was closed (`2>&-`; main put /dev/null there so no file opened later
    lands on it, and a child such as a rotation's set command writes into /dev/null)."""

    def __init__(self, *, closed_at_start: bool) -> None:
        super().__init__()
        self._lost = closed_at_start

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2

    def isatty(self) -> bool:
        return not self._lost and os.isatty(2)

    def write(self, data: Any) -> int:
        if not self._lost:
            try:
                return os.write(2, data)
            except OSError:  # EPIPE, ENOSPC, EIO: nowhere else to say it
                self._lost = True
        return len(data)


class ClosedInput(io.RawIOBase):
    """`sys.stdin` when fd 0 was closed as the process started (`<&-`; main put /dev/null there so
    no file opened later lands on it): reading it is invalid input, not an internal error."""

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 0

    def readinto(self, buffer: Any) -> int:
        raise InvalidInputError(
            "standard input is closed; give the input on it (a pipe or a file: < FILE), or as the "
            "command's options say"
        )


@contextmanager
def output_of(done: str) -> Iterator[None]:
    """Around a command's output after it changed something: a failed write says what was done."""
    try:
        yield
        sys.stdout.flush()
    except OutputFailed as exc:
        raise OutputFailed(exc.reason, done) from None


class Seconds(click.ParamType[float, Any]):
    """A duration option in seconds: a finite number above 0 and at most `most`. click's FloatRange
    lets 'nan' through (every comparison with it is false), and a nan timeout failed only once the
    command had changed something."""

    name = "seconds"

    def __init__(self, most: float) -> None:
        self.most = most

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not (math.isfinite(seconds) and 0 < seconds <= self.most):
            self.fail(f"{value!r} is not a number of seconds above 0 and at most {self.most:g}", param, ctx)
        return seconds


def error_line(message: str) -> None:
    click.echo(f"{PROG}: error: {_one_line(message)}", err=True)


def warning_line(message: str) -> None:
    click.echo(f"{PROG}: warning: {_one_line(message)}", err=True)


def info_line(message: str) -> None:
    click.echo(f"{PROG}: {_one_line(message)}", err=True)


def print_json(doc: Any, *, compact: bool = False) -> None:
    """`doc` as indented JSON, or on one line (`compact`: a stream of events, one per line)."""
    indent, separators = (None, (",", ":")) if compact else (2, None)
    text = json.dumps(doc, indent=indent, separators=separators, sort_keys=True, ensure_ascii=False)
    # UTF-8 bytes, as JSON is exchanged (RFC 8259), whatever the locale's encoding (Latin-1 could
    # not hold every character, and would give another program other bytes than it parses)
    click.echo(_JSON_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text).encode("utf-8"))


FREE_TEXT_MIN_WIDTH = 12  # a free-text column folds down to this before a table grows wider


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    free_text: Collection[str] = (),
    header: bool = True,
) -> None:
    """Rows as plain tab-separated lines in a pipe; on a terminal a rich table that cuts no cell.

    On a terminal, a column with no text in any row is left out; the `free_text` columns (a
    description, an author) fold onto more lines to fit, down to FREE_TEXT_MIN_WIDTH; every other
    column (names, times, versions) keeps its full width. A table that still does not fit is
    printed wider than the terminal, which wraps its lines: better than a name cut to `market-co…`.
    Without `header`: the rows alone (more rows of a table printed before, as they come)."""
    if not sys.stdout.isatty():
        for row in rows:
            click.echo("\t".join(printable(cell) for cell in row))
        return
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    cells = [[printable(cell) for cell in row] for row in rows]
    shown = [i for i in range(len(columns)) if any(row[i] for row in cells)]
    if not shown:  # no rows, or none with any text: the header alone, every column
        shown = list(range(len(columns)))
    natural = {i: max([cell_len(columns[i]), *(cell_len(row[i]) for row in cells)]) for i in shown}
    folding = [i for i in shown if columns[i] in free_text]
    fixed = sum(natural[i] for i in shown if i not in folding) + 2 * (len(shown) - 1)  # padding: 1 a side
    console = Console()
    least = fixed + sum(min(natural[i], FREE_TEXT_MIN_WIDTH) for i in folding)
    if console.width < least:  # with the height too, or rich keeps a dumb terminal's 80 columns
        console = Console(width=least, height=console.height)
    widths = dict(natural)
    room = console.width - fixed
    for count, i in enumerate(sorted(folding, key=natural.__getitem__)):  # narrowest first
        widths[i] = min(natural[i], max(room // (len(folding) - count), FREE_TEXT_MIN_WIDTH))
        room -= widths[i]
    table = Table(box=None, header_style="bold", pad_edge=False, show_header=header)
    for i in shown:
        table.add_column(columns[i], width=widths[i], no_wrap=i not in folding, overflow="fold")
    for row in cells:
        table.add_row(*(Text(row[i]) for i in shown))  # Text: no markup in cells
    console.print(table)


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


def parse_cutoff(text: str, option: str, without: str) -> datetime:
    """The moment an option such as `--since` names, in UTC: ISO 8601 (UTC unless it says
    otherwise) or an age ago (30m, 12h, 7d). An age reaching before year 1 is refused (datetime
    overflows), and so is a time whose offset takes it out of years 1 to 9999 in UTC
    (0001-01-01T00:00:00+05:00): printed or compared, it overflowed (`purge`: an internal error);
    `without` says what leaving the option out does."""
    match = _AGE.fullmatch(text.strip())
    if match:
        amount, unit = match.groups()
        try:
            return datetime.now(UTC) - timedelta(**{_AGE_UNITS[unit]: int(amount)})
        except (OverflowError, ValueError):  # ValueError: int() of thousands of digits
            raise InvalidInputError(f"{option} {text!r} reaches back before year 1; {without}") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(
            f"{option} {text!r}: give an ISO 8601 time or an age like 30m, 12h, 7d"
        ) from None
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:
        raise InvalidInputError(
            f"{option} {text!r} is outside years 1 to 9999 in UTC; give a time within them"
        ) from None


def parse_deadline(text: str, option: str) -> datetime:
    """The moment an option such as `--expires` names, `parse_cutoff`'s other way: ISO 8601 (UTC
    unless it says otherwise) or an age from now (12h, 90d). Seconds are dropped (stores keep whole
    seconds)."""
    match = _AGE.fullmatch(text.strip())
    if not match:
        try:
            written = datetime.fromisoformat(text)
        except ValueError:  # no time at all
            raise InvalidInputError(
                f"{option} {text!r}: give an ISO 8601 time (2027-03-01, 2027-03-01T12:00:00Z) or an age "
                "from now like 12h, 90d"
            ) from None
    try:
        if match:
            amount, unit = match.groups()
            moment = datetime.now(UTC) + timedelta(**{_AGE_UNITS[unit]: int(amount)})
        else:
            moment = written if written.tzinfo else written.replace(tzinfo=UTC)
        return moment.astimezone(UTC).replace(microsecond=0)
    except (OverflowError, ValueError):  # ValueError: int() of thousands of digits
        raise InvalidInputError(
            f"{option} {text!r} is outside years 1 to 9999 in UTC; give a time within them"
        ) from None


def expiry_text(expires: datetime | None, now: datetime | None = None) -> str:
    """An expiry as `list -l`, `metadata` and `history` show it: the time, and whether it passed."""
    if expires is None:
        return ""
    left = expires - (now or datetime.now(UTC))
    if left.total_seconds() <= 0:
        return f"{timestamp(expires)} (expired)"
    return (
        f"{timestamp(expires)} (in {counted(left.days, 'day')})"
        if left.days
        else f"{timestamp(expires)} (within a day)"
    )


def counted(count: float, noun: str, plural: str = "") -> str:
    """`count` with its noun, singular for one: "1 record", "2 records", "0 records", "1.5 days";
    `plural` where adding "s" is wrong ("identities")."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def byte_size(size: int) -> str:
    """A byte count as people read it: bytes, KiB or MiB (binary units, one decimal)."""
    if size < 1024:
        return counted(size, "byte")
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024 / 1024:.1f} MiB"


def timestamp(value: datetime | None) -> str:
    """A time as every command prints it (ISO 8601 UTC, four-digit year), or "" for none."""
    return "" if value is None else utc_text(value)


def _one_line(message: str) -> str:
    return printable(" ".join(message.split()))


def invocation() -> tuple[str, ...]:
    """`secrets-manager` and the global options given on this command line (not from the
    environment, which a pasted command inherits), for the commands a message suggests: without
    --store or --server they would act on another store. A store URL's password is left out."""
    context = click.get_current_context(silent=True)
    words = ["secrets-manager"]
    if context is None:
        return tuple(words)
    root = context.find_root()
    for param, flag in (
        ("store_url", "--store"),
        ("server", "--server"),
        ("password_file", "--password-file"),
        ("audit_file", "--audit-file"),
    ):
        value = root.params.get(param)
        if not value or root.get_parameter_source(param) is not click.core.ParameterSource.COMMANDLINE:
            continue
        if param == "store_url":
            value = url_without_password(value) if "://" in value else os.path.abspath(value)
        elif param == "audit_file":
            value = os.path.abspath(value)
        elif param == "password_file":
            if not _a_file_at_rest(value):  # <(…), /dev/stdin: gone once this command ends
                continue
            value = os.path.abspath(value)
        words += [flag, value]
    return tuple(words)


def _a_file_at_rest(path: str) -> bool:
    """Whether `path` is a regular file that outlives this command (not a pipe such as `<(…)`)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def suggested(*words: str) -> str:
    """The command `secrets-manager WORDS…` as a shell line to paste, with this command line's
    global options (`invocation`)."""
    return shell_join([*invocation(), *words])
