"""A PostgreSQL role's password as a rotation target: `rotate NAME --postgres-role ROLE`.

    set   connect as an administrator (the connection string of `--postgres`, with libpq's own
          sources for its credentials: ~/.pgpass, PGPASSFILE, PGPASSWORD, a client certificate)
          and `ALTER ROLE ROLE PASSWORD '<SCRAM-SHA-256 verifier>'`
    test  connect to the same server and database as ROLE with the new password

Only the verifier reaches the server (libpq's PQencryptPasswordConn, as psql's `\\password`), so
the password is in none of its logs, even with `log_statement = 'all'`. Setting the same password
again is harmless, so a resumed rotation simply sets it again. This is AWS's "single user"
strategy (one role, its password changed in place), made by an administrator rather than by the
role with its current password: the role's open sessions keep working, new ones need the new one.

The value is the password itself, or, for a JSON object (as AWS keeps database credentials:
{"username": ..., "password": ..., "host": ...}), its "password" field.

psycopg is imported only when a rotation uses this target: the CLI starts without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from secrets_manager.environment import Environment, current_environment, guard_postgres_tls
from secrets_manager.errors import InvalidInputError
from secrets_manager.storage.deadline import WATCHDOG, Armed
from secrets_manager.values import SecretValue, read_json_object

PASSWORD_FIELD = "password"  # noqa: S105 (a field's name, AWS's) the JSON object field with the password
USERNAME_FIELD = "username"  # AWS's: the role a JSON object value's password belongs to
MAX_ROLE_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL cuts longer names, and would alter another role
MIN_CONNECT_TIMEOUT = 2  # libpq treats 1 as 2 and 0 as "wait for ever"
# A session is shut down this long after the step's timeout if the server has not answered: time
# for its own statement_timeout error, which says more, to arrive first.
ANSWER_GRACE_SECONDS = 2.0
# The check before the stage does not wait long for a role another transaction is changing.
PROBE_LOCK_WAIT_MS = 200
LOCK_NOT_AVAILABLE, QUERY_CANCELED = "55P03", "57014"  # SQLSTATEs
APPLICATION_NAME = "secrets-manager-rotate"  # how our sessions show in pg_stat_activity
TARGET_PREFIX = "postgres-role:"  # a version staged for a role records "postgres-role:ROLE"


class PostgresStepError(Exception):
    """A step failed at the server (cannot connect, log in, or alter the role), or the check before
    the stage found the rotation cannot work. Its message is one line, libpq's or the server's words
    included, never the password. `missing`: the role does not exist."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class PostgresRole:
    """The role whose password a rotation sets, and how to reach its server as an administrator.

    `conninfo`: a libpq connection string or URL without a password ("" for libpq's defaults,
    PGHOST, PGUSER, PGDATABASE, ...); its user must be allowed to alter the role (CREATEROLE, or
    a superuser). The test step connects with the same settings as `role`."""

    role: str
    conninfo: str = ""

    @classmethod
    def parse(cls, role: str, conninfo: str = "", *, where: str = "--postgres") -> PostgresRole:
        """Check the role's name and the connection string before any store is touched: a password
        in the string is refused (it would sit in a process's arguments or a schedule file), and
        libpq's complaint about a string it cannot read is not repeated (it quotes the text, which
        may hold one)."""
        if not role or "\x00" in role:
            raise InvalidInputError("the PostgreSQL role must be a role's name")
        try:
            encoded = role.encode("utf-8")
        except UnicodeEncodeError:  # a byte of argv that is not UTF-8 (a Latin-1 terminal)
            raise InvalidInputError(
                "the PostgreSQL role name is not UTF-8 text (typed on a Latin-1 terminal?); give it as UTF-8"
            ) from None
        if len(encoded) > MAX_ROLE_BYTES:
            raise InvalidInputError(
                f"the PostgreSQL role name is longer than {MAX_ROLE_BYTES} bytes: PostgreSQL would cut it "
                "and change another role's password"
            )
        from psycopg import conninfo as libpq_conninfo  # only where a rotation uses PostgreSQL

        try:
            params = libpq_conninfo.conninfo_to_dict(conninfo)
        except Exception:  # psycopg.ProgrammingError: libpq could not parse it
            raise InvalidInputError(
                f"{where} is not a connection string libpq can read: give key=value pairs (host=db.internal "
                "dbname=trading user=admin) or a postgresql://user@host/dbname URL"
            ) from None
        if "password" in params:
            raise InvalidInputError(
                f"{where} must not hold a password (it would be in the process list or a file others "
                "read): give the administrator's in ~/.pgpass, PGPASSFILE or PGPASSWORD"
            )
        return cls(role, conninfo)

    def guard_tls(self, environment: Environment, what: str) -> None:
        """Production refuses this rotator's connection if it would reach a server on another host
        without sslmode=verify-full (environment.guard_postgres_tls): asked when a schedule is
        loaded, so a serve or `schedule check` refuses it at once rather than at the rotation."""
        _guard_tls(self.conninfo, environment, what)

    @property
    def target(self) -> str:
        """What a value staged for this role is for, as the store records it with the version
        (`stage`'s target): the role's name, never the connection string (which names the server
        in any of libpq's forms, or not at all, so a resume through another is the same target)."""
        return TARGET_PREFIX + self.role

    @staticmethod
    def role_of_target(target: str | None) -> str | None:
        """The role a recorded `target` names; None if it names none (or no target was recorded)."""
        if target is None or not target.startswith(TARGET_PREFIX) or target == TARGET_PREFIX:
            return None
        return target[len(TARGET_PREFIX) :]

    @property
    def options(self) -> tuple[str, ...]:
        """The `rotate` options that name this target, for a command a failure suggests."""
        return ("--postgres-role", self.role, *(("--postgres", self.conninfo) if self.conninfo else ()))

    def password_of(self, value: SecretValue) -> str:
        """The password in `value`: the value, or a JSON object's "password" text field (read as
        rotation.py reads JSON: a byte-order mark, UTF-16 or UTF-32 included). InvalidInputError
        if it cannot be a PostgreSQL password (not UTF-8 text, a NUL, empty), is a JSON object
        that cannot be read (its whole text must not become the password), or is one whose
        "username" (AWS's format) is not this role: the value belongs to another role."""
        data = value.reveal()
        document, is_object = read_json_object(data)
        if is_object:
            if document is None:
                raise InvalidInputError(
                    "the value is a JSON object that cannot be read (nested too deep): give one whose "
                    f'"{PASSWORD_FIELD}" field holds the password'
                )
            username = document.get(USERNAME_FIELD)
            if username is not None and username != self.role:
                # Its text is part of the value: not quoted. A --resume naming another role than
                # the rotation that staged the value would otherwise set that role's password.
                raise InvalidInputError(
                    f'the value\'s "{USERNAME_FIELD}" field names another role than {self.role!r}: rotate '
                    "it with --postgres-role set to the role the value belongs to"
                )
            field = document.get(PASSWORD_FIELD)
            if not isinstance(field, str):
                raise InvalidInputError(
                    f'the value is a JSON object without a text field "{PASSWORD_FIELD}": rotating a '
                    f"PostgreSQL role sets that field ({PASSWORD_FIELD!r}, as AWS keeps database credentials)"
                )
            text = field
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInputError("a PostgreSQL password must be UTF-8 text") from None
        if not text or "\x00" in text:
            raise InvalidInputError("a PostgreSQL password must be non-empty text without NUL characters")
        try:  # a JSON "\ud800" is a lone surrogate: str, but no UTF-8 text; libpq takes bytes
            text.encode("utf-8")
        except UnicodeEncodeError:  # not raised on: it carries the whole password (`.object`)
            pass
        else:
            return text
        raise InvalidInputError(
            f'a PostgreSQL password must be UTF-8 text: the "{PASSWORD_FIELD}" field holds a lone '
            "surrogate (an unpaired \\uD800-\\uDFFF escape)"
        )

    def check_before_stage(self, *, timeout: float) -> None:
        """What would make the rotation fail after its value is staged, asked first, so it leaves
        nothing pending: the administrator cannot connect; the role does not exist (`missing`),
        cannot log in, or may not connect to the database the test step uses; the administrator may
        not change its password (a superuser or reserved role, no CREATEROLE, a read-only server):
        an ALTER ROLE in a transaction that is always rolled back asks the server itself."""
        import psycopg
        from psycopg import sql

        with _session(
            self.conninfo, timeout, None, doing="connect to PostgreSQL as its administrator"
        ) as admin:
            row = admin.execute(
                "SELECT r.rolcanlogin, has_database_privilege(r.oid, current_database(), 'CONNECT'), "
                "current_database(), current_user FROM pg_roles r WHERE r.rolname = %s",
                (self.role,),
            ).fetchone()
            if row is None:
                raise PostgresStepError(
                    f"PostgreSQL role {self.role!r} does not exist on that server", missing=True
                )
            can_log_in, may_connect, database, administrator = row
            if not can_log_in:
                raise PostgresStepError(
                    f"PostgreSQL role {self.role!r} cannot log in (NOLOGIN), so the test step would fail: "
                    f"ALTER ROLE it LOGIN first"
                )
            if not may_connect:
                raise PostgresStepError(
                    f"PostgreSQL role {self.role!r} may not connect to database {database!r}, where the test "
                    "step logs in: name one it may connect to (dbname=) in the connection string"
                )
            probe = (
                "/* secrets-manager: may it change the password? rolled back */ ALTER ROLE {} PASSWORD NULL"
            )
            try:
                with admin.transaction(force_rollback=True):
                    admin.execute(f"SET LOCAL lock_timeout = '{PROBE_LOCK_WAIT_MS}ms'")
                    admin.execute(sql.SQL(probe).format(sql.Identifier(self.role)))
            except psycopg.Error as exc:
                if exc.sqlstate is None:  # not the server's answer (the connection failed): as any
                    raise
                if exc.sqlstate in (LOCK_NOT_AVAILABLE, QUERY_CANCELED):
                    return  # another transaction is changing the role: the set step waits its turn
                raise PostgresStepError(
                    f"{administrator!r} may not change the password of PostgreSQL role {self.role!r} "
                    f"({_one_line(exc)})"
                ) from None

    def set_password(self, value: SecretValue, *, timeout: float) -> None:
        """ALTER ROLE as the administrator, sending only the SCRAM-SHA-256 verifier."""
        from psycopg import sql

        password = self.password_of(value)
        with _session(self.conninfo, timeout, password) as admin:
            verifier = admin.pgconn.encrypt_password(
                password.encode("utf-8"), self.role.encode("utf-8"), b"scram-sha-256"
            )
            with admin.transaction():  # the statement_timeout for this ALTER ROLE alone
                admin.execute(_STATEMENT_TIMEOUT, (_milliseconds(timeout),))
                admin.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(self.role), sql.Literal(verifier.decode("ascii"))
                    )
                )

    def check_login(self, value: SecretValue, *, timeout: float) -> None:
        """Log in as the role with the new password, and see that the server says it is the role."""
        password = self.password_of(value)
        with _session(self.conninfo, timeout, password, user=self.role, password=password) as conn:
            row = conn.execute("SELECT current_user").fetchone()
        if row is None or row[0] != self.role:
            raise PostgresStepError(f"logged in, but as {row[0] if row else 'nobody'!r}, not {self.role!r}")


