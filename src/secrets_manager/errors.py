"""The exception tree every layer raises, and the CLI exit code of each branch.

    SecretsManagerError                 exit 1   anything not listed below
    ├── InvalidInputError               exit 2   bad name, over-size value, bad flag combination
    │   ├── UnsafeConfigurationError    exit 2   a guard rail of SHRIVENQUANT_ENV refused a setting
    │   ├── CertificateNotYetValidError exit 2   a TLS certificate whose validity starts later
    │   ├── NothingToChangeError        exit 2   a metadata update that changes nothing (CLI: exit 0)
    │   └── UnsupportedOperationError   exit 2   the store cannot do this (e.g. AWS: destroy one version)
    ├── NotFoundError                   exit 3   no such store, secret, version or label
    │   └── StoreNotFoundError          exit 3   no store at the path or database the URL names
    ├── UnlockError                     exit 4   wrong or missing master password
    │   └── MissingCredentialsError     exit 4   no Vault token or AWS credentials to present
    ├── AccessDeniedError               exit 5   the caller may not do this
    ├── IntegrityError                  exit 6   a record, keyset or header failed authentication
    ├── ConflictError                   exit 7   compare-and-set lost, or the target already exists
    │   ├── RotationInProgressError     exit 7   a stage while another rotation's version is pending
    │   └── SecretStateError            exit 7   the secret is deleted (or not, for undelete)
    ├── StorageError                    exit 1   the backend itself failed (I/O, locked, unreachable)
    │   ├── StoreBusyError              exit 1   another writer held the store's lock too long
    │   ├── StoreReadOnlyError          exit 1   a write to a store this process can only read
    │   ├── ResourceExhaustedError      exit 1   the service is at a capacity limit (max_watch_streams)
    │   │   └── ThrottledError          exit 1   the service throttles this identity ([limits]): retry later
    │   └── HandshakeFailedError        exit 1   the TLS handshake failed or the server closed it
    ├── RotationStepFailed              exit 1   a rotation's set or test command failed
    └── OperationInterrupted            exit 130 Ctrl-C part-way through a multi-write command
                                        (143 / 129: SIGTERM / SIGHUP during rotate, schedule run)

    Terminated (a KeyboardInterrupt)   exit 143 / 129   SIGTERM / SIGHUP turned into an interrupt

Each class also has a `kind`, the outcome name the audit log records (e.g. "not_found").

Invariant: no message built here or by a caller ever contains a secret value. Messages name
secrets (names are not secret) and say what to do next.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime


class SecretsManagerError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1
    kind = "error"
    # Set (store/external.after_the_version) on an error of a write to Vault or AWS that stored its
    # version before the metadata write it reports failed: that version, and that write's error.
    # mv, cp and rollback, which write on the user's behalf, say what stands in their own words.
    stored_version: int | None = None
    metadata_error: str | None = None


class InvalidInputError(SecretsManagerError):
    """The request itself is malformed; nothing was read or written."""

    exit_code = 2
    kind = "invalid_input"


class UnsafeConfigurationError(InvalidInputError):
    """A setting that the current SHRIVENQUANT_ENV forbids (e.g. MASTER_PASSWORD in production)."""


class CertificateNotYetValidError(InvalidInputError):
    """A certificate that is fine but valid only from `not_before` (an issuer that does not
    backdate, this machine's clock behind): unlike a broken file, it works unchanged from then."""

    def __init__(self, message: str, not_before: datetime) -> None:
        super().__init__(message)
        self.not_before = not_before


class NothingToChangeError(InvalidInputError):
    """A metadata update that would leave the secret as it is (nothing given; or the description,
    tags and max versions already as given, a tag to remove not there): refused, nothing written,
    `updated` not moved, no change event. The CLI says so and exits 0."""


class UnsupportedOperationError(InvalidInputError):
    """The store behind this request cannot do it (its backend has no such operation); nothing changed.

    Messages say "... is not supported by this store" and what to do instead."""


class WatchUnsupportedError(UnsupportedOperationError):
    """The service's store has no change feed (Vault KV v2, AWS Secrets Manager), so it cannot
    stream changes: Watch is refused at once (gRPC UNIMPLEMENTED). Clients refresh what they cache
    by its TTL instead; asking again soon changes nothing."""

    kind = "unsupported"


class NotFoundError(SecretsManagerError):
    """The store, secret, version or label does not exist (or was destroyed)."""

    exit_code = 3
    kind = "not_found"


def file_not_found(what: str, path: str | os.PathLike[str]) -> NotFoundError:
    """`WHAT PATH does not exist`, and for a relative PATH the directory it was looked for in: a
    command run from another directory than its file's (serve, policy check, schedule run) said
    only the name it had been given."""
    looked = ""
    if not os.path.isabs(path):
        try:
            looked = f" in {os.getcwd()} (the current directory)"
        except OSError:  # the current directory was removed: there is none to name
            looked = " (the current directory no longer exists)"
    return NotFoundError(f"{what} {os.fspath(path)} does not exist{looked}")


class StoreNotFoundError(NotFoundError):
    """No store where the URL points. `location` is where (never a password); `init_command` is
    the exact command that creates one there, so a caller that knows better advice (serve: the
    config's `store`) can say it without parsing the message."""

    def __init__(self, location: str, store_argument: str | None) -> None:
        self.location = location
        # None: the default store, which a bare `init` creates
        where = "" if store_argument is None else f" --store {shell_quote(store_argument)}"
        self.init_command = f"secrets-manager{where} init"
        super().__init__(
            f"no store at {location}; create one with '{self.init_command}', "
            "or pass --store with the store you meant"
        )


class UnlockError(SecretsManagerError):
    """The store could not be unlocked: wrong password, or no password source."""

    exit_code = 4
    kind = "unlock_failed"


class MissingCredentialsError(UnlockError):
    """A Vault or AWS store: there are no credentials to present (no token, no AWS keys). Nothing
    reached the store, so there is no attempt to audit (a refused login is an UnlockError)."""


class AccessDeniedError(SecretsManagerError):
    """The caller is not allowed to do this."""

    exit_code = 5
    kind = "access_denied"


class IntegrityError(SecretsManagerError):
    """Authenticated decryption failed. Deliberately opaque: it never says why."""

    exit_code = 6
    kind = "integrity_error"

    def __init__(self, message: str = "integrity check failed") -> None:
        super().__init__(message)


class ConflictError(SecretsManagerError):
    """A compare-and-set precondition did not hold, or the target already exists."""

    exit_code = 7
    kind = "conflict"


class RotationInProgressError(ConflictError):
    """A new rotation was refused: a version of the secret is pending (another rotation runs, or
    one that failed waits for --resume or --discard)."""


class SecretStateError(ConflictError):
    """The secret is not in the state the operation needs: a write, stage, promote or metadata
    change of a deleted secret, an undelete of one that is not deleted. Not a lost compare-and-set:
    reading again and retrying cannot succeed until its state is changed (undelete). Over gRPC it
    is FAILED_PRECONDITION, which clients do not retry, not ABORTED; exit 7 as any conflict."""


class StorageError(SecretsManagerError):
    """The storage backend failed to read or write."""

    exit_code = 1
    kind = "storage_error"


class StoreClosedError(StorageError):
    """This handle of the store was closed by its owner: nothing was read or written (a program's
    mistake, never the store's; opening the store again works)."""


class StoreBusyError(StorageError):
    """Another writer held the store's commit lock longer than this commit would wait (a long
    restore or import, a writer paused mid-commit); nothing was written, so trying again is safe."""


class StoreReadOnlyError(StorageError):
    """A write to a store this process can only read (its file's mode, a read-only directory or
    file system): nothing was written. Reads of such a store work; the message says why it is
    read-only and what to do."""


class ChangeUnrecordedError(StorageError):
    """A change was made, and then its audit record could not be written (the service's log is
    full or failing). Not "refused": the change stands, so a client must not make it again, here
    or at another replica (unlike the other StorageErrors, it is not worth another address)."""

    kind = "audit_error"


class ResourceExhaustedError(StorageError):
    """The service is at a capacity limit (e.g. its `max_watch_streams`): it cannot take this call
    now, like an unreachable service. Messages say which limit and how to raise it."""

    kind = "resource_exhausted"


class ThrottledError(ResourceExhaustedError):
    """The service refused the request because its identity sent more than its per-identity rate
    (server.toml [limits]): nothing was read or changed, so sending it again later is safe. The SDK
    retries it with backoff; the CLI exits 1 saying the service is throttling this identity."""

    kind = "throttled"


class HandshakeFailedError(StorageError):
    """The service could not be reached in the way a failed or refused TLS handshake looks
    ("Socket closed", "handshake"): maybe an outage, maybe our certificate (expired, from another
    CA). The SDK then checks at once whether its certificate files were renewed."""


class NotConnectedError(StorageError):
    """No connection to the service could be made (refused, unreachable, a failed TLS handshake):
    the request was never sent, so sending it elsewhere cannot make a change twice."""


class ConnectionClosedError(HandshakeFailedError):
    """The connection ended under a call ("Socket closed" once connected): the server refused our
    certificate (TLS 1.3 completes the handshake on the client's side first, so the refusal
    arrives as a closed connection), or the server went away mid-call. From the client the two
    look alike, so a change sent may or may not have been made."""


class OutcomeUnknownError(StorageError):
    """A change was sent and its answer was lost (the connection ended or the deadline passed):
    it may or may not have been made, so it was not sent again anywhere. Audited as
    `outcome_unknown`, not as a failure: read the secret's history before writing again."""

    kind = "outcome_unknown"


# The distribution that provides each top-level module of a runtime dependency (pyproject.toml).
_DISTRIBUTION_OF_MODULE = {
    "argon2": "argon2-cffi",
    "boto3": "boto3",
    "botocore": "boto3",
    "click": "click",
    "cryptography": "cryptography",
    "dotenv": "python-dotenv",
    "google": "protobuf",
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "hvac": "hvac",
    "platformdirs": "platformdirs",
    "prometheus_client": "prometheus-client",
    "psycopg": "psycopg[binary]",
    "pyotp": "pyotp",
    "rich": "rich",
    "shamir_mnemonic": "shamir-mnemonic",
}


def missing_module_line(module: str | None, prefix: str) -> str:
    """The one line for a module this Python environment (`prefix`, sys.prefix) lacks: a
    dependency left out (`pip install --no-deps`, an image that copied some packages only) or
    removed since. Every store's library is a dependency of the package, so the fix is to install
    it, or reinstall secrets-manager with its dependencies."""
    top = (module or "").partition(".")[0]
    distribution = _DISTRIBUTION_OF_MODULE.get(top)
    if distribution is None:  # one of our own modules, or another's: the install itself is broken
        return (
            f"the module {module!r} is missing from the Python environment at {prefix}: reinstall "
            "secrets-manager there (pip install --force-reinstall secrets-manager)"
        )
    return (
        f"the Python package {distribution!r}, which secrets-manager needs for this, is not installed in "
        f"the environment at {prefix}: install it there (pip install '{distribution}'), or install "
        "secrets-manager with its dependencies (not --no-deps)"
    )


def shell_quote(word: str) -> str:
    """`word` as a shell gives it back to a program, for a command a message says to run:
    `shlex.quote`, except for a word with bytes that are not UTF-8 (an argument or path given as
    such, which Python holds as surrogates, shown as '\\udce9') or control characters (a newline
    would break the message's one line): bash's $'...' form, each such byte as \\xHH, so the
    command pasted passes the very bytes given."""
    if not any(ord(char) < 0x20 or ord(char) == 0x7F or 0xDC80 <= ord(char) <= 0xDCFF for char in word):
        return shlex.quote(word)
    quoted = []
    try:
        given = os.fsencode(word)  # the bytes as given (surrogateescape undone)
    except UnicodeEncodeError:  # a surrogate no argument decodes to: shown, not reproduced
        given = word.encode("utf-8", "backslashreplace")
    for byte in given:
        char = chr(byte)
        if char in "'\\":
            quoted.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            quoted.append(char)
        else:
            quoted.append(f"\\x{byte:02x}")
    return "$'" + "".join(quoted) + "'"


def shell_join(words: Iterable[str]) -> str:
    """`shlex.join` with `shell_quote`: a command line to paste into bash (or zsh, ksh)."""
    return " ".join(shell_quote(word) for word in words)


def restated(error: SecretsManagerError, message: str) -> SecretsManagerError:
    """`error` told with `message` (which should contain it): the same class, so the same exit
    code and audit outcome, with its attributes; `error` itself if its class is not made from a
    message alone. For a command that must say what it did before the error (one change of two
    made)."""
    try:
        told = type(error)(message)
    except (TypeError, ValueError):
        return error
    told.__dict__.update(error.__dict__)
    return told


EXIT_CODES: dict[type[SecretsManagerError], int] = {
    cls: cls.exit_code
    for cls in (
        SecretsManagerError,
        InvalidInputError,
        NotFoundError,
        UnlockError,
        AccessDeniedError,
        IntegrityError,
        ConflictError,
        StorageError,
    )
}


class RotationStepFailed(SecretsManagerError):
    """A rotation's set or test command failed: nothing was promoted, the new version stays pending."""

    exit_code = 1
    kind = "rotation_step_failed"


class OperationInterrupted(SecretsManagerError):
    """Ctrl-C (SIGINT) part-way through a command that writes one secret at a time (import): the
    message says how far it got and how to go on, as any failure part-way does."""

    exit_code = 130
    kind = "interrupted"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised by the handler of a command that must end its work as on Ctrl-C
    (rotate and schedule run end their running command's process group): a KeyboardInterrupt, so
    whatever ends work on Ctrl-C ends it on these too. Exit 128 + the signal's number (143 for
    SIGTERM, 129 for SIGHUP), as a shell reports a process those signals ended."""

    kind = "interrupted"

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


# The signals that end work as Ctrl-C does (SIGINT itself; SIGTERM and SIGHUP where a command
# turns them into Terminated).
INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def interruptions_ignored() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP are ignored for the duration: for the undo of work an
    interruption has already stopped, which a second Ctrl-C (an impatient user, a supervisor's
    SIGTERM after SIGINT) would otherwise cut short, leaving part of it undone while the command
    says it was. SIGKILL still ends the process. Only the main thread can change handlers: on
    any other thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in INTERRUPTING_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
