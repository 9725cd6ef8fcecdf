"""Where the master password comes from: first match wins.

    1. --password-file PATH
    2. MASTER_PASSWORD_FILE
    3. MASTER_PASSWORD            (the seed's variable; refused in production, warned in staging)
    4. a prompt on the terminal   (asked twice when a new password is set)

Files are read whole with one trailing newline removed. Production also refuses a password file
that group or others can read or that another user owns (root's is fine), checked on the file as
opened, and MASTER_PASSWORD whenever it is set, even beside a password file.
"""

from __future__ import annotations

import getpass
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from secrets_manager.cli.output import warning_line
from secrets_manager.environment import (
    PASSWORD_FILE_VARIABLE,
    PASSWORD_VARIABLE,
    Environment,
    owner_problem,
    password_variable_bytes,
)
from secrets_manager.errors import (
    InvalidInputError,
    SecretsManagerError,
    UnlockError,
    UnsafeConfigurationError,
)

MAX_PASSWORD_FILE_SIZE = 64 * 1024


def read_password(
    password_file: str | None,
    *,
    environment: Environment,
    environ: Mapping[str, str],
    confirm: bool = False,
    store: str | None = None,
) -> bytes:
    """The master password from the first source that has one; UnlockError if none does, naming
    `store` (where the store is, for the message) if given."""
    refuse_password_variable(environment, environ)
    path = password_file or environ.get(PASSWORD_FILE_VARIABLE)
    if path:
        return read_password_file(Path(path), environment=environment)
    if PASSWORD_VARIABLE in environ:
        if environment is Environment.STAGING:
            warning_line(f"{PASSWORD_VARIABLE} is unsafe outside development; use {PASSWORD_FILE_VARIABLE}")
        password = password_variable_bytes(environ[PASSWORD_VARIABLE], new=confirm)
        if not password:
            raise UnlockError(
                f"{PASSWORD_VARIABLE} is set but empty: set it to the master password, or unset it to be "
                "asked on the terminal"
            )
        return password
    return prompt_password("Master password", confirm=confirm, store=store)


def refuse_password_variable(environment: Environment, environ: Mapping[str, str]) -> None:
    """Production refuses MASTER_PASSWORD whenever it is set, even beside a password file that
    would win over it: the password sits in this process's environment all the same."""
    if environment.is_production and PASSWORD_VARIABLE in environ:
        raise UnsafeConfigurationError(
            f"{PASSWORD_VARIABLE} is refused in production (environment variables leak into child "
            f"processes and crash dumps); put the password in a 0600 file and pass --password-file "
            f"or set {PASSWORD_FILE_VARIABLE}, and unset {PASSWORD_VARIABLE}"
        )


def check_password_file(path: Path, found: os.stat_result, environment: Environment) -> None:
    """Production refuses a password file (`found`: the fstat of it as opened) that group or
    others can read, or that another user owns (root's is fine): they could read or replace it.
    Elsewhere it is a warning, as the README promises for every such file."""
    problem = owner_problem(path, found, "password file")
    if problem is None and stat.S_IMODE(found.st_mode) & 0o077:
        problem = f"password file {path} can be read by group or others; run 'chmod 600 {path}'"
    if problem is None:
        return
    if environment.is_production:
        raise UnsafeConfigurationError(problem)
    if stat.S_ISREG(found.st_mode):  # a file at rest; not a pipe (`<(pass show …)`) or a device
        warning_line(problem)


def read_password_file(path: Path, *, environment: Environment) -> bytes:
    if str(path) == "-":
        raise InvalidInputError(
            "the password file cannot be '-': reading the master password from standard input is "
            "not supported (it carries values); give the path of a 0600 file that holds it, or "
            "leave the option out to be asked on a terminal (a file named '-': write ./-)"
        )
    data = read_small_file(
        path,
        MAX_PASSWORD_FILE_SIZE,
        f"password file {path}",
        UnlockError,
        check=lambda found: check_password_file(path, found, environment),
    )
    password = _strip_one_newline(data)
    if not password:
        raise UnlockError(f"password file {path} is empty: put the password in it")
    return password


