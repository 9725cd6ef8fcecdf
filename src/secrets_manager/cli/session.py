"""The Session every command is given: the options all commands share, the store they open (our
encrypted store unlocked by its password, the agent, AWS KMS or recovery shares; a Vault or AWS store
with its own credentials; or the service at --server), and the audit record of each operation on it.

An operation fails closed: a change is preceded by a durable request record, and a command shows
its result only once the final record is durable (`Session._audited`); a change made whose record
then fails is `UnrecordedChangeError`, never "refused". `Note` is what a command tells that record.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

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
from secrets_manager.cli.output import info_line, warning_line
from secrets_manager.cli.password import read_password
from secrets_manager.environment import (
    PASSWORD_FILE_VARIABLE,
    PASSWORD_VARIABLE,
    Environment,
    current_environment,
)
from secrets_manager.errors import (
    AccessDeniedError,
    HandshakeFailedError,
    InvalidInputError,
    MissingCredentialsError,
    OutcomeUnknownError,
    SecretsManagerError,
    StorageError,
    UnlockError,
    UnsafeConfigurationError,
    UnsupportedOperationError,
)
from secrets_manager.store import EncryptedStore, Secret, SecretStore
from secrets_manager.store.base import AuditedStore
from secrets_manager.store.external import NoAnswerError
from secrets_manager.store.unlock import UnlockKeyRefused, UnlockKeyUnlock
from secrets_manager.store.url import (
    default_audit_path,
    display_url,
    legacy_audit_path,
    local_store_files,
    needs_password,
    open_external_store,
    open_store,
    open_store_with_recovery,
    store_identity,
    store_location,
)

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
S = TypeVar("S", bound=AuditedStore)


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
            from secrets_manager.client._replicas import CHANNEL_OPTIONS

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