def _guard_tls(conninfo: str, environment: Environment, what: str) -> None:
    from psycopg.conninfo import conninfo_to_dict  # only where a rotation uses PostgreSQL

    params = {key: str(value) for key, value in conninfo_to_dict(conninfo).items() if value is not None}
    guard_postgres_tls(environment, what, params, os.environ)


@contextmanager
def _session(
    conninfo: str, timeout: float, secret: str | None, *, doing: str | None = None, **overrides: Any
) -> Iterator[Any]:
    """A connection of libpq's settings plus `overrides` (an explicit password beats PGPASSWORD and
    ~/.pgpass), in autocommit, bounded by the step's timeout: libpq's connect_timeout (per host it
    tries), the server's statement_timeout (a lock wait: set by `set_password` for its ALTER ROLE's
    transaction alone), and our own deadline for a server or
    network that stops answering (storage/deadline.py: the socket is shut down, which ends libpq's
    wait). psycopg's errors become PostgresStepError, on one line, without `secret`; `doing`
    prefixes them."""
    import psycopg

    _guard_tls(conninfo, current_environment(), "the rotation's PostgreSQL connection")

    def failure(exc: BaseException, armed: Armed | None) -> PostgresStepError:
        if armed is not None and armed.expired:
            message = f"no answer from the server within {timeout + ANSWER_GRACE_SECONDS:g} s"
        else:
            # replaced before it is put on one line, which makes runs of whitespace one space:
            # a password with two spaces or a line end in it would no longer be found
            text = str(exc) if secret is None else str(exc).replace(secret, "<password>")
            message = " ".join(text.split()) or type(exc).__name__
        return PostgresStepError(message if doing is None else f"cannot {doing} ({message})")

    try:
        conn = psycopg.connect(
            conninfo,
            autocommit=True,
            connect_timeout=max(MIN_CONNECT_TIMEOUT, math.ceil(timeout)),
            application_name=APPLICATION_NAME,
            **overrides,
        )
    except psycopg.Error as exc:
        refused = failure(exc, None)
        if "password" not in overrides and _pgpassword_refused(str(refused)):
            raise PostgresStepError(f"{refused}; {PGPASSWORD_HINT}") from None
        raise refused from None
    seconds = timeout + ANSWER_GRACE_SECONDS  # statement_timeout's answer, clearer, comes first
    armed: Armed | None = None
    try:
        with conn:
            armed = WATCHDOG.arm(conn, seconds)
            yield conn
    except psycopg.Error as exc:
        raise failure(exc, armed) from None
    finally:
        if armed is not None:
            armed.disarm()


