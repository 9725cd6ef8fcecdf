"""`SHRIVENQUANT_ENV`: which guard rails are in force (development, staging or production)."""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import os
import pwd
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from secrets_manager.errors import InvalidInputError, UnlockError, UnsafeConfigurationError

ENV_VARIABLE = "SHRIVENQUANT_ENV"
PASSWORD_FILE_VARIABLE = "MASTER_PASSWORD_FILE"  # noqa: S105 (a variable name)
PASSWORD_VARIABLE = "MASTER_PASSWORD"  # noqa: S105 (a variable name)
# The most a password file may hold (the CLI's cli/password.py and the SDK's local mode): a larger
# one, or /dev/zero, is a wrong file, refused before it fills memory.
PASSWORD_FILE_MAX_BYTES = 64 * 1024
# Withheld from every command we start: they must not learn how to unlock the store.
PASSWORD_VARIABLES = (PASSWORD_VARIABLE, PASSWORD_FILE_VARIABLE)
# What logs in to a Vault store (store/vault.py's token, or its AppRole): as the master password
# opens ours, they open every namespace in it. Withheld from every command we start, too.
VAULT_CREDENTIAL_VARIABLES = ("VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID")
PRODUCTION_MIN_PASSWORD_LENGTH = 12  # characters: NIST SP 800-63B's 8 for a user, more for a key to all
log = logging.getLogger("secrets_manager.environment")


