"""The click commands. Each one parses, validates input before asking for a password, calls the
store, and formats; all crypto and SQL live below `store/`."""

from __future__ import annotations

import base64
import functools
import importlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

import click

from secrets_manager.audit import (
    AuditError,
    AuditEvent,
    AuditLog,
    AuditTamperError,
    adopt_log,
    discard_adopted_lock,
    local_actor,
    refuse_files_of_others,
    value_fingerprint,
)
from secrets_manager.cli.clipboard import (
    CLIP_TIME_VARIABLE,
    DEFAULT_CLIP_SECONDS,
    ClipboardFailed,
    ClipboardTool,
    ClipboardUnavailable,
    clip_seconds,
    copy_for_a_while,
    find_clipboard,
)
from secrets_manager.cli.completion import complete_secret_names
from secrets_manager.cli.output import (
    counted,
    expiry_text,
    info_line,
    output_of,
    parse_cutoff,
    parse_deadline,
    print_json,
    print_table,
    printable,
    suggested,
    terminal_control,
    timestamp,
    warning_line,
)
from secrets_manager.cli.password import (
    prompt_password,
    read_bounded,
    read_new_password_file,
    read_password,
    terminal_available,
)
from secrets_manager.environment import (
    PASSWORD_FILE_VARIABLE,
    PASSWORD_VARIABLE,
    Environment,
    current_environment,
)
from secrets_manager.errors import (
    AccessDeniedError,
    ConflictError,
    HandshakeFailedError,
    InvalidInputError,
    MissingCredentialsError,
    NotFoundError,
    NothingToChangeError,
    OutcomeUnknownError,
    SecretsManagerError,
    StorageError,
    UnlockError,
    UnsafeConfigurationError,
    UnsupportedOperationError,
    restated,
)
from secrets_manager.rotation import (
    ALPHABETS,
    DEFAULT_LENGTH,
    MAX_LENGTH,
    MIN_LENGTH,
    generated_value,
    new_value_for,
)
from secrets_manager.store import (
    MAX_VALUE_SIZE,
    PREVIOUS,
    EncryptedStore,
    Secret,
    SecretMetadata,
    SecretStore,
    validate_name,
)
from secrets_manager.store.base import (
    LABELS,
    MAX_MAX_VERSIONS,
    MIN_MAX_VERSIONS,
    AuditedStore,
    checked_max_versions,
    checked_metadata_update,
    max_versions_hide_at_once,
)
from secrets_manager.store.external import NoAnswerError
from secrets_manager.store.kms import AwsKmsUnlock
from secrets_manager.store.names import DEFAULT_NAMESPACE, validate_prefix
from secrets_manager.store.unlock import PasswordUnlock, UnlockKeyRefused, UnlockKeyUnlock, UnlockSource
from secrets_manager.store.url import (
    KDF_PROFILE_NAMES,
    create_store,
    default_audit_path,
    discard_new_store,
    display_url,
    legacy_audit_path,
    local_store_files,
    needs_password,
    new_password_unlock,
    open_external_store,
    open_store,
    open_store_with_recovery,
    refuse_existing_store,
    store_identity,
    store_location,
)
from secrets_manager.values import SecretValue, read_exact_json_object

if TYPE_CHECKING:  # the client (gRPC, asyncio) is imported only by a command that uses --server
    from secrets_manager.agent import AgentClient  # and the agent's client where it may be asked
    from secrets_manager.client import RemoteStore, TlsFiles


