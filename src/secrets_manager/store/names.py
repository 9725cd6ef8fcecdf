"""Secret names: the documented character set, length limit and namespace rule.

A name is one or more segments joined by '/'. A segment starts with a letter, digit or '_' and
continues with letters, digits, '_', '.', '-' (so no '..', no leading '-' that reads like a flag).
At most 256 characters in all. The first segment of a name with a '/' is its namespace; a name
without '/' lives in the `default` namespace. These rules keep names valid in Vault paths and AWS
Secrets Manager names alike.
"""

from __future__ import annotations

import re

from secrets_manager.errors import InvalidInputError

MAX_NAME_LENGTH = 256
DEFAULT_NAMESPACE = "default"
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
_NAME = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_ONE_SEGMENT = re.compile(_SEGMENT)


def validate_name(name: str) -> str:
    """Return `name` if valid, else raise InvalidInputError saying what is allowed."""
    if not isinstance(name, str):
        raise InvalidInputError(f"the secret name must be text (str), not {type(name).__name__}")
    if not name:
        raise InvalidInputError("secret name is empty; names look like 'auth/DB_PASSWORD'")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"secret name is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise InvalidInputError(
            f"invalid secret name {name!r}: use segments of letters, digits, '_', '.', '-' "
            "joined by '/', each starting with a letter, digit or '_'"
        )
    return name


def as_recorded(name: str | None) -> str | None:
    """`name` as an audit record or a log line may hold it: a request's name is recorded before it
    is validated (a refusal names what was refused), and a caller must not be able to write
    megabytes into the log with one request. Valid names are never cut."""
    if name is None or len(name) <= MAX_NAME_LENGTH:
        return name
    return f"{name[:MAX_NAME_LENGTH]}...[{len(name)} characters]"


def validate_prefix(prefix: str) -> str:
    """A list prefix: any leading part of a valid name (may end in '/' or mid-segment)."""
    if not prefix:
        return prefix
    if len(prefix) > MAX_NAME_LENGTH:  # not echoed: it could be megabytes
        raise InvalidInputError(f"name prefix is longer than {MAX_NAME_LENGTH} characters, as no name is")
    body = prefix[:-1] if prefix.endswith("/") else prefix
    if not _NAME.fullmatch(body):
        raise InvalidInputError(f"invalid name prefix {prefix!r}: give the leading part of a name")
    return prefix


def validate_namespace(namespace: str) -> str:
    """Return `namespace` if it can be one (a single segment of a name), else InvalidInputError."""
    if (
        not isinstance(namespace, str)
        or len(namespace) > MAX_NAME_LENGTH
        or not _ONE_SEGMENT.fullmatch(namespace)
    ):
        # 'market-connector/' as `list` and the docs write prefixes: say what to give instead
        slash = isinstance(namespace, str) and namespace.endswith("/")
        bare = namespace[:-1] if slash else ""
        if bare and len(bare) <= MAX_NAME_LENGTH and _ONE_SEGMENT.fullmatch(bare):
            raise InvalidInputError(
                f"invalid namespace {namespace!r}: give it without the trailing '/', {bare!r}"
            )
        raise InvalidInputError(
            f"invalid namespace {namespace!r}: a namespace is the first segment of a name, "
            "like 'auth' in 'auth/DB_PASSWORD' ('default' holds names without '/')"
        )
    return namespace


def namespace_of(name: str) -> str:
    """The namespace (and so the keyset) a secret belongs to."""
    head, sep, _ = name.partition("/")
    return head if sep else DEFAULT_NAMESPACE