def password_variable_bytes(value: str, *, new: bool = False) -> bytes:
    """MASTER_PASSWORD's value as the password's bytes (UTF-8). Bytes that are not UTF-8 text
    (Python decodes them with surrogateescape) are a master password that cannot unlock the store,
    UnlockError (exit 4, as a wrong or empty one), or, for a `new` one (`init`), invalid input.
    Never the UnicodeEncodeError: it carries the whole password (`.object`) and shows it in its repr."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        pass  # raised below, outside this block: not even as its context
    raise (InvalidInputError if new else UnlockError)(
        f"{PASSWORD_VARIABLE} is not UTF-8 text: put the password in a 0600 file and set "
        f"{PASSWORD_FILE_VARIABLE} (or --password-file), which takes any bytes"
    )


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"

    @property
    def is_production(self) -> bool:
        return self is Environment.PRODUCTION

    def check_new_password(self, password: bytes, what: str = "the master password") -> bytes:
        """`password` if this environment accepts it as a new one: production refuses one shorter
        than PRODUCTION_MIN_PASSWORD_LENGTH characters (it opens every secret, or a backup of them),
        and staging warns of it."""
        length = len(password.decode("utf-8", errors="replace"))
        if length >= PRODUCTION_MIN_PASSWORD_LENGTH or self is Environment.DEVELOPMENT:
            return password
        problem = (
            f"{what} is {length} character{'' if length == 1 else 's'}; production needs at least "
            f"{PRODUCTION_MIN_PASSWORD_LENGTH} (a passphrase of several words is easiest)"
        )
        if self.is_production:
            raise UnsafeConfigurationError(problem)
        # Staging is production's rehearsal: a store made there with a short password went on to
        # production (restored, or the same file) without a word, since only new ones are checked.
        log.warning(problem)
        return password

    def guard(self, problem: str | None, warn: Callable[[str], None] | None = None) -> None:
        """A file that decides trust is not safe to trust (`problem`, from `loose_file_problem`):
        production refuses it (UnsafeConfigurationError, exit 2); elsewhere it is a warning,
        logged (or given to `warn`, e.g. to log it once)."""
        if problem is None:
            return
        if self.is_production:
            raise UnsafeConfigurationError(f"{problem} (production refuses it)")
        (warn or log.warning)(problem)


def guard_postgres_tls(
    environment: Environment, what: str, params: Mapping[str, str], environ: Mapping[str, str]
) -> None:
    """Production refuses a PostgreSQL connection that `postgres_tls_problem` finds unsafe
    (UnsafeConfigurationError, exit 2, before it is made); staging, production's rehearsal, warns
    of it once per process; development says nothing (a database on another host of a developer's
    network, as `vault+http://` is for a dev server)."""
    if environment is Environment.DEVELOPMENT:
        return
    problem = postgres_tls_problem(what, params, environ)
    if problem is None or (not environment.is_production and problem in _warned_tls_problems):
        return
    if not environment.is_production:
        _warned_tls_problems.add(problem)
    environment.guard(problem)


_warned_tls_problems: set[str] = set()


def refuse_open_directory(
    directory: Path, option: str, environment: Environment, *, readable: bool = True
) -> None:
    """Production refuses to write private files (recovery shares, a CA's key) into `directory`
    (given as `option`, e.g. "--out-dir") if group or others may write it (they could replace a
    file) or, with `readable`, read or enter it. OSError from stat() is the caller's to report."""
    if not environment.is_production or not directory.is_dir():
        return
    if stat.S_IMODE(directory.stat().st_mode) & (0o077 if readable else 0o022):
        access = "read or written" if readable else "written"
        fix = "chmod 700" if readable else "chmod go-w"
        raise UnsafeConfigurationError(
            f"{option} {directory} can be {access} by group or others; run '{fix} "
            f"{directory}' or pick a private directory (production refuses it)"
        )


def user_name(uid: int) -> str:
    """The name of user `uid` for messages, else the number."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def owner_problem(path: Path | str, found: os.stat_result, what: str) -> str | None:
    """Why `found` (the fstat of the opened file or directory `path`) is not this process's to
    trust: owned by a user other than the one running us, or root. None if it is."""
    me = os.geteuid()
    if found.st_uid in (0, me):
        return None
    owner = user_name(found.st_uid)
    if me == 0:  # root at a service user's files: chown to root would lock the service out
        return (
            f"{what} {path} belongs to {owner}, so {owner} can change it: run the command as {owner} "
            f"(e.g. 'sudo -u {owner} secrets-manager …'), which also keeps the files it creates "
            f"{owner}'s, or 'chown root {path}' if root should own it"
        )
    return (
        f"{what} {path} belongs to {owner}, not to {user_name(me)} who runs this "
        f"(or root), so that user can change it; run 'chown {user_name(me)} {path}' if it is yours, "
        "or use your own"
    )


def loose_file_problem(
    path: Path | str,
    found: os.stat_result,
    what: str,
    *,
    private: bool = False,
    folder: os.stat_result | None = None,
) -> str | None:
    """Why a file that decides trust (a policy, a CA, a schedule of commands, a key) is not safe,
    as one line with the command that fixes it; None if it is safe. `found` is the fstat of the
    file as opened (not a stat of its path, which may name another file by the time it is read);
    `folder` that of the directory it was opened in. Unsafe: owned by a user other than this one
    or root; writable by group or others (with `private`, readable by them at all); in a
    directory group or others may write without the sticky bit, or that another user owns (either
    could replace the file)."""
    problem = owner_problem(path, found, what)
    if problem is not None:
        return problem
    mode = stat.S_IMODE(found.st_mode)
    if private and mode & 0o077:
        return f"{what} {path} has mode {mode:04o}, which group or others can read; run 'chmod 600 {path}'"
    if mode & 0o022:
        return (
            f"{what} {path} has mode {mode:04o}, which group or others can write; run "
            f"'chmod go-w {path}' (or 'chmod 600 {path}')"
        )
    if folder is not None:
        directory = Path(os.path.realpath(path)).parent
        me = os.geteuid()
        if folder.st_uid not in (0, me):
            return (
                f"{what} {path} is in {directory}, which belongs to {user_name(folder.st_uid)}, not to "
                f"{user_name(me)} who runs this (or root), so that user can replace it; move the file "
                "to a directory of yours"
            )
        folder_mode = stat.S_IMODE(folder.st_mode)
        if folder_mode & 0o022 and not folder_mode & stat.S_ISVTX:
            return (
                f"{what} {path} is in {directory}, mode {folder_mode:04o}, where group or others can "
                f"replace it; run 'chmod go-w {directory}' or move the file to a directory of yours"
            )
    return None


def open_in_directory(path: Path | str, flags: int = os.O_RDONLY) -> tuple[int, os.stat_result]:
    """`path` opened, its symbolic links resolved first and the file then opened by name in its
    directory (O_NOFOLLOW), with the fstat of that directory: both checks see what is read, not
    what a path names a moment later. Raises OSError as os.open does."""
    real = Path(os.path.realpath(path))
    folder = os.open(real.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(real.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        return fd, os.fstat(folder)
    finally:
        os.close(folder)


def read_in_directory(path: Path | str, limit: int) -> tuple[bytes, os.stat_result, os.stat_result]:
    """The bytes of the regular file `path` (at most `limit` + 1 of them), opened by
    `open_in_directory`, with its fstat and its directory's, for `loose_file_problem`. OSError
    as os.open raises it; IsADirectoryError for a directory, EINVAL for anything else that is not
    a regular file (a FIFO is not waited on)."""
    fd, folder = open_in_directory(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        found = os.fstat(fd)
        if stat.S_ISDIR(found.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(found.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        return handle.read(limit + 1), found, folder


def postgres_tls_problem(what: str, params: Mapping[str, str], environ: Mapping[str, str]) -> str | None:
    """Why a PostgreSQL connection is not safe for production: it would reach a server over the
    network without checking that server's certificate against its name (libpq's sslmode below
    verify-full, its default being prefer: TLS if offered, unchecked), so anyone on the path could
    pose as the database and read what is sent (ALTER ROLE's new password, our encrypted records
    and who reads them). `params` are libpq's connection options (host, hostaddr, sslmode), filled
    from PGHOST, PGHOSTADDR and PGSSLMODE as libpq fills them. A Unix socket or a loopback address
    crosses no network: no problem (a pg_service.conf entry's host is not read: taken as remote).
    None if safe."""
    sslmode = params.get("sslmode") or environ.get("PGSSLMODE") or "prefer"
    if sslmode == "verify-full":
        return None
    hosts = (params.get("host") or environ.get("PGHOST") or "").split(",")
    addresses = (params.get("hostaddr") or environ.get("PGHOSTADDR") or "").split(",")
    service = params.get("service") or environ.get("PGSERVICE")
    if service and hosts == [""] and addresses == [""]:  # pg_service.conf names the host: unseen here
        hosts = [f"the host of service {service!r}"]
    for index, host in enumerate(hosts):
        address = addresses[index] if index < len(addresses) else ""
        target = (address or host).strip()
        if not _crosses_no_network(target):
            return (
                f"{what} reaches PostgreSQL at {target} with sslmode={sslmode}, which does not check "
                "the server's certificate, so anyone on the network path could pose as the database; "
                "add sslmode=verify-full and sslrootcert=CA.pem (or set PGSSLMODE=verify-full)"
            )
    return None


def _crosses_no_network(target: str) -> bool:
    """Whether libpq's host or hostaddr `target` is a Unix socket (a directory, an abstract
    socket, or none given: the default socket) or a loopback name or address."""
    if not target or target.startswith(("/", "@")) or target.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(target.strip("[]")).is_loopback
    except ValueError:
        return False


def current_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """The environment named by SHRIVENQUANT_ENV; development when unset."""
    raw = (os.environ if environ is None else environ).get(ENV_VARIABLE, "").strip().lower()
    if not raw:
        return Environment.DEVELOPMENT
    try:
        return Environment(raw)
    except ValueError:
        raise InvalidInputError(
            f"{ENV_VARIABLE}={raw!r} is not one of development, staging, production"
        ) from None