def read_new_password_file(path: Path, *, environment: Environment) -> bytes:
    """A new password from `path`: a missing, empty or unreadable file is invalid input (exit 2),
    not an unlock failure, since nothing was being unlocked with it."""
    try:
        return read_password_file(path, environment=environment)
    except UnlockError as exc:
        raise InvalidInputError(str(exc).replace("password file", "new password file", 1)) from None


def read_small_file(
    path: Path,
    limit: int,
    what: str,
    error: type[SecretsManagerError] = InvalidInputError,
    *,
    check: Callable[[os.stat_result], None] | None = None,
) -> bytes:
    """At most `limit` bytes of `path`, which `what` names in messages ("password file X"): a
    missing file, a directory or no permission is one line of `error`. `check` is given the
    fstat of the file as opened, before it is read (see read_bounded)."""
    try:
        return read_bounded(path, limit, what=what, check=check)
    except FileNotFoundError:
        raise error(f"{what} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} is a directory") from None
    except PermissionError:
        raise error(f"cannot read {what}: permission denied") from None


def read_bounded(
    path: Path, limit: int, *, what: str, check: Callable[[os.stat_result], None] | None = None
) -> bytes:
    """At most `limit` bytes of `path`: InvalidInputError if it holds more (a wrong file, or one
    like /dev/zero that never ends), so a mistake cannot fill memory. OSErrors other than a
    missing file, a directory or no permission become a one-line InvalidInputError too.

    `check(fstat)` runs on the file as opened, before it is read: a mode or owner is checked on
    what is read, never on what the path names a moment before or after."""
    try:
        with path.open("rb") as handle:
            if check is not None:
                check(os.fstat(handle.fileno()))
            data = handle.read(limit + 1)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InvalidInputError(f"{what} is larger than {limit} bytes; is {path} the right file?")
    return data


def prompt_password(
    label: str, *, confirm: bool, file_option: str | None = None, store: str | None = None
) -> bytes:
    """Ask on the controlling terminal without echo; never read a password from piped stdin.
    `file_option`: for a new password, the option that gives it from a file instead (with no
    terminal it is that password that is missing, invalid input, not an unlock failure).
    `store`: the store the master password is for, named when none can be asked for: a command
    run without --store (or SECRETS_MANAGER_ADDR) opens the default store, which the one asking
    may not have meant."""
    if not terminal_available():
        if file_option:
            raise InvalidInputError(
                f"no {label.lower()} given: pass {file_option} PATH, or run on a terminal to type it"
            )
        opening = f" for the store {store}" if store else ""
        raise UnlockError(
            f"no master password{opening}: pass --password-file, set MASTER_PASSWORD_FILE, or run on "
            "a terminal"
        )
    try:
        password = getpass.getpass(f"{label}: ")
        again = getpass.getpass(f"{label} (again): ") if confirm else password
    except (
        UnicodeDecodeError
    ):  # a new (confirmed) password: invalid input; one to unlock with: a failed unlock
        raise (InvalidInputError if confirm else UnlockError)(
            f"the {label.lower()} typed is not UTF-8 text (is the terminal set to UTF-8?); "
            "type it again in UTF-8, or give it in a file (see the command's --help)"
        ) from None
    except EOFError:  # Ctrl-D: click called it "aborted", exit 130 (Ctrl-C's)
        missing = f"no {label.lower()} typed (end of input)"
        if file_option:
            raise InvalidInputError(f"{missing}; nothing was changed") from None
        raise UnlockError(f"{missing}: type it, or pass --password-file / set MASTER_PASSWORD_FILE") from None
    if again != password:
        raise InvalidInputError("the two passwords differ; nothing was changed")
    if not password:
        if confirm:  # a new password: what was typed is input, as when the two differ
            raise InvalidInputError(f"the {label.lower()} typed is empty; nothing was changed: type one")
        if label == "Master password":
            raise UnlockError(
                "the master password typed is empty: type the store's, or pass --password-file / set "
                "MASTER_PASSWORD_FILE"
            )
        raise UnlockError(  # a backup's: its file option is the command's own
            f"the {label.lower()} typed is empty: type it, or give it in a file (see the command's --help)"
        )
    return password.encode("utf-8")


def terminal_available() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _strip_one_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data
