"""PostgreSQL storage (psycopg 3): several service replicas share one store through one database.

The store lives in a schema of its own (default `secrets_manager`; several stores can share a
database under different schemas), in three tables:

    meta     one row: which application and schema version made it, the revision counter, and
             `log_start`, the newest revision whose change-log rows may have been dropped
    entries  key (text, COLLATE "C": code-point order, like SQLite's BINARY) → value (bytea), revision
    changes  the change feed: (revision, key, deleted), bounded to CHANGE_LOG_RETAINED revisions

Invariant: every `commit` is one transaction whose first statement increments the counter row
(`UPDATE meta SET revision = revision + 1 … RETURNING`). That row lock serialises committers
across every connection, process and replica — what `BEGIN IMMEDIATE` is for SQLite — so:

* compare-and-set cannot race: preconditions are checked after the lock is taken, by statements
  that (in READ COMMITTED) see every commit that held it before;
* revisions are handed out in commit order and without gaps (a refused commit rolls its increment
  back), and a commit is visible before the next one can take the lock, so a change-feed reader
  that has seen revision N has seen everything up to N. A SEQUENCE would not do: its numbers are
  taken before commit and become visible out of order, and a watcher that read 11 before 10
  committed would skip 10 forever. SERIALIZABLE with retries would keep compare-and-set safe
  too, but would still need the counter for the feed and would burn retries under contention.

A commit that enters the change feed also sends `NOTIFY secrets_manager_changes` with the schema
as payload, delivered at COMMIT: `on_commits` LISTENs on a connection of its own, so a watcher in
any process hears of a change at once instead of at its next read of the feed.

Behind a pooler (pgbouncer; `_pooled`) nothing relies on a server session outliving a
transaction: no prepared statements, no LISTEN, no session SET (each write transaction sets its
own limits), and the server's start time is read with the change head and feed as well.

The cost is one writer at a time per store, fine for secrets (writes are rare and short).
`durable=False` commits with `SET LOCAL synchronous_commit = off`: atomic and crash-safe, but
acknowledged before the WAL reaches disk.

Not `Scrubbable`: PostgreSQL keeps superseded row versions until VACUUM reuses their space (it
does not zero it), and copies in its WAL, WAL archive, replicas and base backups, none of which a
client can erase. A destroyed key's sealed copies age out with them instead; `EncryptedStore`
reports "not scrubbed" for this storage, which is the truth.

The connection string may hold a password; it is never shown: `repr`, errors and logs name the
store as `postgresql://user@host:port/dbname`, and any text from the server or libpq has the
password masked before it is raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from secrets_manager.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    StorageError,
    StoreBusyError,
    StoreClosedError,
    StoreNotFoundError,
    shell_quote,
)
from secrets_manager.storage.base import (
    ABSENT,
    Change,
    ChangeBatch,
    Delete,
    Entry,
    Expect,
    Operation,
    PointRead,
    Put,
)
from secrets_manager.storage.deadline import WATCHDOG

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)

APPLICATION = "secrets-manager"
DEFAULT_SCHEMA = "secrets_manager"
CHANGE_LOG_RETAINED = 100_000  # revisions of change history kept for watchers (as SqliteStorage)
# libpq's words for a connection refused for want of the right password (no password given, or
# the wrong one): the error then says where libpq takes it from.
PASSWORD_REFUSALS = ("no password supplied", "password authentication failed")
# The server's refusal of a connection to a database it does not have (SQLSTATE 3D000,
# invalid_catalog_name). libpq gives a refused connection no SQLSTATE (psycopg's `sqlstate` is
# None), so it is told by the server's words; a server whose lc_messages is not English says
# them otherwise, and that refusal stays a connection failure (exit 1).
_NO_SUCH_DATABASE = re.compile(r'FATAL:\s+database "(.+?)" does not exist')
LOCK_TIMEOUT_MS = 30_000  # how long a commit waits for another writer (SqliteStorage's busy timeout)
# How long the server lets one of our write transactions sit between statements before it ends the
# session (idle_in_transaction_session_timeout). Ours run their statements back to back (a few ms),
# so a transaction idle this long has lost its client: a process stopped, a proxy or network path
# that swallows the traffic. Without it the server keeps that transaction, and the store's lock it
# holds, until it notices the connection is gone (TCP keepalive: hours by default), and every other
# writer (another replica, the CLI) fails with "another writer held the store's lock". Shorter than
# any writer's wait for that lock (an audit anchor's is ~5 s). A shorter one set for the role stays.
STALLED_TRANSACTION_TIMEOUT_MS = 2_000
# The most bytes of names and values one statement of a commit carries; a commit of more (a
# restore of a big store) goes as several, still one transaction. PostgreSQL takes at most 1 GB
# in one message or one array value, and each statement's arrays are built whole in memory.
STATEMENT_BYTES = 16 * 1024 * 1024
CONNECT_TIMEOUT_S = 10  # unless the connection string or PGCONNECT_TIMEOUT says otherwise
# How long we wait for the server's answer to one round trip (a statement, BEGIN, COMMIT, a page
# of a scan) before the connection is shut down and the call fails: a server that was stopped, a
# proxy that swallows its answers or a network path gone mid-call otherwise leave libpq waiting
# for ever. A statement that may wait for the commit lock (or another lock: DDL, the advisory lock
# of `create`) is given its lock wait on top. ANSWER_TIMEOUT_VARIABLE overrides the default.
ANSWER_TIMEOUT_S = 30.0
ANSWER_TIMEOUT_VARIABLE = "SECRETS_MANAGER_PG_ANSWER_TIMEOUT"
# Every commit that enters the change feed notifies this channel with its schema as the payload
# (sent at COMMIT), so watchers in other processes hear of it at once (`on_commits`).
NOTIFY_CHANNEL = "secrets_manager_changes"
LISTEN_RETRY_SECONDS = (0.5, 10.0)  # first and longest wait before a listener reconnects
SCAN_PAGE = 512  # rows per round trip when a snapshot scans
MAX_CONNECTIONS = 4  # per handle: calls of more threads than this at once wait for a connection
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_AT_ONCE_KEY, _AT_ONCE_NEWEST, _AT_ONCE_HEAD = 0, 1, 2  # the kinds of read_at_once's rows

# The server's refusals of a new connection when it has no slot left for it (SQLSTATE 53300; a
# refused connection carries the text alone).
_NO_CONNECTION_SLOTS = (
    "too many clients already",
    "remaining connection slots are reserved",
    "too many connections for role",
    "too many connections for database",
)
T = TypeVar("T")
IDLE = TransactionStatus.IDLE


class _Connection(psycopg.Connection[tuple[Any, ...]]):
    """A psycopg connection whose every wait for the server (each round trip: a statement, BEGIN,
    COMMIT, a fetch) is bounded by a client-side deadline (storage/deadline.py): past
    `answer_timeout` seconds, plus `lock_wait` while a statement may wait for a lock, its socket
    is shut down and the wait fails. `expired_after` then says how long it waited."""

    answer_timeout: float = ANSWER_TIMEOUT_S
    lock_wait: float = 0.0
    expired_after: float | None = None
    # A direct connection carries the writers' limits for its session (set once, at connect);
    # `idle_timeout_ms` is the session's own idle limit before we lowered it, which a snapshot
    # puts back for itself. None behind a pooler: there each write transaction sets its own.
    idle_timeout_ms: int | None = None

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        armed = WATCHDOG.arm(self, self.answer_timeout + self.lock_wait)
        try:
            return super().wait(gen, *args, **kwargs)
        finally:
            armed.disarm()
            if armed.expired:
                self.expired_after = armed.seconds

    @contextmanager
    def waiting_for_locks(self, seconds: float) -> Iterator[None]:
        """The statements run in this block may wait `seconds` for a lock, beside their answer."""
        self.lock_wait = seconds
        try:
            yield
        finally:
            self.lock_wait = 0.0


def _close_quietly(conn: _Connection) -> None:
    with contextlib.suppress(psycopg.Error):  # a broken connection: nothing left to release
        conn.close()


def valid_schema_name(name: str) -> bool:
    """Whether `name` is a schema name we accept: lower-case letters, digits, _ (no quoting needed)."""
    return _SCHEMA_NAME.fullmatch(name) is not None


class _EndedInSetUp(Exception):
    """A new connection the server ended during its set-up query: open another."""


class PostgresStorage:
    """`Storage` (and `Snapshotting`) on PostgreSQL. Thread-safe: each call borrows one of at most
    `max_connections` connections, so one thread's long scan does not hold up another's read (a
    service's ListSecrets and GetSecret); commits still go one at a time, at the counter row.

    `conninfo` is anything libpq accepts (`postgresql://user@host:port/dbname?sslmode=…` or
    `host=… dbname=…`); a password missing from it comes from libpq's own PGPASSWORD or
    PGPASSFILE (~/.pgpass). `create=True` makes the schema and tables if missing (idempotent, safe
    to race); otherwise a database without them is NotFoundError. A dropped connection is opened
    again on the next call; a read that finds it dropped is retried once, a commit only if it
    certainly did not reach the server's COMMIT. Connections are opened as calls need them (a CLI
    command uses one) and kept for reuse until `close`.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        create: bool = False,
        change_log_retained: int = CHANGE_LOG_RETAINED,
        max_connections: int = MAX_CONNECTIONS,
        answer_timeout: float | None = None,
    ) -> None:
        if answer_timeout is None:
            answer_timeout = _answer_timeout_from_environment()
        if not answer_timeout > 0:
            raise StorageError("answer_timeout must be a positive number of seconds")
        if not valid_schema_name(schema):
            raise StorageError(
                f"PostgreSQL schema name {schema!r} is not valid: use lower-case letters, digits and _"
            )
        if change_log_retained < 1:
            raise StorageError("change_log_retained must be at least 1")
        if max_connections < 1:
            raise StorageError("max_connections must be at least 1")
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error:
            # libpq's message quotes the string, which may hold a password: say what, not where.
            raise StorageError(
                "the PostgreSQL connection string is not valid (it is not shown: it may hold a password)"
            ) from None
        self._conninfo = conninfo
        self._creating = create  # for the advice when the database itself is missing
        self._secrets = [str(s) for s in (params.get("password"), os.environ.get("PGPASSWORD")) if s]
        self._role = str(params.get("user") or os.environ.get("PGUSER") or "") or None
        self._database = str(params.get("dbname") or os.environ.get("PGDATABASE") or "") or None
        self.location = describe(params, schema)
        self.schema = schema
        self._retained = change_log_retained
        self._prune_every = min(1024, change_log_retained)
        self._q = _Queries(schema)
        self._connect_options: dict[str, Any] = {"application_name": APPLICATION, "client_encoding": "utf8"}
        if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
            self._connect_options["connect_timeout"] = CONNECT_TIMEOUT_S
        self.max_connections = max_connections
        self.answer_timeout = answer_timeout
        self._slots = threading.BoundedSemaphore(max_connections)  # connections lent out at once
        self._idle_lock = threading.Lock()
        self._idle: list[_Connection] = []  # open, not lent out
        self._closed = False
        # Moves when a new connection finds another server than the last one did (its postmaster
        # started at another time: a restart, or a failover to a standby). Such a server may hold
        # less history than was read before (an asynchronous standby that lacked the last commits,
        # a restored backup) and reach the same revisions again with other content, so what a
        # reader keeps by revision (the encrypted store's read cache) is tagged with it too.
        self.incarnation = 0
        # Whether a connection found a pooler between us and the server (pgbouncer: _pooled).
        self.pooled = False
        self._server_started: object = None

        def set_up(conn: _Connection) -> None:
            if create:
                self._create_schema(conn)  # idempotent: made again on a new connection, it finds it
            self._check_schema(conn)

        try:
            # As any read: once more on a new connection if this one was ended under it (a failover,
            # pg_terminate_backend), rather than failing the command that opens the store.
            self._read(set_up)
        except BaseException:
            self.close()  # a database we refuse must not keep a connection open
            raise

    @property
    def history(self) -> str:
        """The line of history this store's revisions are on (ChangeHead): the server's start time
        as the last new connection found it, which every process on the same server reads alike and
        a failover, a restore or a restart moves."""
        return f"postgresql:{self._server_started}"

    # ---- connections -----------------------------------------------------------------------

    @contextmanager
    def _borrowed(self) -> Iterator[_Connection]:
        """One connection for this call alone: an idle one, or a new one while fewer than
        `max_connections` are lent out (else wait for one). Given back afterwards unless broken,
        mid-transaction or the handle closed meanwhile."""
        with self._slots:
            conn = self._idle_or_new()
            try:
                yield conn
            finally:
                self._give_back(conn)

    def _idle_or_new(self) -> _Connection:
        with self._idle_lock:
            if self._closed:
                raise StoreClosedError(f"store {self.location} is closed")
            while self._idle:
                conn = self._idle.pop()  # the most recently used: the likeliest to be alive
                if not conn.closed and not conn.broken:
                    return conn
                _close_quietly(conn)
        for attempt in (1, 2):
            try:
                return self._connect(again=attempt == 1)
            except psycopg.Error as exc:
                raise self._error(exc) from None
            except _EndedInSetUp:
                continue  # the server ended it (a failover, pg_terminate_backend): once more
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self, *, again: bool = False) -> _Connection:
        """A new connection, set up. `again`: _EndedInSetUp if the server ended it during the
        set-up query (not when it never answered), for the caller to open one more."""
        conn = self._open_connection()
        try:
            row = conn.execute(
                "SELECT current_setting('server_encoding'), pg_postmaster_start_time(), pg_backend_pid(), "
                "(SELECT setting::int FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout')"
            ).fetchone()
            encoding = None if row is None else row[:1]
            if encoding is None or str(encoding[0]).upper() not in ("UTF8", "UTF-8"):
                raise StorageError(
                    f"store {self.location}: the database's encoding is {encoding and encoding[0]}, "
                    "not UTF8; create the database with ENCODING 'UTF8'"
                )
            assert row is not None
            if _pooled(conn, row[2]):
                # No server-side prepared statements: psycopg prepares a query after its 5th run
                # on a connection, and behind a pooler in transaction mode (pgbouncer before 1.21)
                # the next transaction may run on another server connection, where it does not
                # exist ("prepared statement "_pg3_0" does not exist"), or where another client
                # prepared the same name for another statement.
                conn.prepare_threshold = None
                self.pooled = True
            else:
                _limit_session(conn, int(row[3]))
            self._found_server(row[1])
        except psycopg.OperationalError as exc:
            ended = conn.broken and conn.expired_after is None  # read before close clears it
            _close_quietly(conn)
            if again and ended:
                raise _EndedInSetUp() from None
            raise self._error(exc, conn) from None
        except psycopg.Error as exc:
            _close_quietly(conn)
            raise self._error(exc, conn) from None
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def _found_server(self, started: object) -> None:
        """A connection reports the server's start time: another than before moves `incarnation`.
        Asked by every new connection, and by the change-head and change-feed reads that readers'
        caches and watchers rely on: behind a pooler in transaction mode (pgbouncer) a connection
        outlives the server (the pooler opens new server connections after a restart or a
        failover), so a new connection alone would not tell."""
        with self._idle_lock:
            if self._server_started is not None and started != self._server_started:
                self.incarnation += 1
            self._server_started = started

    def _open_connection(self) -> _Connection:
        conn = _Connection.connect(self._conninfo, autocommit=True, **self._connect_options)
        conn.answer_timeout = self.answer_timeout
        return conn

    def _give_back(self, conn: _Connection) -> None:
        reusable = not conn.closed and not conn.broken and conn.info.transaction_status == IDLE
        with self._idle_lock:
            if reusable and not self._closed:
                self._idle.append(conn)
                return
        _close_quietly(conn)

    def _drop_idle(self) -> None:
        """A connection was found dropped: the idle ones most likely went with it (a server restart
        or failover ends them all), so the retry opens a new one instead of trying each."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)

    def _error(
        self,
        exc: psycopg.Error,
        conn: _Connection | None = None,
        *,
        lock_wait_ms: int = LOCK_TIMEOUT_MS,
        reached_commit: bool = False,
    ) -> StorageError | NotFoundError:
        """One line naming the store and what failed, with no password in it. `reached_commit`:
        the error came at or after COMMIT was sent; if it is not the server's answer (the
        connection ended, or its answer never came), the change may have been made. A database
        that does not exist is NotFoundError (exit 3), as a store file that does not exist is."""
        waited = conn.expired_after if conn is not None else None
        not_the_servers_answer = (
            waited is not None or exc.sqlstate is None or (conn is not None and conn.broken)
        )
        # Behind pgbouncer a session the server ended while COMMIT was on its way surfaces as
        # psycopg's "received 2 results from command 'COMMIT'" (not an OperationalError) on a
        # connection now broken: no answer to COMMIT either.
        lost_connection = isinstance(exc, psycopg.OperationalError) or (conn is not None and conn.broken)
        if reached_commit and lost_connection and not_the_servers_answer:
            lost = (
                f"no answer to COMMIT within {waited:g} s"
                if waited is not None
                else "the connection ended before the answer to COMMIT came"
            )
            return OutcomeUnknownError(
                f"store {self.location}: {lost}; the change may have been made: check (history) "
                "before writing again"
            )
        if waited is not None:
            return StorageError(
                f"store {self.location}: no answer from the server within {waited:g} s; is it up and "
                "reachable?"
            )
        missing = _missing_database(exc)
        if missing is not None:
            return NotFoundError(f"store {self.location}: {self._create_database_advice(missing)}")
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return StoreBusyError(
                f"store {self.location}: another writer held the store's lock for "
                f"{lock_wait_ms / 1000:.2g} s; try again"
            )
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            message = f"{_one_line(str(exc))}; {self._privileges_needed(str(exc))}"
        elif isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
            message = (
                f"{_one_line(str(exc))}; the server is read-only (a hot standby, or "
                "default_transaction_read_only): give the primary's address, or every host with "
                "?target_session_attrs=read-write (every command writes, reads their audit anchor)"
            )
        elif isinstance(exc, psycopg.errors.QueryCanceled) and "statement timeout" in str(exc):
            message = (
                f"{_one_line(str(exc))}; the statement_timeout set for the store's role or database "
                f"ended it: raise it above the store's own waits ({LOCK_TIMEOUT_MS // 1000} s for "
                "another writer's lock), e.g. ALTER ROLE … SET statement_timeout = '60s'"
            )
        elif any(text in str(exc) for text in _NO_CONNECTION_SLOTS):
            message = (
                f"{_one_line(str(exc))}; the server has no connection left for the store (its "
                "max_connections, or the role's or database's CONNECTION LIMIT): lower "
                "?max_connections= in the store URL of each replica (default 4 a process), put "
                "pgbouncer in front, or raise the limit"
            )
        elif "unsupported startup parameter" in str(exc):
            message = (
                f"{_one_line(str(exc))}; a connection pooler (pgbouncer) refused an option of the "
                "store URL: drop it from the URL, or list it in the pooler's ignore_startup_parameters"
            )
        elif "certificate verify failed" in str(exc):
            message = (
                f"{_one_line(str(exc))}; check that sslrootcert names the CA that signed the database "
                "server's certificate"
            )
        else:
            message = _one_line(str(exc)) or type(exc).__name__
            if any(refusal in message for refusal in PASSWORD_REFUSALS):
                # libpq's words alone ("fe_sendauth: no password supplied") said nothing of where
                # the password comes from (a URL holding it is refused in production).
                message += (
                    "; give the database password in PGPASSWORD or a passfile (PGPASSFILE, default "
                    "~/.pgpass), not in the URL"
                )
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return StorageError(f"store {self.location}: {message}")

    def _create_database_advice(self, database: str) -> str:
        """What to do about a database the server does not have: create it, or correct the URL.
        `init` cannot do it for you (it makes the store's schema and tables in a database)."""
        create = f"createdb {shell_quote(database)}"
        if self._creating:
            return (
                f'database "{database}" does not exist on the server, and init makes a store in a '
                f"database, not the database: create it first ('{create}', as a role allowed to "
                "create databases) and run init again, or correct the database name in the store URL"
            )
        return (
            f"database \"{database}\" does not exist on the server: create it ('{create}', as a "
            "role allowed to create databases) and make the store in it with init, or correct the "
            "database name in the store URL"
        )

    def _privileges_needed(self, refusal: str) -> str:
        """What the store's role lacks, by what the server refused (its message names the object,
        not the privilege), with the GRANT that gives it."""
        role = _quoted(self._role or "ROLE")
        schema = self.schema
        if "for database" in refusal:
            return (
                f"init needs CREATE on the database to make schema {schema}: GRANT CREATE ON DATABASE "
                f"{_quoted(self._database or 'DB')} TO {role}, or have its owner run CREATE SCHEMA "
                f"{schema} AUTHORIZATION {role}"
            )
        if "for schema" in refusal:
            return (
                f"the store's role needs USAGE on schema {schema} (and CREATE on it for init): "
                f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}"
            )
        return (
            "the store's role needs SELECT, INSERT, UPDATE and DELETE on the store's tables for every "
            "command (reads too: each writes its audit record's anchor to the store): GRANT SELECT, "
            f"INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}"
        )

    def _read(self, action: Callable[[_Connection], T]) -> T:
        """Run a read on a borrowed connection; retried once on a new one if it had dropped."""
        for attempt in (1, 2):
            with self._borrowed() as conn:
                try:
                    return action(conn)
                except psycopg.OperationalError as exc:
                    # Not when its answer never came: the server is not answering, not gone.
                    if not (attempt == 1 and conn.broken and conn.expired_after is None):
                        raise self._error(exc, conn) from None
                except psycopg.Error as exc:
                    raise self._error(exc, conn) from None
            self._drop_idle()
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- schema ----------------------------------------------------------------------------

    def _create_schema(self, conn: _Connection) -> None:
        """Create the schema and tables where missing, in one transaction under an advisory lock,
        so replicas starting together do not trip over each other's CREATE."""
        with conn.transaction(), conn.waiting_for_locks(LOCK_TIMEOUT_MS / 1000):
            _limit_transaction(conn, LOCK_TIMEOUT_MS)
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{APPLICATION}:{self.schema}",))
            exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            if conn.execute(self._q.table_exists, (self.schema,)).fetchone() is None:
                for statement in self._q.create:
                    conn.execute(statement)

    def _check_schema(self, conn: _Connection) -> None:
        """Refuse a database that holds no store, someone else's tables, or a newer schema.
        Opening writes nothing."""
        if conn.execute(self._q.table_exists, (self.schema,)).fetchone() is None:
            raise StoreNotFoundError(self.location, self.location)
        try:
            row = conn.execute(self._q.read_meta_header).fetchone()
        except psycopg.errors.UndefinedColumn:
            row = None
        if row is None or row[0] != APPLICATION:
            raise StorageError(f"{self.location} holds tables that are not a secrets-manager store")
        version = int(row[1])
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self.location} has storage schema {version}; upgrade secrets-manager to open it"
            )
        if version != SCHEMA_VERSION:
            raise StorageError(f"{self.location} is not a secrets-manager store (schema {version})")

    # ---- the Storage protocol --------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        row = self._read(lambda conn: conn.execute(self._q.get, (key,)).fetchone())
        return None if row is None else Entry(value=bytes(row[0]), revision=int(row[1]))

    def change_head(self) -> int:
        """`ChangeHead`: the newest change's revision (one index-only step back on the feed)."""
        row = self._read(lambda conn: conn.execute(self._q.change_head).fetchone())
        assert row is not None  # an aggregate: always one row
        self._found_server(row[1])
        return 0 if row[0] is None else int(row[0])

    def get_many(self, keys: Sequence[str]) -> dict[str, Entry]:
        """`MultiGet`: one statement, so one round trip and one instant, for all of `keys`."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        rows = self._read(lambda conn: conn.execute(self._q.get_many, (unique,)).fetchall())
        return {key: Entry(value=bytes(value), revision=int(revision)) for key, value, revision in rows}

    def read_at_once(self, keys: Sequence[str], *, newest_under: str | None = None) -> PointRead:
        """`ReadAtOnce`: one statement, so one round trip and one instant (READ COMMITTED gives
        each statement one snapshot), for the entries of `keys`, the newest entry under
        `newest_under` and the change head."""
        unique = list(dict.fromkeys(keys))
        prefix = newest_under or ""
        end = _prefix_end(prefix)
        limit = 0 if newest_under is None else 1
        params: tuple[object, ...]
        if end is None:  # a prefix above which no key can sort: no upper bound
            query, params = self._q.read_at_once_open, (unique, prefix, limit)
        else:  # both bounds given as values, so a generic plan still scans the prefix's range only
            query, params = self._q.read_at_once, (unique, prefix, end, limit)
        rows = self._read(lambda conn: conn.execute(query, params).fetchall())
        entries: dict[str, Entry] = {}
        newest: tuple[str, Entry] | None = None
        head = 0
        for kind, key, value, revision, started in rows:
            if kind == _AT_ONCE_HEAD:
                self._found_server(started)
                head = 0 if revision is None else int(revision)
                continue
            entry = Entry(value=bytes(value), revision=int(revision))
            if kind == _AT_ONCE_KEY:
                entries[key] = entry
            else:
                newest = (key, entry)
        return PointRead(entries=entries, newest=newest, head=head)

    def put(self, key: str, value: bytes, *, expect: Expect = None) -> int:
        return self.commit([Put(key, value, expect)])

    def delete(self, key: str, *, expect: Expect = None) -> int:
        return self.commit([Delete(key, expect)])

    def list(self, prefix: str) -> list[str]:
        rows = self._read(lambda conn: _list(conn, self._q, prefix))
        return [row[0] for row in rows]

    def commit(
        self,
        operations: Sequence[Operation],
        *,
        silent: bool = False,
        durable: bool = True,
        lock_wait: float | None = None,
    ) -> int:
        operations = list(operations)
        wait_ms = LOCK_TIMEOUT_MS if lock_wait is None else max(1, round(lock_wait * 1000))  # 0: no limit
        for attempt in (1, 2):
            with self._borrowed() as conn:
                reached_commit = False
                try:
                    with conn.transaction():
                        _limit_transaction(conn, wait_ms)
                        revision = self._apply(
                            conn, operations, wait_ms=wait_ms, silent=silent, durable=durable
                        )
                        reached_commit = True  # leaving the block sends COMMIT
                    return revision
                except psycopg.errors.IdleInTransactionSessionTimeout as exc:
                    # This process stalled mid-transaction past STALLED_TRANSACTION_TIMEOUT_MS: the
                    # server rolled it back and ended the session (even if COMMIT was sent after),
                    # so once more on a new connection is safe.
                    if attempt == 2:
                        raise self._error(exc, conn, lock_wait_ms=wait_ms) from None
                except psycopg.OperationalError as exc:
                    # Broken before COMMIT was sent: the server rolled the transaction back, so
                    # once more on a new connection is safe (unless its answers stopped coming:
                    # then the server is not answering). At or after COMMIT, it may have landed:
                    # OutcomeUnknownError.
                    retry = attempt == 1 and conn.broken and conn.expired_after is None
                    if reached_commit or not retry:
                        raise self._error(
                            exc, conn, lock_wait_ms=wait_ms, reached_commit=reached_commit
                        ) from None
                except psycopg.Error as exc:
                    raise self._error(
                        exc, conn, lock_wait_ms=wait_ms, reached_commit=reached_commit
                    ) from None
            self._drop_idle()
        raise AssertionError("unreachable")  # pragma: no cover

    def _apply(
        self,
        conn: _Connection,
        operations: Sequence[Operation],
        *,
        wait_ms: int,
        silent: bool,
        durable: bool,
    ) -> int:
        """Inside the commit's transaction: take the counter lock, check, write, log."""
        if not durable:
            conn.execute("SET LOCAL synchronous_commit = off")
        with conn.waiting_for_locks(wait_ms / 1000):  # for another writer's commit
            bumped = conn.execute(self._q.bump).fetchone()
        if bumped is None:
            raise StorageError(f"store {self.location}: its revision counter is missing")
        revision = int(bumped[0])
        # Preconditions see the storage as it was before this commit, as in SqliteStorage.
        expected = [(op.key, op.expect) for op in operations if op.expect is not None]
        if expected:
            keys = sorted({key for key, _ in expected})
            current = {k: int(r) for k, r in conn.execute(self._q.revisions_of, (keys,)).fetchall()}
            for key, expect in expected:
                _check_precondition(key, expect, current.get(key))
        final: dict[str, Operation] = {}
        for op in operations:  # applied in order, so the last operation on a key decides
            final[op.key] = op
        puts = [(key, op.value) for key, op in final.items() if isinstance(op, Put)]
        deletes = [key for key, op in final.items() if isinstance(op, Delete)]
        with conn.cursor() as cur:
            for batch in _batched(puts, lambda put: len(put[0]) + len(put[1])):
                cur.execute(self._q.upsert, (revision, [k for k, _ in batch], [v for _, v in batch]))
            for names in _batched(deletes, len):
                cur.execute(self._q.delete_many, (names,))
            if not silent and final:
                logged = [(key, isinstance(op, Delete)) for key, op in final.items()]
                for rows in _batched(logged, lambda row: len(row[0]) + 1):
                    cur.execute(self._q.log_change, (revision, [k for k, _ in rows], [d for _, d in rows]))
                cur.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, self.schema))
            if revision % self._prune_every == 0:  # bounded log; watchers that fall behind resync
                horizon = revision - self._retained
                if horizon > 0:
                    cur.execute(self._q.prune, (horizon,))
                    cur.execute(self._q.advance_log_start, (horizon, horizon))
        return revision

    def changes_since(self, revision: int, *, limit: int = 10_000) -> ChangeBatch:
        """Keys changed after `revision`, oldest first, and whether older changes were dropped.

        One statement, so one snapshot: the counter and the rows agree."""
        rows = self._read(lambda conn: conn.execute(self._q.changes, (revision, limit)).fetchall())
        self._found_server(rows[0][5])
        current, log_start = int(rows[0][0]), int(rows[0][1])
        changes = [
            Change(revision=int(r), key=k, deleted=bool(d)) for _, _, r, k, d, _ in rows if r is not None
        ]
        truncated = revision < log_start
        if len(changes) < limit:
            return ChangeBatch(changes=changes, revision=current, truncated=truncated)
        # A full page: end it on a whole commit, so the next call resumes without a gap.
        last = changes[-1].revision
        complete = [c for c in changes if c.revision < last]
        if complete:
            return ChangeBatch(changes=complete, revision=last - 1, truncated=truncated)
        return ChangeBatch(changes=changes, revision=last, truncated=True)

    @contextmanager
    def snapshot(self) -> Iterator[PostgresSnapshot]:
        """Reads that all see one instant (`Snapshotting`): a REPEATABLE READ, READ ONLY transaction.

        Its snapshot is taken at its first statement, the counter read, so `revision` and every
        read through the snapshot agree; other connections commit meanwhile, unseen. The snapshot
        keeps its borrowed connection until it ends; this handle's other calls use others.

        Its setup (BEGIN and the counter read) is retried once on a new connection if it finds
        the connection dropped, as `get` is; once the snapshot is handed out, nothing is retried
        (its reads must all see one instant)."""
        for attempt in (1, 2):
            with self._borrowed() as conn:
                started = False
                try:
                    with conn.transaction():
                        # A reader may pause between pages (a backup piped to a pager) and holds
                        # no lock a writer waits for: the session's own idle limit, not the
                        # writers' short one (_limit_session; behind a pooler it is never set).
                        begin = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                        if conn.idle_timeout_ms is None:
                            conn.execute(begin)
                        else:  # one round trip (no parameters: one query)
                            conn.execute(
                                sql.SQL(
                                    begin + "; SET LOCAL idle_in_transaction_session_timeout = {}"
                                ).format(sql.Literal(f"{conn.idle_timeout_ms}ms"))
                            )
                        row = conn.execute(self._q.read_revision).fetchone()
                        if row is None:
                            raise StorageError(f"store {self.location}: its revision counter is missing")
                        started = True
                        yield PostgresSnapshot(conn, self._q, int(row[0]), lambda exc: self._error(exc, conn))
                    return
                except psycopg.OperationalError as exc:
                    if started or not (attempt == 1 and conn.broken and conn.expired_after is None):
                        raise self._error(exc, conn) from None
                except psycopg.Error as exc:
                    raise self._error(exc, conn) from None
            self._drop_idle()
        raise AssertionError("unreachable")  # pragma: no cover

    def on_commits(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (on a listener thread) soon after a change to this store is committed by
        any handle, in this process or another: LISTEN on a connection of its own. Also once each
        time the listener (re)connects, for what it may have missed. Returns a function that stops
        it. Best effort: while the database is unreachable it retries with backoff, and the
        caller's own polling of the change feed covers the gap."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self._listen, args=(callback, stop), name="postgres-listen", daemon=True
        )
        thread.start()

        def stop_listening() -> None:
            stop.set()
            thread.join(timeout=5)

        return stop_listening

    def _listen(self, callback: Callable[[], None], stop: threading.Event) -> None:
        delay, longest = LISTEN_RETRY_SECONDS
        while not stop.is_set():
            try:
                with self._open_connection() as conn:
                    row = conn.execute("SELECT pg_backend_pid()").fetchone()
                    if row is not None and _pooled(conn, row[0]):
                        # Through a pooler's transaction mode a notification cannot reach us
                        # (we hold no server connection), and the LISTEN would stay on a pooled
                        # server connection whose notifications pgbouncer then gets while it is
                        # not linked to a client (a warning per commit; seen to wedge its pool).
                        log.info(
                            "change listener not started: the database is reached through a "
                            "connection pooler; changes made elsewhere are read at the next poll",
                            extra={"event": "store.listener_off", "store": self.location},
                        )
                        return
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                    delay = LISTEN_RETRY_SECONDS[0]
                    callback()
                    while not stop.is_set():
                        # Wakes at least twice a second to notice `stop`.
                        if any(n.payload == self.schema for n in conn.notifies(timeout=0.5)):
                            callback()
            except psycopg.Error as exc:
                log.info(
                    "change listener lost its connection; retrying",
                    extra={"event": "store.listener_reconnecting", "error": str(self._error(exc))},
                )
            stop.wait(delay)
            delay = min(delay * 2, longest)

    def close(self) -> None:
        """Close the idle connections now and each lent-out one when its call ends. Idempotent."""
        with self._idle_lock:
            self._closed = True
        self._drop_idle()

    def __repr__(self) -> str:
        return f"PostgresStorage({self.location!r})"