def quiet_grpc() -> None:
    """gRPC's documented default log level, set before its core starts (the first import of the
    client, which imports grpc): unset, the core logs a failed handshake at INFO ("I1130 …
    ssl_transport_security.cc …") above our one-line error. An explicit value stays. `serve` sets
    NONE (serve_commands): there a client could make the core write a line per connection."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@contextmanager
def _closed_at_the_end(remote: RemoteStore) -> Iterator[RemoteStore]:
    """`remote`, closed when the block ends; after Ctrl-C or SIGTERM (KeyboardInterrupt, and
    Terminated, which terminate_as_interrupt's handler raises) from a thread of its own, waited for
    CLOSE_AFTER_INTERRUPT_SECONDS at most. Such an exception is raised at whatever line the main
    thread is on, gRPC's own code included, and there it can leave one of gRPC's locks held (raised
    between a `with lock:`'s acquire and its block, or in its `__exit__` before the release): the
    channel's close then waited for good for a call that could no longer finish. `watch --server`
    stopped by SIGTERM while it started hung so (bench/soak.py: 2 of about 280), ignoring the
    SIGTERMs after it, its stream held open at the service until it was killed. The command is
    ending: its connection closes with the process."""
    interrupted = False
    try:
        yield remote
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if interrupted:
            closer = threading.Thread(target=remote.close, name="close-after-interrupt", daemon=True)
            closer.start()
            closer.join(CLOSE_AFTER_INTERRUPT_SECONDS)
        else:
            remote.close()


def is_remote_store(store: object) -> TypeGuard[RemoteStore]:
    """Whether `store` is a service's (a RemoteStore), without importing the client (gRPC) for a
    local store: a RemoteStore exists only once its module was imported."""
    remote = sys.modules.get("secrets_manager.client.remote")
    return remote is not None and isinstance(store, remote.RemoteStore)


STDIN_PATH = "-"  # a path option's spelling of standard input (refused for a password file)
STORE_VARIABLE = "SECRETS_MANAGER_STORE"
SERVER_VARIABLE = "SECRETS_MANAGER_ADDR"
HEALTH_CHECK_SECONDS = 3.0  # each address's health check, when --server names several
CLOSE_AFTER_INTERRUPT_SECONDS = 2.0  # the most a command ended by Ctrl-C or SIGTERM waits for its close
TLS_VARIABLES = ("SECRETS_MANAGER_CERT", "SECRETS_MANAGER_KEY", "SECRETS_MANAGER_CA")
AUDIT_FILE_VARIABLE = "SECRETS_MANAGER_AUDIT_FILE"
AUDIT_MAX_BYTES_VARIABLE = "SECRETS_MANAGER_AUDIT_MAX_BYTES"
AUDIT_TIMEOUT_VARIABLE = "SECRETS_MANAGER_AUDIT_TIMEOUT"
FIELD_SEPARATOR = "#"
# A reference to a secret, as `inject` templates and `run --env-file` values write one (1Password's
# op:// references in our scheme): sm://NAME or sm://NAME#FIELD; groups NAME and FIELD.
REFERENCE_PATTERN = r"sm://([^\s{}#]+)(?:#([^\s{}]+))?"
S = TypeVar("S", bound=AuditedStore)


# How a generated value looks (`store --generate`, `rotate`): Python's `secrets`, never our own.
length_option = click.option(
    "--length",
    type=click.IntRange(min=MIN_LENGTH, max=MAX_LENGTH),
    default=DEFAULT_LENGTH,
    show_default=True,
    metavar="N",
    help="Characters in a generated value.",
)
alphabet_option = click.option(
    "--alphabet",
    type=click.Choice(sorted(ALPHABETS)),
    default="alnum",
    show_default=True,
    help="Characters of a generated value.",
)


def expires_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--expires TIME`: when the value written stops working (`store`, `edit`, `import`, `rotate`)."""
    return click.option("--expires", metavar="TIME", help=help_text)


def future_expiry(expires: str | None, name: str) -> datetime | None:
    """The moment `--expires` names, refused if already past: a value written now would count as
    expired at once (one learnt late is recorded with `metadata --expires`, which warns instead)."""
    if expires is None:
        return None
    expiry = parse_deadline(expires, "--expires")
    if expiry <= datetime.now(UTC):
        raise InvalidInputError(
            f"--expires {expires!r} is {timestamp(expiry)}, already past: a value stored now would be "
            f"expired at once; give a later time, or record an expiry learnt late with "
            f"'metadata {name} --expires TIME' after storing"
        )
    return expiry


def refuse_generator_options(without: str) -> None:
    """InvalidInputError if --length or --alphabet was typed where no value is generated: it would
    be ignored silently, and the user would believe the value has that shape."""
    context = click.get_current_context()
    given = [
        f"--{name}"
        for name in ("length", "alphabet")
        if context.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        verb, them = ("shape", "them") if len(given) > 1 else ("shapes", "it")
        raise InvalidInputError(
            f"{' and '.join(given)} only {verb} a generated value; {without.format(them=them)}"
        )


def kdf_profile_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--kdf-profile: the Argon2id cost of a new password (init, unlock-with, restore)."""
    return click.option(
        "--kdf-profile",
        type=click.Choice(KDF_PROFILE_NAMES),
        default="default",
        show_default=True,
        help=help_text,
    )


# Audited operations that give the store a new master password, and the command that runs each.
PASSWORD_CHANGES = {
    "passwd": "secrets-manager passwd",
    "unlock-with": "secrets-manager unlock-with password",
    "recovery.unlock-with": "secrets-manager recovery unlock-with password",
}


class PasswordNotAsked(UnlockError):
    """The password would be asked at the terminal, and this session may not (a shell
    completion), or its password file cannot be read: no password was tried, so it is not
    audited as a refused unlock."""


@dataclass(repr=False)
class Session:
    """Options every command shares, resolved once per invocation."""

    store_url: str | None
    password_file: str | None
    audit_file: str | None
    environ: Mapping[str, str]
    server: str | None = None
    prompts: bool = True  # False: a password that would be asked at the terminal is PasswordNotAsked
    # How long each of several --server addresses' health check may take (first_serving asks the
    # next one beside it after a short head start).
    health_check_seconds: float = HEALTH_CHECK_SECONDS

    def __repr__(self) -> str:
        """Without the environment (MASTER_PASSWORD, VAULT_TOKEN, ...) or a store URL's password
        (subclasses keep a typed password: not shown either)."""
        return (
            f"{type(self).__name__}(store={display_url(self.store_url)!r}, server={self.server!r}, "
            f"password_file={self.password_file!r}, audit_file={self.audit_file!r})"
        )

    @functools.cached_property
    def environment(self) -> Environment:
        """SHRIVENQUANT_ENV's environment: read when a command starts (`pass_session`), not by the
        group, so `--help` works whatever it says."""
        return current_environment(self.environ)

    @functools.cached_property
    def actor(self) -> str:
        """The local OS user (its effective uid), never a name from the environment."""
        return local_actor()

    def password(self, *, confirm: bool = False) -> bytes:
        if not self.prompts and not self.password_from_file and PASSWORD_VARIABLE not in self.environ:
            raise PasswordNotAsked("no master password without asking for it")
        try:
            return read_password(
                self.password_file,
                environment=self.environment,
                environ=self.environ,
                confirm=confirm,
                store=store_location(self.store_url),
            )
        except UnlockError as exc:
            if self.prompts:
                raise
            # A completion whose password file is missing, empty or unreadable: no password was
            # tried, and a refused unlock audited on every TAB says nothing the command would not
            raise PasswordNotAsked(str(exc)) from None

    @property
    def password_from_file(self) -> bool:
        """Whether `password()` reads a file (--password-file, MASTER_PASSWORD_FILE): it can be
        read again later, unlike a prompt or a variable that cannot change."""
        return bool(self.password_file or self.environ.get(PASSWORD_FILE_VARIABLE))

    @functools.cached_property
    def audit_path(self) -> Path:
        """Once per session: an AWS store's default asks STS for the account."""
        if self.audit_file:
            return Path(self.audit_file)
        return default_audit_path(self.store_url, environ=self.environ)

    def agent_store_name(self) -> str:
        """The store as the agent knows it (its key is kept under this, and `agent status` shows
        it): the store file's real path, else its URL without a password, the same whatever the
        spelling (`store_identity`), so `agent forget --store` finds the key however it is named."""
        if not self.needs_password:
            raise InvalidInputError(
                f"{display_url(self.store_url)} is a Vault or AWS store: no agent keeps a key for it"
            )
        return store_identity(self.store_url)

    @property
    def needs_password(self) -> bool:
        """False for Vault and AWS stores: their credentials come from their own environment."""
        return needs_password(self.store_url)

    def audit_log(self) -> AuditLog:
        path = self.audit_path
        options = self.audit_options()
        refuse_files_of_others(path, self.files_not_for_audit())
        return AuditLog(path, environment=self.environment, **options)

    def audit_options(self) -> dict[str, Any]:
        """The audit log's size limit and timeout from the environment (for the CLI and serve)."""
        options: dict[str, Any] = {}
        raw_max = self.environ.get(AUDIT_MAX_BYTES_VARIABLE)
        if raw_max is not None:
            if not raw_max.isdigit() or int(raw_max) < 1:
                raise InvalidInputError(f"{AUDIT_MAX_BYTES_VARIABLE} must be a positive number of bytes")
            options["max_bytes"] = int(raw_max)
        raw_timeout = self.environ.get(AUDIT_TIMEOUT_VARIABLE)
        if raw_timeout is not None:
            try:
                options["timeout"] = float(raw_timeout)
            except ValueError:
                options["timeout"] = -1.0
            if not 0 < options["timeout"] <= 600:
                raise InvalidInputError(f"{AUDIT_TIMEOUT_VARIABLE} must be seconds between 0 and 600")
        return options

    def files_not_for_audit(self) -> list[tuple[Path, str]]:
        """Files an audit log path must not name: the store's own (and its SQLite companions) and
        the password file. A writer would append to them, or set their end aside."""
        files = [(path, "the store's file") for path in local_store_files(self.store_url)]
        password_file = self.password_file or self.environ.get(PASSWORD_FILE_VARIABLE)
        if password_file:
            files.append((Path(password_file), "the password file"))
        return files

    def refuse_own_file(self, path: Path, instead: str) -> None:
        """InvalidInputError if a file a command writes for the user (inject -o, backup) is one of
        the local store's (the file or its SQLite companions), the master password's file, or one
        of its audit log's (the log, its rotated files, lock, partial records set aside): written
        over, the secrets, the password or their audit trail would be lost. `instead` ends the
        message: what to give."""
        target = path.resolve()
        if any(target == own.resolve() for own in local_store_files(self.store_url)):
            raise InvalidInputError(f"{path} is the store itself; {instead}")
        password_file = self.password_file or self.environ.get(PASSWORD_FILE_VARIABLE)
        if password_file not in (None, "", STDIN_PATH) and target == Path(str(password_file)).resolve():
            raise InvalidInputError(f"{path} is the master password's file; {instead}")
        if self.server and not self.audit_file:
            return  # the service audits: no local log of this store (and none to ask AWS about)
        log = self.audit_path.resolve()
        if target.parent == log.parent and (
            target.name == log.name or target.name.startswith(f"{log.name}.")
        ):
            raise InvalidInputError(f"{path} is the store's audit log (or one of its files); {instead}")

    def event(self, operation: str, name: str | None = None, **fields: Any) -> AuditEvent:
        return AuditEvent(operation=operation, actor=self.actor, name=name, **fields)

    def unlock(self) -> AuditedStore:
        """Open the store: an encrypted one with the master password, a Vault or AWS one with the
        credentials of its environment (no password asked). A failed unlock is audited as denied
        before it is reported."""
        if self.needs_password:
            return self.unlock_encrypted("unlock", agent=True)
        return self._denials_audited(self._open_external)

    def _open_external(self, audit_path: Path | None = None) -> AuditedStore:
        store = open_external_store(
            str(self.store_url),
            environment=self.environment,
            actor=self.actor,
            audit_path=audit_path or self.audit_path,
            environ=self.environ,
        )
        try:
            # The first request, here rather than in the audit log's writer: a backend that does
            # not answer is then reported as such, within its own timeout, not as an audit log
            # that did not answer within SECRETS_MANAGER_AUDIT_TIMEOUT. Any other problem with
            # the key is left to the command, which meets it where it knows what to say.
            store.audit_key()
        except (NoAnswerError, OutcomeUnknownError):
            store.close()
            raise
        except SecretsManagerError:
            pass
        if audit_path is None and not self.audit_file:
            try:
                self._adopt_legacy_log(store)
            except BaseException:
                store.close()
                raise
        return store

    def _adopt_legacy_log(self, store: AuditedStore) -> None:
        """Move this store's log from its old default name (before logs were named after the AWS
        account and the Vault namespace) to its new one, once: a log of another account or
        namespace that shared the old name stays for that store to adopt (audit.adopt_log)."""
        legacy, path = legacy_audit_path(self.store_url), self.audit_path
        if legacy is None or legacy == path:
            return
        if not AuditLog(legacy).files():
            discard_adopted_lock(legacy)
            return
        old = self._open_external(legacy)
        try:
            moved = adopt_log(legacy, path, old, store)
        finally:
            old.close()
        if moved:
            info_line(
                f"the audit log {legacy} of this store is now {path} (default logs are named after the "
                "AWS account and the Vault namespace)"
            )

    def unlock_encrypted(self, operation: str, *, agent: bool = False) -> EncryptedStore:
        """Unlock our encrypted store: with the master password, asked only if its header says a
        password unlocks it (AWS KMS needs none). Commands that manage its keys or unlock need our
        store; a Vault or AWS store has neither.

        `agent`: where the password would come from the prompt, ask the user's agent first for
        the unlock key of this store's header (the commands that only use the store: not those
        that must prove the password is known, which call this without it); after a prompted
        unlock, give the agent the key the password derived."""
        if not self.needs_password:
            raise UnsupportedOperationError(
                f"'{operation}' is not supported by this store: {display_url(self.store_url)} has no "
                "master password or keys of ours (Vault and AWS encrypt with their own keys)"
            )
        client = self._agent() if agent else None
        if client is not None:
            where = self.agent_store_name()
            cached = UnlockKeyUnlock(lambda header: client.find(where, header))
            try:
                return self._denials_audited(lambda: self._open_encrypted(unlock_key=cached))
            except UnlockKeyRefused:  # none kept, expired, or no longer opening it: the prompt
                pass
        store = self._denials_audited(self._open_encrypted)
        if client is not None and store.unlock_key is not None:
            client.give(self.agent_store_name(), store.unlock_key.header, store.unlock_key.material)
        if client is not None and client.refused:
            warning_line(f"{client.refused}; the agent was not used")
        return store

    def _open_encrypted(self, unlock_key: UnlockKeyUnlock | None = None) -> EncryptedStore:
        return open_store(
            self.store_url,
            self.password,
            environment=self.environment,
            actor=self.actor,
            audit_path=self.audit_path,
            unlock_key=unlock_key,
        )

    def _agent(self) -> AgentClient | None:
        """The user's agent, where this command would otherwise prompt for the password: no
        --password-file, MASTER_PASSWORD_FILE or MASTER_PASSWORD, and not in production (whose
        stores services unlock with password files or KMS), and only if its socket is there (it
        is connected to only when a password store is opened). A directory or socket that is not
        safely ours is said and not used."""
        if self.environment.is_production or self.password_from_file or PASSWORD_VARIABLE in self.environ:
            return None
        from secrets_manager.agent import AgentClient

        client = AgentClient.for_user(self.environ)
        try:
            return client if client.present() else None
        except UnsafeConfigurationError as exc:
            warning_line(f"{exc}; the agent was not asked")
            return None

    def forget_in_agent(self) -> None:
        """After the store's password wrapping changed (`passwd`, `unlock-with`, `recovery
        unlock-with`, `keys rotate --root`): the user's agent drops the store's old unlock key at
        once, as pass users expect of gpg-agent, rather than keeping until its ttl a key that still
        opens old copies of the store. No agent is fine; not in production (no agent is used)."""
        if self.environment.is_production or not self.needs_password:
            return
        from secrets_manager.agent import AgentClient, AgentNotRunning

        client = AgentClient.for_user(self.environ)
        try:
            answer = client.request({"op": "forget", "store": self.agent_store_name()})
        except AgentNotRunning:
            return
        except UnsafeConfigurationError as exc:
            warning_line(f"{exc}; the agent was not told to forget this store's old key")
            return
        except (SecretsManagerError, OSError):
            warning_line(
                "the agent did not answer; 'secrets-manager agent forget --store' drops this store's old key"
            )
            return
        if answer.get("forgot"):
            info_line("the agent forgot this store's old unlock key")

    def _denials_audited(self, opener: Callable[[], S]) -> S:
        """`opener()`; an unlock it refuses (a wrong password, foreign recovery shares, a KMS key
        this host may not use) is audited as denied before it is reported."""
        try:
            return opener()
        except MissingCredentialsError:  # no token or keys: nothing reached the store, nothing to audit
            raise
        except UnlockKeyRefused:  # the agent had no key that opens it: no password was refused
            raise
        except PasswordNotAsked:  # a completion, which may not prompt: no password was refused
            raise
        except UnlockError as exc:
            self._audit_denied_unlock(exc)
            raise

    def _note_unfinished_password_change(self, exc: UnlockError) -> None:
        """After a refused password: if the newest change in the audit log is a password change with
        no outcome (its command was killed), the new password may be the one that holds now. A hint
        on a second line; the log is only read, and any problem with it is left to the audit."""
        if not isinstance(exc, UnlockError) or "wrong master password" not in str(exc):
            return
        try:
            unfinished = self.audit_log().unfinished_change()
        except SecretsManagerError:
            return
        if unfinished is None or unfinished.get("operation") not in PASSWORD_CHANGES:
            return
        command = PASSWORD_CHANGES[str(unfinished["operation"])]
        exc.add_note(
            f"'{command}' began at {unfinished.get('time')} and recorded no outcome (it was interrupted): "
            "if it got as far as its commit, the new password is the one that opens the store now; "
            "try it ('status' says which one works)"
        )

    def _audit_denied_unlock(self, exc: UnlockError) -> None:
        """Record a refused unlock. Whatever keeps that record from being written is said on a
        line after the refusal's own (a note on `exc`), and never replaces it: a wrong password is
        reported as one (exit 4) whatever state the log is in."""
        self._note_unfinished_password_change(exc)
        try:
            denied = self.event("unlock", decision="deny", outcome=exc.kind)
            self.audit_log().append([denied], anchor=None)
        except AuditTamperError as audit_exc:  # its remedies need the right password anyway
            exc.add_note(
                f"the failed unlock could not be audited because the audit log is damaged: {audit_exc}"
            )
        except (AuditError, InvalidInputError) as audit_exc:
            exc.add_note(f"the failed unlock was not audited: {audit_exc}")
        except Exception as audit_exc:  # a bug: it must never turn a wrong password into an
            # internal error, which left password guessing unanswered and unrecorded
            exc.add_note(
                f"the failed unlock was not audited: internal error ({type(audit_exc).__name__}); report it"
            )

    def tls_files(self) -> TlsFiles:
        from secrets_manager.client import TlsFiles

        missing = [v for v in TLS_VARIABLES if not self.environ.get(v)]
        if missing:
            raise InvalidInputError(f"--server needs a client certificate: set {', '.join(missing)}")
        cert, key, ca = (Path(self.environ[v]) for v in TLS_VARIABLES)
        return TlsFiles(cert=cert, key=key, ca=ca)

    def remote_store(self, options: Sequence[tuple[str, Any]] = ()) -> RemoteStore:
        """The service at --server / SECRETS_MANAGER_ADDR. Several comma-separated addresses (as
        the SDK takes them from the same variable): the first whose health check says SERVING
        serves the command (each asked after the one before has had a head start, not its whole
        timeout: client/remote.first_serving), so a write is never sent twice to two replicas; a
        read it does not answer, or a write that found no connection, moves the command to the
        next that says SERVING (RemoteStore._call). `options`: gRPC channel options."""
        quiet_grpc()
        from secrets_manager.client import RemoteStore
        from secrets_manager.client._config import parse_addresses

        addresses = parse_addresses(self.server or "", f"--server / {SERVER_VARIABLE}")
        if not addresses:  # e.g. "," : not a service that failed to answer, but none named
            raise InvalidInputError(
                f"--server / {SERVER_VARIABLE} {self.server!r} names no address; "
                "give host:port, or several comma-separated"
            )
        tls = self.tls_files()
        if len(addresses) == 1:
            return RemoteStore(addresses[0], tls, options=options)
        from secrets_manager.client.remote import at_address, first_serving

        credentials = tls.credentials()  # read once for every address
        chosen = first_serving(
            [
                functools.partial(
                    RemoteStore, address, tls, options=options, credentials=credentials, replicas=addresses
                )
                for address in addresses
            ],
            self.health_check_seconds,
        )
        if chosen.store is not None:
            return chosen.store
        refusals = list(chosen.reasons)
        if all(type(why) is HandshakeFailedError for why in refusals):
            # Not "try again": the certificate files (or the servers') must change first. Said as
            # one address says it, the others named.
            raise HandshakeFailedError(f"{refusals[0]} (likewise at {', '.join(addresses[1:])})")
        whys = "; ".join(at_address(why, at) for why, at in zip(refusals, addresses, strict=True))
        raise StorageError(
            f"no secrets-manager service is serving at {', '.join(addresses)} ({whys}); try again"
        )

    def require_local(self, command: str) -> None:
        if self.server:
            raise InvalidInputError(
                f"'{command}' works on a local store only; drop --server / {SERVER_VARIABLE}"
            )

    @contextmanager
    def secret_operation(
        self, operation: str, name: str | None = None, *, mutating: bool = False
    ) -> Iterator[tuple[SecretStore, Note]]:
        """A store operation that works locally (audited here) or against a service (audited there)."""
        if self.server:
            with _closed_at_the_end(self.remote_store()) as remote:
                yield remote, Note()
            return
        reads: list[AuditEvent] = []
        recorder = Recorder() if mutating else None
        with self.store_operation(operation, name, mutating=mutating, reads=reads, recorder=recorder) as (
            store,
            event,
        ):
            yield store, Note(event, store, reads, recorder)

    @contextmanager
    def store_operation(
        self,
        operation: str,
        name: str | None = None,
        *,
        mutating: bool = False,
        reads: list[AuditEvent] | None = None,
        recorder: Recorder | None = None,
    ) -> Iterator[tuple[AuditedStore, AuditEvent]]:
        """One audited operation on whichever local store the URL names (encrypted, Vault, AWS).

        `reads`: one record per secret the operation read (`Note.read`), audited instead of the
        operation's single record when it succeeds. `recorder`: set up to append records durably
        while the operation runs (`Note.wrote` of a change of several secrets)."""
        with self._audited(
            self.unlock, operation, name, mutating=mutating, reads=reads, recorder=recorder
        ) as opened:
            yield opened

    @contextmanager
    def operation(
        self, operation: str, name: str | None = None, *, mutating: bool = False
    ) -> Iterator[tuple[EncryptedStore, AuditEvent]]:
        """One audited operation that needs our encrypted store (its keys or its password)."""
        with self._audited(
            lambda: self.unlock_encrypted(operation), operation, name, mutating=mutating
        ) as opened:
            yield opened

    @contextmanager
    def recovery_operation(
        self, operation: str, mnemonics: list[str]
    ) -> Iterator[tuple[EncryptedStore, AuditEvent]]:
        """One audited operation on our store opened with recovery shares instead of its unlock
        source (the password or KMS key is lost). Shares that do not open it are audited as a
        denied unlock, as a wrong password is."""

        with self._audited(
            lambda: self.open_with_recovery_shares(mnemonics), operation, None, mutating=True
        ) as opened:
            yield opened

    def open_with_recovery_shares(self, mnemonics: list[str]) -> EncryptedStore:
        """Our store opened with recovery shares; shares that do not open it are audited as a
        denied unlock."""
        return self._denials_audited(
            lambda: open_store_with_recovery(
                self.store_url,
                mnemonics,
                environment=self.environment,
                actor=self.actor,
                audit_path=self.audit_path,
            )
        )

    @contextmanager
    def _audited(
        self,
        opener: Callable[[], S],
        operation: str,
        name: str | None,
        *,
        mutating: bool,
        reads: list[AuditEvent] | None = None,
        recorder: Recorder | None = None,
    ) -> Iterator[tuple[S, AuditEvent]]:
        """Open, run one audited operation, close. Fails closed, as Vault's audit devices do: a
        change is preceded by a durable request record (if that cannot be written, nothing is
        changed), and the caller shows a result only after the final record is durable."""
        audit = self.audit_log()
        store = opener()
        try:
            # An encrypted store was unlocked with the password; a Vault or AWS one needs no unlock.
            with self._audited_on(
                store,
                audit,
                operation,
                name,
                mutating=mutating,
                reads=reads,
                recorder=recorder,
                unlocked=self.needs_password,
            ) as event:
                yield store, event
        finally:
            store.close()

    @contextmanager
    def held_secret_store(
        self, operation: str
    ) -> Iterator[tuple[SecretStore, Callable[..., AbstractContextManager[Note]]]]:
        """A store held open for a command that reads it more than once over a long time (`run
        --restart-on-change`): each `with audited() as note:` is one audited read operation of its
        own (its own request id; the unlock is recorded with the first; `audited(name)` records the
        name or prefix it is about). Remotely the service audits; `note` is then a no-op."""
        if self.server:
            # The SDK's channel options: its keepalive notices a service that hangs (its watch
            # stream would otherwise wait, silent, for good) and a lost connection is tried again
            # within seconds. Importing them starts gRPC: its log level first (remote_store).
            quiet_grpc()
            from secrets_manager.client._client import CHANNEL_OPTIONS

            with _closed_at_the_end(self.remote_store(CHANNEL_OPTIONS)) as remote:
                yield remote, lambda name=None: nullcontext(Note())
            return
        audit = self.audit_log()
        store = self.unlock()
        unrecorded_unlock = [self.needs_password]

        @contextmanager
        def audited(name: str | None = None) -> Iterator[Note]:
            reads: list[AuditEvent] = []
            unlocked, unrecorded_unlock[0] = unrecorded_unlock[0], False
            with self._audited_on(
                store, audit, operation, name, mutating=False, reads=reads, unlocked=unlocked
            ) as event:
                yield Note(event, store, reads)

        try:
            yield store, audited
        finally:
            store.close()

    @contextmanager
    def _audited_on(
        self,
        store: AuditedStore,
        audit: AuditLog,
        operation: str,
        name: str | None,
        *,
        mutating: bool,
        unlocked: bool,
        reads: list[AuditEvent] | None = None,
        recorder: Recorder | None = None,
    ) -> Iterator[AuditEvent]:
        """One audited operation on an open store (`unlocked`: record its unlock with it)."""
        event = self.event(operation, name)
        pending = [self.event("unlock", request_id=event.request_id)] if unlocked else []
        changes_store = mutating and operation not in _CHANGES_OUTSIDE_THE_STORE
        refuse = getattr(store, "read_only_error", None) if changes_store else None
        refused = refuse() if callable(refuse) else None
        if refused is not None:
            # A store this process can only read: refused before its request record (whose anchor
            # could not move), with one record that says so: the refusal is the error reported
            # even if that record cannot be written (the log read-only too), as for any failure.
            try:
                audit.append([*pending, replace(event, outcome=refused.kind)], store)
            except SecretsManagerError as audit_exc:
                warning_line(f"the refusal could not be audited: {audit_exc}")
            raise refused
        if mutating:
            audit.append([*pending, replace(event, outcome="pending")], store)
            pending = []
            if recorder is not None:
                recorder.append = partial(audit.append, anchor=store)
        try:
            yield event
        except BaseException as exc:
            event.outcome = getattr(exc, "kind", "error")
            event.decision = "deny" if isinstance(exc, AccessDeniedError) else "allow"
            try:
                audit.append([*pending, event], store)
            except (StorageError, AccessDeniedError, UnlockError):
                # The store itself failed while keeping the audit anchor: a Vault or AWS store
                # that is down, refuses us or has no credentials to give, which is why the
                # operation failed too. Nothing was changed or shown; the operation's own error
                # is the one to report.
                pass
            except SecretsManagerError as audit_exc:  # the log cannot take it (an AuditError,
                # or a tamper error): said, and the operation's own error is the one raised.
                # The same error again (a Vault mount that is missing or KV version 1 refuses
                # the anchor as it refused the operation) is the cause already reported, as is
                # the log failing again as it failed for the record of a change made.
                said = exc.cause if isinstance(exc, UnrecordedChangeError) else None
                if (type(audit_exc), str(audit_exc)) != (type(exc), str(exc)) and said != getattr(
                    audit_exc, "cause", str(audit_exc)
                ):
                    warning_line(f"the failure could not be audited: {audit_exc}")
            raise
        try:
            audit.append([*pending, *(reads or [event])], store)
        except SecretsManagerError as exc:
            if not mutating:  # a read: its result is not shown, so it was refused indeed
                raise
            raise UnrecordedChangeError(change_made(event), exc) from None


# Operations recorded as changes (a durable "pending" record first) that do not write the store:
# a backup writes a file, a rotation's set step the target. A read-only store does not refuse them.
_CHANGES_OUTSIDE_THE_STORE = frozenset({"backup", "rotate.set"})


class UnrecordedChangeError(AuditError):
    """A change was made, and then its audit record could not be written. Not "refused": the
    change stands, and a caller told otherwise would make it again (a second version, a second
    import). The fix is the log's, not the change's. The exit code is the log's error's (1 for
    one that cannot be written, 6 for one found damaged)."""

    def __init__(self, made: str, audit_exc: SecretsManagerError) -> None:
        cause = audit_exc.cause if isinstance(audit_exc, AuditError) else str(audit_exc)
        self.exit_code = audit_exc.exit_code
        super().__init__(
            f"{made}, but its audit record could not be written ({cause}): do not make the change "
            "again; once the audit log can be written (free space on its disk if it is full), run "
            "'secrets-manager audit verify'",
            cause=cause,
        )


def change_made(event: AuditEvent) -> str:
    """The change an operation's record reports, in words: "the change was made (store a/x,
    version 2)"."""
    what = " ".join(part for part in (event.operation, event.name) if part)
    if event.version:
        what += f", version {event.version}"
    return f"the change was made ({what})"


@dataclass
class Recorder:
    """Appends records durably while a change runs, so a change of several secrets that is cut
    short (killed, or failing part-way) leaves a record of each one it made. Set by `_audited`."""

    append: Callable[[list[AuditEvent]], object] | None = None


class Note:
    """What a command learns during its operation, for the local audit record (a no-op remotely)."""

    def __init__(
        self,
        event: AuditEvent | None = None,
        store: AuditedStore | None = None,
        reads: list[AuditEvent] | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self._event = event
        self._store = store
        self._reads = reads
        self._recorder = recorder

    def version(self, number: int) -> None:
        """The version the operation read or wrote; 0 (a number the store could not tell, as on
        AWS without secretsmanager:ListSecretVersionIds) is recorded as none."""
        if self._event is not None:
            self._event.version = number or None

    def value(self, data: bytes) -> None:
        """Record the value's `hmac-sha256:` fingerprint (never the value)."""
        if self._event is not None and self._store is not None:
            self._event.value_hmac = value_fingerprint(self._store, data)

    def read(self, secret: Secret) -> None:
        """Record one secret an operation of several read: its own record, in the same request."""
        self.wrote(secret.name, secret.version, secret.value.reveal())

    def wrote(self, name: str, version: int, data: bytes) -> None:
        """Record one secret an operation of several read or wrote (`data`: its value, of which
        only the fingerprint is kept): its own record, in the same request. A change's record is
        appended durably at once; a read's with the operation's end."""
        if self._event is None or self._store is None or self._reads is None:
            return
        self._keep(
            replace(
                self._event,
                name=name,
                version=version or None,
                value_hmac=value_fingerprint(self._store, data),
            )
        )

    def wrote_all(self, changes: Sequence[tuple[str, int, bytes]]) -> None:
        """`wrote` of each (name, version, value) of a change of several secrets made at once (one
        commit): their records appended durably together, with one fsync and anchor move."""
        if self._event is None or self._store is None or self._reads is None or not changes:
            return
        store = self._store
        records = [
            replace(
                self._event, name=name, version=version or None, value_hmac=value_fingerprint(store, data)
            )
            for name, version, data in changes
        ]
        if self._recorder is not None and self._recorder.append is not None:
            try:
                self._recorder.append(records)
            except SecretsManagerError as exc:  # written already: say so, never "refused"
                made = records[0]
                if len(records) > 1:  # "import a/K1 … a/K9 (9 secrets)"
                    what = f"{made.name} … {records[-1].name} ({len(records)} secrets)"
                    made = replace(made, name=what, version=None)
                raise UnrecordedChangeError(change_made(made), exc) from None
        else:
            self._reads.extend(records)

    def erased(self, name: str) -> None:
        """Record one secret an operation of several erased for good (no value, no version)."""
        if self._event is not None:
            self._keep(replace(self._event, name=name, version=None, value_hmac=None))

    def _keep(self, record: AuditEvent) -> None:
        """A change's record appended durably at once; a read's kept for the operation's end."""
        if self._reads is None:
            return
        if self._recorder is not None and self._recorder.append is not None:
            try:
                self._recorder.append([record])
            except SecretsManagerError as exc:  # written already: say so, never "refused"
                raise UnrecordedChangeError(change_made(record), exc) from None
        else:
            self._reads.append(record)


_pass_session = click.make_pass_decorator(Session)
F = TypeVar("F", bound=Callable[..., Any])


# Every store's (and the service's) words for a secret name it does not hold.
_SECRET_NOT_FOUND = re.compile(r"secret '.*' not found", re.DOTALL)


def pass_session(command: F) -> F:
    """Give a command the Session as its first argument, once SHRIVENQUANT_ENV is known to be
    valid: here, when the command runs, and so after click has answered a `--help`."""

    @functools.wraps(command)
    def checked(session: Session, *args: Any, **kwargs: Any) -> Any:
        session.environment  # noqa: B018  (an invalid SHRIVENQUANT_ENV is an error here)
        try:
            return command(session, *args, **kwargs)
        except NotFoundError as exc:
            # A name no store holds, most often a typo: say where to look (with this command
            # line's --store or --server, which only the running command still knows).
            if type(exc) is NotFoundError and _SECRET_NOT_FOUND.fullmatch(str(exc)):
                raise NotFoundError(f"{exc}; check the name: '{suggested('list')}' shows them") from None
            raise

    return _pass_session(checked)  # type: ignore[return-value]


# The commands defined in modules of their own, and the module of each. Such a module is imported
# only when its command is named (or --help lists them all): a `get` does not pay for the imports of
# serve, rotate, backup or run, which were most of its start-up time.
COMMAND_MODULES = {
    "agent": "agent_commands",
    "audit": "audit_commands",
    "backup": "backup_commands",
    "restore": "backup_commands",
    "edit": "edit_command",
    "export": "export_command",
    "health": "health_command",
    "import": "import_command",
    "inject": "inject_command",
    "keys": "keys_commands",
    "mv": "move_commands",
    "cp": "move_commands",
    "otp": "otp_command",
    "pki": "pki_commands",
    "policy": "policy_commands",
    "purge": "purge_command",
    "recovery": "recovery_commands",
    "rotate": "rotate_commands",
    "run": "run_command",
    "schedule": "schedule_commands",
    "serve": "serve_commands",
    "status": "status_command",
    "watch": "watch_command",
}


def refuse_repeated_options(command: click.Command, ctx: click.Context, args: Sequence[str]) -> None:
    """InvalidInputError if an option that takes one value is given more than once. click keeps the
    last silently, so `--store dev … --store prod` (a line put together from two places) would act
    on prod, `--expect-version 3 --expect-version 4` would guard a write with one of two versions,
    `destroy --version 3 --version 4` destroy 4. Flags and options that take several are not
    values that one could override another."""
    if ctx.resilient_parsing:  # shell completion: a half-typed line is not refused
        return
    _, _, order = command.make_parser(ctx).parse_args(args=list(args))  # parses a copy; no callbacks
    seen: set[str] = set()
    for param in order:
        if not isinstance(param, click.Option) or param.multiple or param.count or param.is_flag:
            continue
        if param.name in seen:
            option = max(param.opts, key=len)
            raise InvalidInputError(
                f"{option} was given more than once; it takes one value: give it once "
                f"(see '{ctx.command_path} --help')"
            )
        seen.add(param.name or "")


class OptionsOnceCommand(click.Command):
    """A command whose single-value options may be given once (refuse_repeated_options)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)


class OptionsOnceGroup(click.Group):
    """A group whose options, and its commands' and subgroups', may be given once each."""

    command_class = OptionsOnceCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)


OptionsOnceGroup.group_class = OptionsOnceGroup  # its subgroups, and the top level's (not on demand)


class _CommandsOnDemand(OptionsOnceGroup):
    """The top-level group: a command of COMMAND_MODULES is imported when it is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            importlib.import_module(f"secrets_manager.cli.{COMMAND_MODULES[cmd_name]}")  # registers it
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_CommandsOnDemand,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="SHRIVENQUANT_ENV: development (default), staging or production; production enforces "
    "guard rails against unsafe settings (README.md, 'Environment variables').",
)
@click.option(
    "--store",
    "store_url",
    envvar=STORE_VARIABLE,
    metavar="URL",
    help=f"Store file path, sqlite:///path, postgresql://USER@HOST:PORT/DB, vault://HOST:PORT/MOUNT or "
    f"aws-secretsmanager://REGION/PREFIX [env {STORE_VARIABLE}; default: a file in your data directory].",
)
@click.option(
    "--password-file",
    metavar="PATH",
    help="Read the master password from this file [env MASTER_PASSWORD_FILE].",
)
@click.option(
    "--audit-file",
    envvar=AUDIT_FILE_VARIABLE,
    metavar="PATH",
    help=(
        f"Audit log file [env {AUDIT_FILE_VARIABLE}; default: beside a store file, its suffix made "
        ".audit.jsonl (secrets.db: secrets.audit.jsonl); README, Environment variables]."
    ),
)
@click.option(
    "--server",
    envvar=SERVER_VARIABLE,
    metavar="HOST:PORT",
    help=f"Use a secrets-manager service instead of a local store [env {SERVER_VARIABLE}]; several "
    "comma-separated: the first that answers its health check; mutual TLS from SECRETS_MANAGER_CERT, "
    "SECRETS_MANAGER_KEY, SECRETS_MANAGER_CA.",
)
@click.version_option(package_name="secrets-manager", prog_name="secrets-manager")  # read when asked
@click.pass_context
def cli(
    ctx: click.Context,
    store_url: str | None,
    password_file: str | None,
    audit_file: str | None,
    server: str | None,
) -> None:
    """Keep credentials encrypted (AES-256-GCM, Argon2id, a separate key per service).

    \b
    Master password sources, first match wins: --password-file, MASTER_PASSWORD_FILE,
    MASTER_PASSWORD, a prompt on the terminal (which a running 'agent start' spares you).
    Exit codes: 0 ok, 1 error, 2 invalid input, 3 not found, 4 unlock failed,
    5 access denied, 6 integrity failure, 7 conflict.
    """
    ctx.obj = Session(
        store_url=store_url or None,
        password_file=password_file,
        audit_file=audit_file or None,
        environ=os.environ,
        server=server or None,
    )


@cli.command()
@kdf_profile_option(
    "Argon2id cost: 'default' is RFC 9106's t=3, 64 MiB, p=4; 'test' is cheap, for test suites only."
)
@click.option(
    "--kms-key",
    metavar="KEY",
    help="Unlock the store with this AWS KMS key (ARN, key id or alias) instead of a master password.",
)
@pass_session
def init(session: Session, kdf_profile: str, kms_key: str | None) -> None:
    """Create a new, empty store. Never overwrites an existing one.

    The store is unlocked by a master password, or with --kms-key by AWS KMS: then no password
    exists, and whoever may call kms:Decrypt with that key (with AWS credentials) may open it."""
    session.require_local("init")
    if not session.needs_password:
        raise UnsupportedOperationError(
            f"'init' is not supported by this store: {display_url(session.store_url)} needs none "
            "(its secrets live in Vault or AWS); run the other commands directly"
        )
    where = store_location(session.store_url)
    refuse_existing_store(session.store_url, environment=session.environment)
    audit = session.audit_log()
    audit.refuse_for_a_new_store()  # a deleted store's log: its records are not this store's
    password = None if kms_key else session.password(confirm=True)
    store = create_store(
        session.store_url,
        password,
        kdf_profile=kdf_profile,
        environment=session.environment,
        actor=session.actor,
        audit_path=session.audit_path,
        kms_key=kms_key,
    )
    try:
        audit.append([session.event("init")], store)
    except BaseException:
        discard_new_store(session.store_url, store)  # never announced: leave nothing behind
        raise
    store.close()
    unlocked_by = f"; AWS KMS key {kms_key} unlocks it" if kms_key else ""
    info_line(f"created an empty store at {where}{unlocked_by}")


@cli.command("store")
@click.argument("name", shell_complete=complete_secret_names)
@click.argument("value", required=False)
@click.option("--file", "value_file", metavar="PATH", help="Read the value's exact bytes from a file.")
@click.option("--raw", is_flag=True, help="Keep stdin byte for byte (else one trailing newline is dropped).")
@click.option(
    "--generate", is_flag=True, help="Store a random value instead (shown by 'get', never printed here)."
)
@length_option
@alphabet_option
@click.option(
    "--expect-version",
    type=click.IntRange(min=0),
    metavar="N",
    help="Write only if the current version is N (0: only if the secret does not exist).",
)
@click.option("--allow-empty", is_flag=True, help="Store an empty value (refused otherwise).")
@click.option("--description", help="A note about the secret (not secret itself).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the secret (repeatable).")
@click.option(
    "--max-versions",
    type=int,
    metavar="N",
    help=f"Keep at most N versions of the secret ({MIN_MAX_VERSIONS} to {MAX_MAX_VERSIONS}; new or "
    "existing, from this write on (on Vault from the next: set once this write succeeded); labelled ones "
    "are never pruned). Default: 10, or as set before.",
)
@expires_option(
    "When this value stops working (an exchange key's 90 days, a role's VALID UNTIL): an ISO 8601 "
    "time or an age from now such as 90d. For this version only: the next one has none unless given."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--clip",
    "-c",
    is_flag=True,
    help="With --generate: copy the new value to the clipboard, as 'pass generate -c' does (taken off "
    "as for 'get --clip').",
)
@pass_session
def store_command(
    session: Session,
    name: str,
    value: str | None,
    value_file: str | None,
    raw: bool,
    generate: bool,
    length: int,
    alphabet: str,
    expect_version: int | None,
    allow_empty: bool,
    description: str | None,
    tags: tuple[str, ...],
    max_versions: int | None,
    expires: str | None,
    as_json: bool,
    clip: bool,
) -> None:
    """Store a new version of NAME. The value comes from stdin, a prompt, --file, VALUE (warns), or
    --generate (a random one, like 'pass generate': not printed; 'get' shows it).

    NAME#FIELD replaces one text field of a JSON object value (as 'vault kv patch' does) and keeps
    the others, written only if the version read is still current."""
    name, separator, field = name.partition(FIELD_SEPARATOR)
    try:
        validate_name(name)
    except InvalidInputError:
        if value is None:
            raise
        # `store 'S3cr3t!' DB_PASSWORD` (NAME and VALUE swapped): the message echoed the value.
        raise InvalidInputError(
            "the first argument is not a valid secret name (not shown: it may be the value); write "
            "'store NAME VALUE' with a NAME like 'auth/DB_PASSWORD', or better 'store NAME' and type "
            "the value at the prompt"
        ) from None
    if separator and value is not None:
        # `store 'Pa55#word' DB_PASSWORD` (swapped) would read a secret named after half the value
        # and write the other half's field: a field's new value never comes from an argument.
        raise InvalidInputError(
            "with NAME#FIELD, give the field's new value on stdin, at the prompt, with --file or with "
            "--generate, not as an argument"
        )
    parsed_tags = parse_tags(tags) if tags else None
    checked_max_versions(name, max_versions)
    expiry = future_expiry(expires, name)
    if generate and (value is not None or value_file is not None):
        raise InvalidInputError("--generate makes the value; give no VALUE or --file with it")
    if not generate:
        refuse_generator_options("give --generate too, or drop {them}")
    if separator and not field:
        raise InvalidInputError(f"'{name}{FIELD_SEPARATOR}' names no field; write NAME#FIELD")
    if clip and not generate:
        raise InvalidInputError("--clip copies a generated value: give --generate too (or use 'get --clip')")
    if clip and as_json:
        raise InvalidInputError("--clip and --json exclude each other")
    clipboard = clipboard_found_first() if clip else None
    secret = (
        generated_value(length, alphabet)
        if generate
        else read_value(value, value_file, raw=raw, allow_empty=allow_empty)
    )
    generated = secret
    if separator:
        secret, expect_version = _with_field_replaced(session, name, field, secret, expect_version)
    with session.secret_operation("store", name, mutating=True) as (store, note):
        note.value(secret.reveal())
        info = store.put(
            name,
            secret.reveal(),
            expect_version=expect_version,
            description=description,
            tags=parsed_tags,
            max_versions=max_versions,
            expires=expiry,
        )
        note.version(info.version)
    until = "" if expiry is None else f", expires {timestamp(expiry)}"
    with output_of(f"stored {name} version {info.version}{until}"):
        if as_json:
            print_json({"name": name, "version": info.version, "expires": timestamp(expiry) or None})
        else:
            click.echo(f"stored {name} version {info.version}{until}")
    if clipboard is not None:
        shown_name = f"{name}{separator}{field}"
        try:
            copy_to_clipboard(clipboard, generated.reveal(), shown_name)
        except SecretsManagerError as exc:
            raise SecretsManagerError(
                f"{exc} (it was stored: '{suggested('get', shown_name, '--clip')}' copies it)"
            ) from None


def _with_field_replaced(
    session: Session, name: str, field: str, new: SecretValue, expect_version: int | None
) -> tuple[SecretValue, int]:
    """NAME's current JSON object with `field` set to `new`, and the version it was read from
    (audited as store.read), which the write then expects: a store landing between the read and
    the write would otherwise be undone by the other fields as they were read."""
    with session.secret_operation("store.read", name) as (store, note):
        secret = store.get(name)
        note.version(secret.version)
        note.value(secret.value.reveal())
    if not secret.version:
        raise UnsupportedOperationError(
            f"the version of {name} read is not known (on AWS that needs "
            "secretsmanager:ListSecretVersionIds), so writing one field could undo a concurrent store: "
            "store the whole value instead"
        )
    if expect_version is not None and expect_version != secret.version:
        raise ConflictError(
            f"{name} is at version {secret.version}, not {expect_version} (--expect-version); "
            "nothing was stored"
        )
    return new_value_for(name, secret.value, new, field=field, generated=False), secret.version


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option("--version", "version", type=click.IntRange(min=1), metavar="N", help="A version number.")
@click.option("--label", type=click.Choice(LABELS), help="A label instead of 'current'.")
@click.option("--raw", is_flag=True, help="Write exactly the stored bytes, no newline.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print name, version, labels, expiry, rotation target and value as JSON.",
)
@click.option(
    "--clip",
    "-c",
    is_flag=True,
    help=f"Copy the value to the clipboard instead of printing it, as 'pass -c' does; taken off "
    f"after {CLIP_TIME_VARIABLE} seconds (default {DEFAULT_CLIP_SECONDS}).",
)
@pass_session
def get(
    session: Session,
    name: str,
    version: int | None,
    label: str | None,
    raw: bool,
    as_json: bool,
    clip: bool,
) -> None:
    """Print the value of NAME (its current version unless --version or --label).

    NAME#FIELD prints one field of a secret whose value is a JSON object (a Vault secret with
    several keys, an AWS secret like {"username": …, "password": …})."""
    name, selector, field = split_field_name(name)
    if raw and as_json:
        raise InvalidInputError("--raw and --json exclude each other")
    if clip and (raw or as_json):
        raise InvalidInputError(f"--clip and --{'raw' if raw else 'json'} exclude each other")
    if version is not None and label is not None:
        raise InvalidInputError("give --version or --label, not both")
    clipboard = clipboard_found_first() if clip else None
    with session.secret_operation("get", name) as (store, note):
        try:
            secret = store.get(name, version=version, label=label)
        except NotFoundError as exc:
            raise _naming_full_names(store, name, exc) from None
        note.version(secret.version)
        note.value(secret.value.reveal())
    warn_if_expired(secret)
    data = secret.value.reveal()
    if field:
        data = select_field(data, name, field)
    if raw:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if as_json:
        doc: dict[str, Any] = {
            "name": secret.name,
            "version": secret.version or None,  # 0: not known (AWS, without ListSecretVersionIds)
            "labels": list(secret.labels),
            "created": timestamp(secret.created),
            "expires": timestamp(secret.expires) or None,
            # what a rotation staged this version for (postgres-role:ROLE): where a resume sets it
            "target": secret.target,
        }
        try:
            doc["value"] = data.decode("utf-8")
        except UnicodeDecodeError:
            doc["value_base64"] = base64.b64encode(data).decode("ascii")
        print_json(doc)
        return
    text: str | None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # no text holds a NUL: a file, a key, a C string's end
        raise InvalidInputError(
            f"the value of {name} is binary ({counted(len(data), 'byte')}); use --raw or --json"
        )
    if clipboard is not None:
        copy_to_clipboard(clipboard, data, f"{name}{selector}{field}")
        return
    control = terminal_control(text) if sys.stdout.isatty() else None
    if control is not None:  # an escape sequence could retitle the window, set the clipboard…
        raise InvalidInputError(
            f"the value of {name} holds a control character ({control}) that a terminal would act "
            "on; use --raw into a file or a pipe, or --json"
        )
    # the stored bytes, not the text re-encoded in the locale's encoding (Latin-1: other bytes)
    click.echo(data)


# Full names a short name's miss lists at most (`get BINANCE_API_KEY`)
SHOWN_FULL_NAMES = 5


def _naming_full_names(store: SecretStore, name: str, missing: NotFoundError) -> NotFoundError:
    """`get BINANCE_API_KEY`, as the seed writes it, where the store holds
    market-connector/BINANCE_API_KEY: a name without '/' is in the default namespace, so it is not
    found; the full names that end in it are what was meant (the SDK's credentials take the short
    name; the CLI does not guess which secret to print). `missing` as it is when there are none,
    the name has a '/', or the names cannot be listed (a caller who may not list)."""
    if "/" in name or type(missing) is not NotFoundError or not _SECRET_NOT_FOUND.fullmatch(str(missing)):
        return missing
    try:
        meant = [meta.name for meta in store.list("") if meta.name.endswith("/" + name)]
    except SecretsManagerError:
        return missing
    if not meant:
        return missing
    more = f" and {len(meant) - SHOWN_FULL_NAMES} more" if len(meant) > SHOWN_FULL_NAMES else ""
    return NotFoundError(
        f"{missing}: a name without '/' is in the '{DEFAULT_NAMESPACE}' namespace; did you mean "
        f"{' or '.join(meant[:SHOWN_FULL_NAMES])}{more}?"
    )


def clipboard_found_first() -> tuple[ClipboardTool, int, Path]:
    """The clipboard, how long the value stays on it and where its clearer keeps its files, found
    before the secret is read or written: a read that could go nowhere is not audited as done, and
    a generated value is not stored where nobody could paste it."""
    try:
        seconds = clip_seconds(os.environ)
        tool = find_clipboard(os.environ)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    except ClipboardUnavailable as exc:
        raise SecretsManagerError(f"{exc}; run the command without --clip") from None
    from secrets_manager.agent import agent_directory, check_directory

    directory = agent_directory(os.environ)
    check_directory(directory, create=True)
    return tool, seconds, directory


def copy_to_clipboard(clipboard: tuple[ClipboardTool, int, Path], data: bytes, shown_name: str) -> None:
    from secrets_manager.cli.rotate_commands import terminate_as_interrupt  # it imports this module

    tool, seconds, directory = clipboard
    if not data:  # copying it would only empty the clipboard for a while, as pass -c refuses to
        raise InvalidInputError(f"{shown_name} is empty: there is nothing to copy to the clipboard")
    try:
        # A closed terminal (SIGHUP) or a kill (SIGTERM) during the copy ends it as Ctrl-C does,
        # taking the value off: left to their default action they left it on with no clearer.
        with terminate_as_interrupt():
            copy_for_a_while(tool, data, seconds, directory)
    except ClipboardFailed as exc:
        raise SecretsManagerError(f"could not copy {shown_name} to the clipboard: {exc}") from None
    click.echo(f"Copied {shown_name} to the clipboard ({tool.name}); it is cleared in {seconds} s.")


@cli.command("list")
@click.argument("prefix", required=False, default="")
@click.option(
    "--long",
    "-l",
    "long_format",
    is_flag=True,
    help="Show version, update time, state (active or deleted) and description.",
)
@click.option("--deleted", is_flag=True, help="Include soft-deleted secrets.")
@click.option(
    "--older-than",
    metavar="TIME",
    help="Only secrets whose current value was stored before TIME (ISO 8601, or an age such as 90d): "
    "the ones not rotated since.",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="KEY[=VALUE]",
    help="Only secrets with this tag (KEY), or with it set to exactly VALUE (KEY=VALUE); repeatable, "
    "all must hold.",
)
@click.option(
    "--description",
    "description_text",
    metavar="TEXT",
    help="Only secrets whose description contains TEXT, ignoring case.",
)
@click.option(
    "--expiring",
    metavar="WITHIN",
    help="Only secrets whose current version expires within WITHIN (an age such as 14d, or an ISO 8601 "
    "time) or has expired; with -l, their expiry.",
)
@click.option("--json", "as_json", is_flag=True, help="Print metadata as JSON (never values).")
@pass_session
def list_command(
    session: Session,
    prefix: str,
    long_format: bool,
    deleted: bool,
    older_than: str | None,
    tags: tuple[str, ...],
    description_text: str | None,
    expiring: str | None,
    as_json: bool,
) -> None:
    """List secret names (never values), optionally only those starting with PREFIX.

    --tag and --description filter like the tag-key, tag-value and description filters of AWS's
    list-secrets; all filters given must hold."""
    validate_prefix(prefix)
    cutoff = (
        parse_cutoff(older_than, "--older-than", "leave --older-than out to list every secret")
        if older_than
        else None
    )
    wanted_tags = parse_tag_filters(tags)
    horizon = None if expiring is None else parse_deadline(expiring, "--expiring")
    if description_text == "":
        raise InvalidInputError("--description '' would match every secret; give some text to look for")
    with session.secret_operation("list", prefix or None) as (store, _):
        secrets = store.list(prefix, include_deleted=deleted)
    # Filtered here, on what every store (and ListSecrets over --server) returns: the same on all.
    if cutoff is not None:
        secrets = [
            meta for meta in secrets if (stored := current_value_time(meta)) is not None and stored < cutoff
        ]
    if wanted_tags:
        secrets = [meta for meta in secrets if has_tags(meta, wanted_tags)]
    if description_text is not None:
        needle = description_text.casefold()
        secrets = [meta for meta in secrets if needle in meta.description.casefold()]
    if horizon is not None:
        secrets = sorted(
            (meta for meta in secrets if meta.expires is not None and meta.expires <= horizon),
            key=lambda meta: (meta.expires, meta.name),
        )
    if as_json:
        print_json([metadata_doc(meta) for meta in secrets])
    elif long_format:
        now = datetime.now(UTC)
        print_table(
            ["NAME", "VERSION", "UPDATED", "STATE", "DESCRIPTION", *(["EXPIRES"] if horizon else [])],
            [
                [
                    meta.name,
                    str(meta.current_version or "-"),
                    timestamp(meta.updated),
                    "deleted" if meta.deleted else "active",
                    meta.description,
                    *([expiry_text(meta.expires, now)] if horizon else []),
                ]
                for meta in secrets
            ],
            free_text=["DESCRIPTION"],
        )
    else:
        for meta in secrets:
            click.echo(meta.name)


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option("--json", "as_json", is_flag=True, help="Print metadata and versions as JSON.")
@pass_session
def history(session: Session, name: str, as_json: bool) -> None:
    """Show the versions of NAME: when, by whom, labels, destroyed or not (never values)."""
    validate_name(name)
    with session.secret_operation("history", name) as (store, _):
        meta = store.describe(name)
    if as_json:
        print_json(metadata_doc(meta))
        return
    now = datetime.now(UTC)
    print_table(
        ["VERSION", "CREATED", "CREATED BY", "LABELS", "STATE", "EXPIRES"],
        [
            [
                str(v.version),
                timestamp(v.created),
                v.created_by,
                ",".join(v.labels),
                "destroyed" if v.destroyed else "stored",
                expiry_text(meta.expires, now) if v.version == meta.current_version else "",
            ]
            for v in meta.versions
        ],
        free_text=["CREATED BY"],
    )


@cli.command("metadata")
@click.argument("name", shell_complete=complete_secret_names)
@click.option("--description", metavar="TEXT", help="Set the description ('' clears it).")
@click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Add or change a tag (repeatable); others stay."
)
@click.option("--untag", "untags", multiple=True, metavar="KEY", help="Remove a tag (repeatable).")
@click.option(
    "--max-versions",
    type=int,
    metavar="N",
    help=f"Keep at most N versions ({MIN_MAX_VERSIONS} to {MAX_MAX_VERSIONS}); if fewer than are kept now, "
    "the oldest unlabelled ones go at the next write (on AWS they are hidden at once).",
)
@click.option(
    "--expires",
    metavar="TIME",
    help="When the current version stops working: an ISO 8601 time or an age from now such as 90d (a past "
    "time records an expiry learnt late).",
)
@click.option("--no-expiry", is_flag=True, help="Forget the current version's expiry.")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON (never values).")
@pass_session
def metadata_command(
    session: Session,
    name: str,
    description: str | None,
    tags: tuple[str, ...],
    untags: tuple[str, ...],
    max_versions: int | None,
    expires: str | None,
    no_expiry: bool,
    as_json: bool,
) -> None:
    """Show NAME's description, tags, max versions, expiry and state; or change them with
    --description, --tag, --untag, --max-versions, --expires and --no-expiry without writing a new
    version (like AWS's update-secret and tag-resource, and Vault's 'kv metadata put')."""
    validate_name(name)
    if expires is not None and no_expiry:
        raise InvalidInputError("give --expires or --no-expiry, not both")
    expiry = None if expires is None else parse_deadline(expires, "--expires")
    expiry_given = expiry is not None or no_expiry
    if description is None and not tags and not untags and max_versions is None and not expiry_given:
        with session.secret_operation("history", name) as (store, _):
            meta = store.describe(name)
        if as_json:
            print_json(metadata_doc(meta))
        else:
            print_metadata(meta)
        return
    if as_json:
        raise InvalidInputError(
            "--json shows the metadata; give it without --description, --tag, --untag, --max-versions, "
            "--expires or --no-expiry"
        )
    set_tags = parse_tags(tags)
    checked_max_versions(name, max_versions)
    absent: list[str] | None = None  # the --untag keys the secret did not have; None: not known
    unchanged = False  # the store refused the update as one that changes nothing
    with session.secret_operation("metadata", name, mutating=True) as (store, _):
        if untags and not is_remote_store(store):  # a service's describe needs `list`
            tags_before = store.describe(name).tags
            absent = sorted({key for key in untags if key not in tags_before})
        nothing_to_do = (
            absent is not None
            and len(absent) == len(set(untags))
            and description is None
            and not set_tags
            and max_versions is None
            and not expiry_given
        )
        if nothing_to_do:  # removing only tags it does not have changes nothing, `updated` included
            checked_metadata_update(name, description, set_tags, untags, max_versions)  # as the store would
        else:
            try:
                store.update_metadata(
                    name,
                    description=description,
                    set_tags=set_tags,
                    remove_tags=untags,
                    max_versions=max_versions,
                    expires=expiry,
                    clear_expiry=no_expiry,
                )
            except NothingToChangeError:  # already as asked (the store or service checked): said below
                absent = sorted(set(untags))  # a tag it had would have been a change
                unchanged = True
    removed = len(set(untags)) - len(absent or [])
    already = " (already so)" if unchanged else ""
    changed = [
        *(
            []
            if description is None
            else [("description cleared" if not description else "description set") + already]
        ),
        *([f"{len(set_tags)} tag(s) set{already}"] if set_tags else []),
        *([f"{removed} tag(s) removed"] if removed else []),
        *([f"no tag {', '.join(map(repr, absent))} to remove (it was not there)"] if absent else []),
        *(["a tag not set is ignored"] if untags and absent is None else []),
        *([] if max_versions is None else [f"max versions set to {max_versions}{already}"]),
        *([] if expiry is None else [f"expiry set to {timestamp(expiry)}{already}"]),
        *(["expiry cleared" + already] if no_expiry else []),
    ]
    pruning = "" if unchanged else _pruning(store, max_versions)
    info_line(f"updated the metadata of {name}: {', '.join(changed)} (no new version{pruning})")
    if expiry is not None and expiry <= datetime.now(UTC):
        warning_line(
            f"{timestamp(expiry)} is past: the current version of {name} counts as expired; store "
            f"the new credential with '{suggested('store', name, '--expires', 'TIME')}'"
        )


def _pruning(store: SecretStore, max_versions: int | None) -> str:
    """When a new max_versions takes effect, which depends on the store."""
    if max_versions is None:
        return ""
    if max_versions_hide_at_once(store):
        return "; versions past it are hidden at once (AWS keeps them: a higher limit shows them again)"
    at_next_write = "; the next write prunes the oldest unlabelled versions past it"
    if is_remote_store(store):  # the service's store is not known here
        return f"{at_next_write} (a service on AWS hides them at once)"
    return at_next_write


def parse_tag_filters(tags: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """`list --tag` arguments as (key, value) pairs: the value None for a bare KEY (the tag is set,
    whatever its value). The first '=' ends the key, as in `store --tag`."""
    wanted: list[tuple[str, str | None]] = []
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not key:
            raise InvalidInputError(f"--tag {tag!r} names no tag key; write --tag KEY or --tag KEY=VALUE")
        wanted.append((key, value if sep else None))
    return wanted


def has_tags(meta: SecretMetadata, wanted: list[tuple[str, str | None]]) -> bool:
    """Whether `meta` has every tag in `wanted` (with exactly that value where one is given)."""
    return all(key in meta.tags and value in (None, meta.tags[key]) for key, value in wanted)


def current_value_time(meta: SecretMetadata) -> datetime | None:
    """When the current version was stored (None without one): what a rotation moves, unlike
    `updated`, which a metadata change moves too."""
    return next((v.created for v in meta.versions if v.version == meta.current_version), None)


def print_metadata(meta: SecretMetadata) -> None:
    """One 'field: value' line each, tags one per line, escaped for the terminal."""
    created_by = f" by {meta.created_by}" if meta.created_by else ""
    lines = [
        ("name", meta.name),
        ("description", meta.description),
        *(("tag", f"{key}={value}") for key, value in sorted(meta.tags.items())),
        ("current version", str(meta.current_version or "-")),
        ("versions", str(len(meta.versions))),
        ("max versions", str(meta.max_versions)),
        ("expires", expiry_text(meta.expires) or "-"),
        ("created", timestamp(meta.created) + created_by),
        ("updated", timestamp(meta.updated)),
        ("state", f"deleted {timestamp(meta.deleted)}" if meta.deleted else "active"),
    ]
    for field_name, value in lines:
        click.echo(f"{field_name + ':':<17}{printable(value)}")


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option(
    "--expect-version",
    type=click.IntRange(min=1),
    metavar="N",
    help="Only if version N is still current (exit 7, nothing deleted, if another version is).",
)
@pass_session
def delete(session: Session, name: str, expect_version: int | None) -> None:
    """Soft-delete NAME: hidden from get and list until 'undelete'."""
    validate_name(name)
    with session.secret_operation("delete", name, mutating=True) as (store, note):
        if expect_version is not None:
            note.version(expect_version)
        store.delete(name, expect_version=expect_version)
    info_line(f"deleted {name} (recoverable with '{suggested('undelete', name)}')")


@cli.command()
@click.argument("name")
@pass_session
def undelete(session: Session, name: str) -> None:
    """Restore a soft-deleted NAME."""
    validate_name(name)
    with session.secret_operation("undelete", name, mutating=True) as (store, _):
        store.undelete(name)
    info_line(f"restored {name}")


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    metavar="N",
    help="The version whose value becomes current again (default: the one labelled previous).",
)
@click.option("--json", "as_json", is_flag=True, help="Print name, new version and source version as JSON.")
@pass_session
def rollback(session: Session, name: str, version: int | None, as_json: bool) -> None:
    """Make an earlier version's value current again, written as a new version (Vault's
    'kv rollback'): the history stays whole. Compare-and-set against the current version, so a
    change made meanwhile is never overwritten (exit 7)."""
    validate_name(name)
    with session.secret_operation("rollback", name, mutating=True) as (store, note):
        current = _current_version(store, name)
        if version is None:
            try:
                old = store.get(name, label=PREVIOUS)
            except NotFoundError as error:  # none labelled so, or its value destroyed: say which
                raise NotFoundError(
                    f"{name} has no previous version to roll back to ({error}); give --version N "
                    f"('{suggested('history', name)}' shows the versions)"
                ) from None
        else:
            old = store.get(name, version=version)
        if version is None and old.version == current:
            # `previous` is never on the current version: read after `current`, it is on it only
            # because a version was stored between the two reads (a conflict, not a bad request).
            raise ConflictError(
                f"{name} changed while the rollback read it (version {current} was current, and is now "
                f"labelled previous); nothing was written: run the rollback again"
            )
        if old.version == current:
            raise InvalidInputError(
                f"version {old.version} of {name} is current already; nothing to roll back"
            )
        # the same credential as that version: its expiry, if one is recorded for it, goes with it
        try:
            info = store.put(name, old.value.reveal(), expect_version=current, expires=old.expires)
        except SecretsManagerError as error:
            stored = error.stored_version
            if stored is None:
                raise
            # Vault or AWS wrote the version, then refused its expiry: the rollback is made.
            note.version(stored)
            note.value(old.value.reveal())
            raise restated(
                error,
                f"rolled back {name}: version {stored} is current, with the value of version "
                f"{old.version}, but its expiry was not recorded: "
                f"{error.metadata_error or error}; do not roll back again "
                f"('{suggested('metadata', name, '--expires')} …' sets it)",
            ) from None
        note.version(info.version)
        note.value(old.value.reveal())
    if as_json:
        print_json({"name": name, "version": info.version, "from_version": old.version})
    info_line(
        f"rolled back {name}: version {info.version} is current, with the value of version {old.version}"
    )
    warn_if_written_expired(name, info.version, old.expires, f"the value of version {old.version}")


def _current_version(store: SecretStore, name: str) -> int:
    """The current version of `name`, read with GetSecret (`read` suffices over --server); if its
    value was destroyed (`destroy --version N`), its number from DescribeSecret: rolling back is
    then the way to a readable current value again, as Vault's 'kv rollback' allows."""
    try:
        return store.get(name).version
    except NotFoundError:
        try:
            meta = store.describe(name)
        except SecretsManagerError:
            meta = None
        destroyed = {info.version for info in meta.versions if info.destroyed} if meta else set()
        if meta is None or meta.deleted is not None or meta.current_version not in destroyed:
            raise  # the get's own error: no such secret, deleted, …
        assert meta.current_version is not None
        return meta.current_version


@cli.command()
@click.argument("name", shell_complete=complete_secret_names)
@click.option(
    "--version",
    "versions",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="N",
    help="A version to erase (repeatable).",
)
@click.option("--all", "destroy_all", is_flag=True, help="Erase every version and the metadata.")
@pass_session
def destroy(session: Session, name: str, versions: tuple[int, ...], destroy_all: bool) -> None:
    """Erase versions of NAME for good (cannot be undone)."""
    session.require_local("destroy")
    validate_name(name)
    if bool(versions) == destroy_all:
        raise InvalidInputError("give --version N (repeatable) or --all")
    with session.store_operation("destroy", name, mutating=True) as (store, event):
        if not destroy_all:
            event.version = min(versions) if len(set(versions)) == 1 else None
        if destroy_all:
            store.destroy_secret(name)
        else:
            store.destroy(name, versions)
    if destroy_all:
        info_line(f"destroyed every version of {name}")
    else:
        info_line(f"destroyed version {', '.join(map(str, sorted(set(versions))))} of {name}")


@cli.command()
@click.option("--new-password-file", metavar="PATH", help="Read the new master password from this file.")
@click.option(
    "--kdf-profile",
    type=click.Choice(KDF_PROFILE_NAMES),
    default=None,
    help="Argon2id cost of the new password: 'default' raises a store made with 'test' in place. "
    "Without it the store's own cost stays (see 'status').",
)
@pass_session
def passwd(session: Session, new_password_file: str | None, kdf_profile: str | None) -> None:
    """Change the master password (rewraps the root key only: fast at any store size)."""
    session.require_local("passwd")
    with session.operation("passwd", mutating=True) as (store, _):
        store.require_password_unlock()  # before asking for a new one
        if new_password_file:
            new = read_new_password_file(Path(new_password_file), environment=session.environment)
        else:
            new = prompt_password("New master password", confirm=True, file_option="--new-password-file")
        if kdf_profile is None:
            scrubbed = store.change_password(session.environment.check_new_password(new))
        else:  # production refuses a profile weaker than the default
            scrubbed = store.change_unlock(
                new_password_unlock(new, kdf_profile, environment=session.environment)
            )
        can_scrub = store.can_scrub
    session.forget_in_agent()
    info_line("master password changed")
    warn_if_not_scrubbed(scrubbed, can_scrub, "password")


@cli.command("unlock-with")
@click.argument("source", type=click.Choice(["password", "kms"]))
@click.argument("kms_key", metavar="[KMS_KEY]", required=False)
@click.option("--new-password-file", metavar="PATH", help="Read the new master password from this file.")
@kdf_profile_option("Argon2id cost of the new password ('test' is for test suites only).")
@pass_session
def unlock_with(
    session: Session, source: str, kms_key: str | None, new_password_file: str | None, kdf_profile: str
) -> None:
    """Switch what unlocks the store: 'kms KMS_KEY' (an AWS KMS key's ARN, id or alias) or
    'password' (a new master password). Rewraps the root key only: no secret is re-encrypted.

    \b
    secrets-manager unlock-with kms arn:aws:kms:eu-west-1:111122223333:key/…
    secrets-manager unlock-with password --new-password-file new-password.txt"""
    session.require_local("unlock-with")
    new_password = new_unlock_arguments("unlock-with", source, kms_key, new_password_file, session)
    with session.operation("unlock-with", mutating=True) as (store, _):
        old = unlocked_by(store)
        scrubbed = store.change_unlock(new_unlock_source(session, kms_key, new_password, kdf_profile))
        can_scrub = store.can_scrub
    session.forget_in_agent()
    info_line(f"the store is now unlocked by {f'AWS KMS key {kms_key}' if kms_key else 'the new password'}")
    warn_if_not_scrubbed(scrubbed, can_scrub, old)


def unlocked_by(store: EncryptedStore) -> str:
    """What unlocks `store` now, in words: "password" or "AWS KMS key"."""
    return "password" if store.unlock_kind == PasswordUnlock.kind else "AWS KMS key"


def warn_if_not_scrubbed(scrubbed: bool, can_scrub: bool, old: str) -> None:
    """After a change of what unlocks the store: say so if the root key wrapped by the old
    `old` ("password", "AWS KMS key") may still be in the store's files."""
    if scrubbed:
        return
    if can_scrub:
        warning_line(
            f"another process had the store open, so the root key wrapped by the old {old} may stay in "
            "its write-ahead log until the next checkpoint; run 'secrets-manager keys rotate --root' "
            "when it is closed to make that copy useless"
        )
    else:
        warning_line(
            f"this store's database keeps superseded copies (old row versions, its WAL, replicas and "
            f"backups) that no client can erase: the root key wrapped by the old {old} remains there; "
            "'secrets-manager keys rotate --root' makes those copies useless"
        )


def new_unlock_arguments(
    command: str, source: str, kms_key: str | None, new_password_file: str | None, session: Session
) -> bytes | None:
    """Check `COMMAND password|kms [KMS_KEY] [--new-password-file]`; the new password if a file
    gives it (read before anything is opened, so a bad file changes nothing)."""
    if source == "kms" and not kms_key:
        raise InvalidInputError(f"give the KMS key: '{command} kms KEY' (an ARN, key id or alias)")
    if source == "kms" and new_password_file:
        raise InvalidInputError(f"--new-password-file goes with '{command} password', not with kms")
    if source == "password" and kms_key:
        raise InvalidInputError(
            f"'{command} password' takes no key: the new password comes from a prompt or file"
        )
    if new_password_file:
        return read_new_password_file(Path(new_password_file), environment=session.environment)
    return None


def new_unlock_source(
    session: Session, kms_key: str | None, new_password: bytes | None, kdf_profile: str
) -> UnlockSource:
    """The AWS KMS key `kms_key`, or else the new password (asked twice now if no file gave it)."""
    if kms_key:
        return AwsKmsUnlock(kms_key)
    if new_password is None:
        new_password = prompt_password("New master password", confirm=True, file_option="--new-password-file")
    return new_password_unlock(new_password, kdf_profile, environment=session.environment)


def read_value(
    value: str | None,
    value_file: str | None,
    *,
    raw: bool,
    allow_empty: bool = False,
    refused: str = "nothing was stored. To store an empty value, give --allow-empty",
) -> SecretValue:
    """The value to store, from exactly one source; checked for size before any unlock. An empty
    value is refused unless `allow_empty`: it is most often a failed command feeding stdin, and
    storing it would blank a live credential. `refused` ends that refusal: what was not done and
    how to do it anyway (a command without --allow-empty says so)."""
    if value is not None and value_file is not None:
        raise InvalidInputError("give the value as an argument or with --file, not both")
    if value is not None:
        warning_line(
            "a value on the command line is visible in the process list and shell history; "
            "pipe it on stdin or use --file instead"
        )
        data = os.fsencode(value)  # the argument's own bytes, UTF-8 or not
    elif value_file is not None:
        if not value_file:
            raise InvalidInputError("--file needs a path: give the file that holds the value")
        try:
            data = read_bounded(Path(value_file), MAX_VALUE_SIZE, what="the value")
        except OSError as exc:
            raise InvalidInputError(f"cannot read {value_file}: {exc.strerror}") from None
    elif not sys.stdin.isatty():
        data = sys.stdin.buffer.read(MAX_VALUE_SIZE + 3)
        if not raw:
            data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    elif terminal_available():
        try:
            text = click.prompt(
                "Value", hide_input=True, confirmation_prompt=True, err=True, default="", show_default=False
            )
        except UnicodeDecodeError:
            raise InvalidInputError(
                "the value typed is not UTF-8 text (is the terminal set to UTF-8?); nothing was stored. "
                "To store any bytes, pipe them on stdin or use --file"
            ) from None
        data = text.encode("utf-8")
    else:
        raise InvalidInputError("no value given: pipe it on stdin, use --file PATH, or pass VALUE")
    if len(data) > MAX_VALUE_SIZE:
        raise InvalidInputError(f"the value is over {MAX_VALUE_SIZE} bytes (64 KiB); nothing was stored")
    if not data and not allow_empty:
        source = f"{value_file} is empty" if value_file is not None else "the value is empty"
        if value_file is None and value is None:
            source += " (did the command feeding stdin fail?)"
        raise InvalidInputError(f"{source}; {refused}")
    return SecretValue(data)


def _fields(count: int) -> str:
    return counted(count, "field")


def warn_if_expired(secret: Secret) -> None:
    """A value read whose expiry has passed is still given (it may work yet), with one warning
    line saying how to replace it or record its new date: get, otp, inject, run."""
    if secret.expires is None or secret.expires > datetime.now(UTC):
        return
    name = secret.name
    warning_line(
        f"version {secret.version} of {name} expired at {timestamp(secret.expires)}; store the new "
        f"credential with '{suggested('store', name, '--expires', 'TIME')}' (or, if it still works, "
        f"record its new date with '{suggested('metadata', name, '--expires', 'TIME')}')"
    )


def warn_if_written_expired(name: str, version: int, expires: datetime | None, source: str) -> None:
    """A rollback, cp or mv writes the same credential again with its expiry: one that has passed
    is written all the same (it may work yet), with one warning line, as `get` would give."""
    if expires is None or expires > datetime.now(UTC):
        return
    warning_line(
        f"version {version} of {name} holds {source}, which expired at {timestamp(expires)}; store "
        f"the new credential with '{suggested('store', name, '--expires', 'TIME')}' (or, if it still "
        f"works, record its new date with '{suggested('metadata', name, '--expires', 'TIME')}')"
    )


def split_field_name(text: str) -> tuple[str, str, str]:
    """NAME#FIELD as (NAME, "#", FIELD), or (NAME, "", "") without a field; the name checked, and
    a '#' with no field after it refused."""
    name, selector, field = text.partition(FIELD_SEPARATOR)
    validate_name(name)
    if selector and not field:
        raise InvalidInputError(f"'{name}{FIELD_SEPARATOR}' names no field; write NAME#FIELD")
    return name, selector, field


def select_field(data: bytes, name: str, field: str) -> bytes:
    """One top-level field of a JSON object value: a string as is, anything else as JSON."""
    document = read_exact_json_object(data)
    if document is None:
        raise InvalidInputError(f"the value of {name} is not a JSON object, so it has no field {field!r}")
    if field not in document.fields:
        raise NotFoundError(  # the field names are part of the value: counted, not listed
            f"the value of {name} has no field {field!r} (it has {_fields(len(document.fields))}; "
            f"'{suggested('get', name)}' shows them)"
        )
    chosen = document.fields[field]
    text = chosen if document.is_text(chosen) else document.dumps(chosen, compact=True)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800"), which UTF-8 cannot hold
        raise InvalidInputError(
            f"field {field!r} of {name} holds an unpaired UTF-16 surrogate escape, which is not text; "
            f"read the whole value with 'get {name} --raw'"
        ) from None


def parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    parsed = {}
    for tag in tags:
        key, sep, val = tag.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"tag {tag!r} is not KEY=VALUE")
        if key in parsed:
            raise InvalidInputError(f"tag {key!r} is given twice; give each key once")
        parsed[key] = val
    return parsed


def metadata_doc(meta: SecretMetadata) -> dict[str, Any]:
    return {
        "name": meta.name,
        "namespace": meta.namespace,
        "current_version": meta.current_version,
        "created": timestamp(meta.created),
        "updated": timestamp(meta.updated),
        "created_by": meta.created_by,
        "description": meta.description,
        "tags": dict(meta.tags),
        "deleted": timestamp(meta.deleted) or None,
        "labels": dict(meta.labels),
        "max_versions": meta.max_versions,
        "expires": timestamp(meta.expires) or None,
        "versions": [
            {
                "version": v.version,
                "created": timestamp(v.created),
                "created_by": v.created_by,
                "labels": list(v.labels),
                "destroyed": v.destroyed,
            }
            for v in meta.versions
        ],
    }
