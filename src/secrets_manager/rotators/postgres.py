"""A PostgreSQL role's password as a rotation target: `rotate NAME --postgres-role ROLE`.

    set   connect as an administrator (the connection string of `--postgres`, with libpq's own
          sources for its credentials: ~/.pgpass, PGPASSFILE, PGPASSWORD, a client certificate)
          and `ALTER ROLE ROLE PASSWORD '<SCRAM-SHA-256 verifier>'`
    test  connect to the same server and database as ROLE with the new password

Only the verifier reaches the server (libpq's PQencryptPasswordConn, as psql's `\\password`), so
the password is in none of its logs, even with `log_statement = 'all'`. Setting the same password
again is harmless, so a resumed rotation simply sets it again. This is AWS's "alternating users"
strategy with one user: an administrator changes the role's password; the role's open sessions
keep working, new ones need the new password.

The value is the password itself, or, for a JSON object (as AWS keeps database credentials:
{"username": ..., "password": ..., "host": ...}), its "password" field.

psycopg is imported only when a rotation uses this target: the CLI starts without it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from secrets_manager.errors import InvalidInputError
from secrets_manager.values import SecretValue

PASSWORD_FIELD = "password"  # noqa: S105 (a field's name) the field of a JSON object value that holds the password (AWS's name)
MAX_ROLE_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL cuts longer names, and would alter another role
MIN_CONNECT_TIMEOUT = 2  # libpq treats 1 as 2 and 0 as "wait for ever"


class PostgresStepError(Exception):
    """A set or test step failed at the server (cannot connect, log in, or alter the role). Its
    message is libpq's or the server's, on one line, with the password removed if it was there."""


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
        in the string is refused (it would sit in a process's arguments or a schedule file)."""
        if not role or "\x00" in role:
            raise InvalidInputError("the PostgreSQL role must be a role's name")
        if len(role.encode("utf-8")) > MAX_ROLE_BYTES:
            raise InvalidInputError(
                f"the PostgreSQL role name is longer than {MAX_ROLE_BYTES} bytes: PostgreSQL would cut it "
                "and change another role's password"
            )
        refusal = (
            f"{where} must not hold a password (it would be in the process list or a file others "
            "read): give the administrator's in ~/.pgpass, PGPASSFILE or PGPASSWORD"
        )
        if _may_hold_a_password(conninfo):  # before libpq parses it: its errors quote the text
            raise InvalidInputError(refusal)
        from psycopg import conninfo as libpq_conninfo  # only where a rotation uses PostgreSQL

        try:
            params = libpq_conninfo.conninfo_to_dict(conninfo)
        except Exception as exc:  # psycopg.ProgrammingError: libpq could not parse it
            raise InvalidInputError(
                f"{where}: not a PostgreSQL connection string ({_one_line(exc)})"
            ) from None
        if "password" in params:
            raise InvalidInputError(refusal)
        return cls(role, conninfo)

    @property
    def options(self) -> tuple[str, ...]:
        """The `rotate` options that name this target, for a command a failure suggests."""
        return ("--postgres-role", self.role, *(("--postgres", self.conninfo) if self.conninfo else ()))

    def password_of(self, value: SecretValue) -> str:
        """The password in `value`: the value, or a JSON object's "password" text field.
        InvalidInputError if it cannot be a PostgreSQL password (not UTF-8 text, a NUL, empty)."""
        data = value.reveal()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError("a PostgreSQL password must be UTF-8 text") from None
        document = _json_object(text)
        if document is not None:
            field = document.get(PASSWORD_FIELD)
            if not isinstance(field, str):
                raise InvalidInputError(
                    f'the value is a JSON object without a text field "{PASSWORD_FIELD}": rotating a '
                    f"PostgreSQL role sets that field ({PASSWORD_FIELD!r}, as AWS keeps database credentials)"
                )
            text = field
        if not text or "\x00" in text:
            raise InvalidInputError("a PostgreSQL password must be non-empty text without NUL characters")
        return text

    def role_exists(self, *, timeout: float) -> bool:
        """Whether the administrator can connect (PostgresStepError if not) and the role exists:
        asked before a value is staged, so a mistyped role or administrator password leaves
        nothing pending."""
        with _step_errors(None), _connect(self.conninfo, timeout) as admin:
            row = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.role,)).fetchone()
        return row is not None

    def set_password(self, value: SecretValue, *, timeout: float) -> None:
        """ALTER ROLE as the administrator, sending only the SCRAM-SHA-256 verifier."""
        from psycopg import sql

        password = self.password_of(value)
        with _step_errors(password), _connect(self.conninfo, timeout) as admin:
            verifier = admin.pgconn.encrypt_password(
                password.encode("utf-8"), self.role.encode("utf-8"), b"scram-sha-256"
            )
            admin.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(self.role), sql.Literal(verifier.decode("ascii"))
                )
            )

    def check_login(self, value: SecretValue, *, timeout: float) -> None:
        """Log in as the role with the new password, and see that the server says it is the role."""
        password = self.password_of(value)
        with (
            _step_errors(password),
            _connect(self.conninfo, timeout, user=self.role, password=password) as conn,
        ):
            row = conn.execute("SELECT current_user").fetchone()
        if row is None or row[0] != self.role:
            raise PostgresStepError(f"logged in, but as {row[0] if row else 'nobody'!r}, not {self.role!r}")


def _connect(conninfo: str, timeout: float, **overrides: Any) -> Any:
    """A connection of libpq's settings plus `overrides` (an explicit password beats PGPASSWORD and
    ~/.pgpass), in autocommit, with connect and statement time limits from the step's timeout."""
    import psycopg

    seconds = max(MIN_CONNECT_TIMEOUT, math.ceil(timeout))
    conn = psycopg.connect(
        conninfo,
        autocommit=True,
        connect_timeout=seconds,
        application_name="secrets-manager-rotate",
        **overrides,
    )
    try:
        # ALTER ROLE waits for a lock another transaction holds on the role: not past the timeout.
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{int(timeout * 1000)}ms",))
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def _step_errors(password: str | None) -> Iterator[None]:
    """psycopg's errors as PostgresStepError, on one line and without the password."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        message = _one_line(exc)
        raise PostgresStepError(
            message if password is None else message.replace(password, "<password>")
        ) from None


def _may_hold_a_password(conninfo: str) -> bool:
    """Whether a connection string may carry a password: the keyword anywhere, or a URL whose user
    part has a colon (user:password@). Checked on the raw text, so nothing of it is echoed."""
    if "password" in conninfo.lower():
        return True
    scheme, separator, rest = conninfo.partition("://")
    if not separator or scheme.lower() not in ("postgresql", "postgres"):
        return False
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    return "@" in authority and ":" in authority.rsplit("@", 1)[0]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None