class PostgresSnapshot:
    """The `StorageSnapshot` of `PostgresStorage.snapshot`: reads inside its transaction."""

    def __init__(
        self,
        conn: _Connection,
        queries: _Queries,
        revision: int,
        error: Callable[[psycopg.Error], StorageError | NotFoundError],
    ) -> None:
        self._conn = conn
        self._q = queries
        self._error = error
        self.revision = revision

    def get(self, key: str) -> Entry | None:
        try:
            row = self._conn.execute(self._q.get, (key,)).fetchone()
        except psycopg.Error as exc:
            raise self._error(exc) from None
        return None if row is None else Entry(value=bytes(row[0]), revision=int(row[1]))

    def get_many(self, keys: Sequence[str]) -> dict[str, Entry]:
        """`MultiGet` inside the snapshot: one statement for all of `keys`, at its instant."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        try:
            rows = self._conn.execute(self._q.get_many, (unique,)).fetchall()
        except psycopg.Error as exc:
            raise self._error(exc) from None
        return {key: Entry(value=bytes(value), revision=int(revision)) for key, value, revision in rows}

    def list(self, prefix: str) -> list[str]:
        try:
            return [row[0] for row in _list(self._conn, self._q, prefix)]
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def scan(self, prefix: str) -> Iterator[tuple[str, Entry]]:
        """Every entry under `prefix` in key order, a page per round trip (keyset pagination: each
        page starts after the last key seen, so no cursor outlives a call)."""
        end = _prefix_end(prefix)
        after: str | None = None
        while True:
            try:
                rows = self._conn.execute(
                    self._q.scan_page, (prefix, end, end, after, after, SCAN_PAGE)
                ).fetchall()
            except psycopg.Error as exc:
                raise self._error(exc) from None
            for key, value, revision in rows:
                yield key, Entry(value=bytes(value), revision=int(revision))
            if len(rows) < SCAN_PAGE:
                return
            after = rows[-1][0]


class _Queries:
    """Every statement, with the store's schema name quoted once."""

    def __init__(self, schema: str) -> None:
        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(s=sql.Identifier(schema))

        self.create = [
            q(
                "CREATE TABLE {s}.meta ("
                " id integer PRIMARY KEY CHECK (id = 1),"
                " application text NOT NULL,"
                " schema_version integer NOT NULL,"
                " revision bigint NOT NULL,"
                " log_start bigint NOT NULL)"
            ),
            sql.SQL("INSERT INTO {s}.meta VALUES (1, {app}, {version}, 0, 0)").format(
                s=sql.Identifier(schema), app=sql.Literal(APPLICATION), version=sql.Literal(SCHEMA_VERSION)
            ),
            q(
                'CREATE TABLE {s}.entries (key text COLLATE "C" PRIMARY KEY,'
                " value bytea NOT NULL, revision bigint NOT NULL)"
            ),
            q(
                'CREATE TABLE {s}.changes (revision bigint NOT NULL, key text COLLATE "C" NOT NULL,'
                " deleted boolean NOT NULL, PRIMARY KEY (revision, key))"
            ),
        ]
        self.table_exists = sql.SQL("SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'meta'")
        self.read_meta_header = q("SELECT application, schema_version FROM {s}.meta WHERE id = 1")
        self.read_revision = q("SELECT revision FROM {s}.meta WHERE id = 1")
        self.get_many = q("SELECT key, value, revision FROM {s}.entries WHERE key = ANY(%s)")
        self.bump = q("UPDATE {s}.meta SET revision = revision + 1 WHERE id = 1 RETURNING revision")
        self.get = q("SELECT value, revision FROM {s}.entries WHERE key = %s")
        self.revisions_of = q("SELECT key, revision FROM {s}.entries WHERE key = ANY(%s)")
        # Every row of a commit in one statement (arrays, not executemany): one round trip, and
        # no pipeline, whose server side waits for its Sync outside idle_in_transaction_session_
        # timeout's reach (a client that went silent mid-pipeline would hold the lock for good).
        self.upsert = q(
            "INSERT INTO {s}.entries (key, value, revision) SELECT key, value, %s"
            " FROM unnest(%s::text[], %s::bytea[]) AS rows (key, value) ON CONFLICT (key)"
            " DO UPDATE SET value = excluded.value, revision = excluded.revision"
        )
        self.delete_many = q("DELETE FROM {s}.entries WHERE key = ANY(%s)")
        self.log_change = q(
            "INSERT INTO {s}.changes (revision, key, deleted) SELECT %s, key, deleted"
            " FROM unnest(%s::text[], %s::boolean[]) AS rows (key, deleted)"
        )
        self.change_head = q("SELECT max(revision), pg_postmaster_start_time() FROM {s}.changes")
        # read_at_once: the keys' rows, the newest row under a prefix (LIMIT 0: none asked for) and
        # the change head with the server's start time, told apart by the first column (_AT_ONCE_*).
        at_once = (
            "SELECT 0, key, value, revision, NULL::timestamptz FROM {s}.entries WHERE key = ANY(%s)"
            " UNION ALL (SELECT 1, key, value, revision, NULL FROM {s}.entries WHERE key >= %s{below}"
            " ORDER BY revision DESC, length(key) DESC, key DESC LIMIT %s)"
            " UNION ALL SELECT 2, NULL, NULL, max(revision), pg_postmaster_start_time() FROM {s}.changes"
        )
        self.read_at_once = sql.SQL(at_once).format(s=sql.Identifier(schema), below=sql.SQL(" AND key < %s"))
        self.read_at_once_open = sql.SQL(at_once).format(s=sql.Identifier(schema), below=sql.SQL(""))
        # Never the newest entry: that is the change head that readers' caches compare.
        self.prune = q(
            "DELETE FROM {s}.changes WHERE revision <= %s "
            "AND revision < (SELECT max(revision) FROM {s}.changes)"
        )
        # Up to the horizon, but not past the newest change, which the prune keeps (as SQLite's
        # oldest-row rule: a watcher just before it has lost nothing).
        self.advance_log_start = q(
            "UPDATE {s}.meta SET log_start = greatest(log_start, "
            "least(%s, (SELECT coalesce(max(revision), %s + 1) FROM {s}.changes) - 1)) WHERE id = 1"
        )
        # Range scans, not LIKE, so '%' and '_' in a prefix are literal; NULL end = no upper bound.
        self.list_range = q(
            "SELECT key FROM {s}.entries WHERE key >= %s AND (%s::text IS NULL OR key < %s) ORDER BY key"
        )
        self.scan_page = q(
            "SELECT key, value, revision FROM {s}.entries"
            " WHERE key >= %s AND (%s::text IS NULL OR key < %s) AND (%s::text IS NULL OR key > %s)"
            " ORDER BY key LIMIT %s"
        )
        self.changes = q(
            "SELECT m.revision, m.log_start, c.revision, c.key, c.deleted, pg_postmaster_start_time()"
            " FROM {s}.meta m"
            " LEFT JOIN LATERAL (SELECT revision, key, deleted FROM {s}.changes WHERE revision > %s"
            " ORDER BY revision, key LIMIT %s) c ON true WHERE m.id = 1 ORDER BY c.revision, c.key"
        )