# libpq sends PGPASSWORD before it looks at a passfile: on a service or host whose PostgreSQL store
# takes its password from PGPASSWORD (as the README's store example does), the administrator's
# connection was sent the store role's password and refused, with nothing that pointed at why.
PGPASSWORD_HINT = (
    "PGPASSWORD is set in this environment, and libpq sends it before it reads ~/.pgpass or "
    "PGPASSFILE: if it holds another role's password (a PostgreSQL store's), unset it and put both "
    "passwords in a passfile (PGPASSFILE, one line per role)"
)


def _pgpassword_refused(message: str) -> bool:
    """Whether a connection without a password of ours was refused its password while PGPASSWORD,
    which libpq then sent, is set."""
    return bool(os.environ.get("PGPASSWORD")) and "password authentication failed" in message


# ALTER ROLE waits for a lock another transaction holds on the role: not past the step's timeout.
# Set for that statement's transaction only (SET LOCAL): a session setting would stay, behind a
# pooler in transaction mode (pgbouncer), on a server connection the administrator's next client
# gets, and might miss the one the ALTER ROLE runs on.
_STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', %s, true)"


def _milliseconds(timeout: float) -> str:
    """`timeout` as a statement_timeout: at least 1 ms (0 would mean no limit)."""
    return f"{max(1, math.ceil(timeout * 1000))}ms"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
