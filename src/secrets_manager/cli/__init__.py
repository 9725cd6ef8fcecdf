"""The `secrets-manager` command line: parse, call the store, format. Nothing else.

`main` turns every error into one line on stderr and the exit code documented in errors.py, so no
traceback ever reaches a user.
"""

from __future__ import annotations

import io
import logging
import os
import sys

import click

from secrets_manager.cli.app import cli
from secrets_manager.cli.output import (
    ClosedInput,
    OutputClosed,
    OutputFailed,
    StandardError,
    StandardOutput,
    error_line,
    warning_line,
)
from secrets_manager.core_dumps import keep_secrets_out_of_core_dumps
from secrets_manager.environment import Environment, current_environment
from secrets_manager.errors import SecretsManagerError, missing_module_line

DEBUG_VARIABLE = "SECRETS_MANAGER_DEBUG"
# The options `secrets-manager` takes before its command (README: "Global options").
_GLOBAL_OPTIONS = ("--store", "--password-file", "--audit-file", "--server")


def _debugging() -> bool:
    """SECRETS_MANAGER_DEBUG set to something other than off (empty, 0, false, no, off)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the documented exit code."""
    _own_standard_output()
    keep_secrets_out_of_core_dumps(development=_development())
    code = run(argv)
    sys.exit(code)


def _development() -> bool:
    """Whether SHRIVENQUANT_ENV says development; an invalid value (the command will refuse it) is
    not, so the stricter setting holds until then."""
    try:
        return current_environment() is Environment.DEVELOPMENT
    except SecretsManagerError:
        return False


def _own_standard_output() -> None:
    """`sys.stdout` on fd 1 through StandardOutput, so a closed pipe or a full disk is told from
    any other OSError. A closed fd 0 or 1 (`<&-`, `>&-`) gets /dev/null, so no file opened later
    lands there, and reading or writing it is a one-line error. `sys.stderr` on fd 2 through
    StandardError, which drops what cannot be written there; a closed fd 2 (`2>&-`) gets
    /dev/null too (a store file opened there would take every later error line)."""
    if _closed(0, os.O_RDONLY):
        sys.stdin = io.TextIOWrapper(io.BufferedReader(ClosedInput()), encoding="utf-8")
    closed = _closed(1, os.O_WRONLY)
    original = sys.stdout
    errors = getattr(original, "errors", None) or "strict"
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(StandardOutput(closed_at_start=closed)),
        encoding=getattr(original, "encoding", None) or "utf-8",
        # a character the locale's encoding lacks (a Latin-1 locale, a description's '€') is
        # shown escaped, as control characters are, not an internal error
        errors="backslashreplace" if errors == "strict" else errors,
        line_buffering=bool(getattr(original, "line_buffering", False)),
    )
    error_closed = _closed(2, os.O_WRONLY)
    original = sys.stderr
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(StandardError(closed_at_start=error_closed)),
        encoding=getattr(original, "encoding", None) or "utf-8",
        errors=getattr(original, "errors", None) or "backslashreplace",
        line_buffering=True,
        write_through=True,
    )


def _closed(fd: int, mode: int) -> bool:
    """Whether `fd` was closed; if so, it is /dev/null now."""
    try:
        os.fstat(fd)
        return False
    except OSError:
        devnull = os.open(os.devnull, mode)
        if devnull != fd:
            os.dup2(devnull, fd)
            os.close(devnull)
        return True


def _discard_output() -> None:
    """After a closed pipe or a failed write: whatever is still buffered goes nowhere."""
    raw = getattr(getattr(sys.stdout, "buffer", None), "raw", None)
    if isinstance(raw, StandardOutput):
        raw.discard()
    else:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class _WarningLines(logging.Handler):
    """Library warnings (e.g. a password in a PostgreSQL URL) as the CLI's own warning lines;
    `serve` replaces this with its JSON log handler."""

    def emit(self, record: logging.LogRecord) -> None:
        warning_line(record.getMessage())


def run(argv: list[str] | None = None) -> int:
    library_log = logging.getLogger("secrets_manager")
    saved = (library_log.handlers[:], library_log.propagate)
    library_log.handlers[:] = [_WarningLines(logging.WARNING)]
    library_log.propagate = False
    try:
        return _run(argv)
    finally:  # as it was (for callers in the same process, such as tests)
        if library_log.handlers[:1] and isinstance(library_log.handlers[0], _WarningLines):
            library_log.handlers[:], library_log.propagate = saved


def _run(argv: list[str] | None) -> int:
    try:
        result = cli.main(args=argv, prog_name="secrets-manager", standalone_mode=False)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, so a failure is reported as any other
        return result if isinstance(result, int) else 0
    except OutputClosed:  # the reader went away (`| head`): quiet, as other Unix tools end
        _discard_output()
        return 0
    except OutputFailed as exc:
        _discard_output()
        error_line(exc.message())
        return 1
    except SecretsManagerError as exc:
        error_line(str(exc))
        for note in getattr(exc, "__notes__", ()):  # e.g. a refused unlock that could not be audited
            warning_line(str(note))
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:  # click's for a KeyboardInterrupt (Terminated: 143, 129)
        error_line("aborted")
        code: int = getattr(exc.__cause__, "exit_code", 130)
        return code
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
            # a command group given no command (`secrets-manager keys`): its help, as --help shows
            # it, not the help flattened into one error line; still the usage exit code
            click.echo(exc.ctx.get_help())
            return 2
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        message = exc.format_message().replace("\n", " ")
        if isinstance(exc, click.NoSuchOption) and exc.option_name in _GLOBAL_OPTIONS and exc.ctx is not None:
            # `list --store x.db`: click offered the command's nearest option (--json)
            command = exc.ctx.command_path.removeprefix("secrets-manager ")
            message = (
                f"{exc.option_name} is a global option: give it before the command, "
                f"'secrets-manager {exc.option_name} … {command} …'"
            )
            hint = ""
        if message.startswith("Got unexpected extra argument"):
            # click quotes them, and they are often the rest of a value typed unquoted
            takes_value = exc.ctx is not None and exc.ctx.command.name == "store"
            message = "too many arguments" + (
                " (a value with spaces? pipe it on stdin instead)" if takes_value else ""
            )
        error_line(message + hint)
        return 2
    except click.ClickException as exc:
        error_line(exc.format_message().replace("\n", " "))
        return exc.exit_code
    except BrokenPipeError:  # the same, where sys.stdout is not StandardOutput (in-process callers)
        _discard_output()
        return 0
    except KeyboardInterrupt as exc:  # 130; a Terminated (SIGTERM, SIGHUP) 128 + its number
        error_line("interrupted")
        exit_code: int = getattr(exc, "exit_code", 130)
        return exit_code
    except ModuleNotFoundError as exc:  # a dependency this environment lacks (pip --no-deps): not a bug
        if _debugging():
            raise
        error_line(missing_module_line(exc.name, sys.prefix))
        return 1
    except Exception as exc:  # a bug: say so in one line; the message is withheld (it could hold data)
        if _debugging():
            raise
        error_line(
            f"internal error ({type(exc).__name__}); rerun with {DEBUG_VARIABLE}=1 for details and report it"
        )
        return 1