def _pooled(conn: _Connection, server_pid: object) -> bool:
    """Whether a pooler (pgbouncer, …) stands between this connection and the server: the backend
    process id the connection was given at its start (BackendKeyData) is not the server's
    `pg_backend_pid()`. A pooler makes up its own, for it answers cancel requests itself; a direct
    connection, or one through a plain TCP proxy, is given the server's. Behind a pooler nothing
    may rely on a server session lasting from one transaction to the next (transaction pooling),
    as the mode cannot be told from here."""
    return server_pid != conn.info.backend_pid


def _limit_session(conn: _Connection, idle_timeout_ms: int) -> None:
    """A direct connection's limits for the writers, set once for its session: the lock wait, and
    the idle limit that ends a transaction whose client goes silent (STALLED_TRANSACTION_TIMEOUT_MS,
    unless the role, the database or the URL set a shorter one). Per transaction instead, each
    write paid one more statement (a read of pg_settings): about a fifth of put's throughput in
    bench/postgres.py."""
    settings = [sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{LOCK_TIMEOUT_MS}ms"))]
    if idle_timeout_ms == 0 or idle_timeout_ms > STALLED_TRANSACTION_TIMEOUT_MS:
        settings.append(
            sql.SQL("SET idle_in_transaction_session_timeout = {}").format(
                sql.Literal(f"{STALLED_TRANSACTION_TIMEOUT_MS}ms")
            )
        )
    conn.execute(sql.SQL("; ").join(settings))  # one round trip (no parameters: one query)
    conn.idle_timeout_ms = idle_timeout_ms


def _limit_transaction(conn: _Connection, lock_wait_ms: int) -> None:
    """The first statement of a write transaction: on a direct connection, a lock wait other than
    the session's (_limit_session) for this transaction only. Behind a pooler, where no session
    setting may be made (in transaction mode (pgbouncer) the next transaction may run on another
    server connection, and a session setting would stay on this one for whoever gets it next), its
    lock wait and idle limit, for this transaction only (`set_config(…, true)`, as SET LOCAL)."""
    if conn.idle_timeout_ms is not None:
        if lock_wait_ms != LOCK_TIMEOUT_MS:
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{lock_wait_ms}ms")))
        return
    conn.execute(
        sql.SQL(
            "SELECT set_config('lock_timeout', {lock}, true), "
            "set_config('idle_in_transaction_session_timeout', CASE WHEN setting::int BETWEEN 1 AND {idle}"
            " THEN setting ELSE {idle_text} END, true) "
            "FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'"
        ).format(
            lock=sql.Literal(f"{lock_wait_ms}ms"),
            idle=sql.Literal(STALLED_TRANSACTION_TIMEOUT_MS),
            idle_text=sql.Literal(str(STALLED_TRANSACTION_TIMEOUT_MS)),
        )
    )


def _list(conn: _Connection, queries: _Queries, prefix: str) -> list[tuple[Any, ...]]:
    end = _prefix_end(prefix)
    return conn.execute(queries.list_range, (prefix, end, end)).fetchall()


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix`, or None if there is none.

    COLLATE "C" on a UTF8 database compares UTF-8 bytes, which is code-point order, so this is
    `prefix` with its last character incremented (dropping trailing U+10FFFF, skipping the
    surrogates) — the same bound as SqliteStorage's."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            following = 0xE000 if 0xD800 <= last + 1 <= 0xDFFF else last + 1
            return "".join(chars) + chr(following)
    return None


def _batched(items: Sequence[T], size: Callable[[T], int]) -> Iterator[list[T]]:
    """`items` in order, in lists of at most STATEMENT_BYTES by `size` (one item at least)."""
    batch: list[T] = []
    total = 0
    for item in items:
        if batch and total + size(item) > STATEMENT_BYTES:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size(item)
    if batch:
        yield batch


def _check_precondition(key: str, expect: Expect, revision: int | None) -> None:
    if expect is ABSENT:
        if revision is not None:
            raise ConflictError(f"storage key {key!r} already exists")
    elif revision is None or revision != expect:
        raise ConflictError(f"storage key {key!r} changed concurrently")


def _missing_database(exc: psycopg.Error) -> str | None:
    """The database named by the server's refusal of a connection to a database it does not have
    (or a 3D000 answer), else None."""
    found = _NO_SUCH_DATABASE.search(str(exc))
    if found is None:
        return None
    if exc.sqlstate is None or exc.sqlstate == "3D000":  # a connection's refusal has none
        return found.group(1)
    return None


def describe(params: dict[str, Any], schema: str = DEFAULT_SCHEMA) -> str:
    """`postgresql://user@host:port/dbname[?schema=…]` from libpq parameters: never the password."""
    user = params.get("user")
    hosts = str(params.get("host") or "").split(",")
    ports = str(params.get("port") or "").split(",")
    if len(ports) == 1 and len(hosts) > 1:
        ports = ports * len(hosts)
    netloc = ",".join(
        (f"[{h}]" if ":" in h else h) + (f":{p}" if p else "")
        for h, p in zip(hosts, ports + [""] * (len(hosts) - len(ports)), strict=False)
    )
    if netloc.startswith("/"):  # a Unix-socket directory
        netloc = ""
    userinfo = f"{user}@" if user else ""
    query = "" if schema == DEFAULT_SCHEMA else f"?schema={schema}"
    return f"postgresql://{userinfo}{netloc}/{params.get('dbname') or ''}{query}"


def _answer_timeout_from_environment() -> float:
    text = os.environ.get(ANSWER_TIMEOUT_VARIABLE, "").strip()
    if not text:
        return ANSWER_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise InvalidInputError(
            f"{ANSWER_TIMEOUT_VARIABLE} must be a positive number of seconds (e.g. 30), not {text[:40]!r}"
        )
    return seconds


def _quoted(identifier: str) -> str:
    """`identifier` as it is typed in SQL: bare when it may be, else double-quoted."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", identifier):
        return identifier
    return '"' + identifier.replace('"', '""') + '"'


def _one_line(message: str) -> str:
    return " ".join(message.split())
