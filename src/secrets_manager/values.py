"""`SecretValue`: plaintext that cannot leak by accident.

Its `repr`, `str` and `format` are redacted, it refuses pickling, and the bytes come out only
through `reveal()` / `reveal_text()`, so a value ends up in a log line only if someone wrote
`reveal` next to the log call.
"""

from __future__ import annotations

import codecs
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, NoReturn

REDACTED = "**********"


class SecretValue:
    """Bytes of a secret, redacted everywhere except through `reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError("SecretValue holds bytes; encode text as UTF-8 first")
        self._value = value

    def reveal(self) -> bytes:
        """The plaintext bytes. Call it where the value is used, never where it is logged."""
        return self._value

    def reveal_text(self) -> str:
        """The plaintext as text; raises ValueError if not UTF-8. Not UnicodeDecodeError, a
        subclass of it: that would carry the bytes (`.object`) and show one in its message."""
        try:
            return self._value.decode("utf-8")
        except UnicodeDecodeError:
            pass  # raised below, outside this block: not even as its suppressed context
        raise ValueError("the secret value is not UTF-8 text")

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"SecretValue('{REDACTED}')"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, format_spec: str) -> str:
        return REDACTED

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretValue):
            return hmac.compare_digest(self._value, other._value)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((SecretValue, len(self._value)))

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretValue cannot be pickled")


class _NumberText(str):
    """Where a JSON number (or NaN, Infinity) stands in an `ExactJsonObject`: a placeholder, not text."""


@dataclass(repr=False)
class ExactJsonObject:
    """A JSON object read to show or replace one field, its numbers kept as written: through
    json.loads and json.dumps 1.50 became 1.5, 1E2 100.0 and 1e400 Infinity (no JSON at all).
    It holds a secret's value: its `repr` shows the field names only."""

    fields: dict[str, Any]
    numbers: list[str]  # each number's text, by the index its placeholder carries
    marker: str  # random: no string of the value is a placeholder

    def __repr__(self) -> str:
        return f"ExactJsonObject(fields={sorted(self.fields)!r}, values='{REDACTED}')"

    def dumps(self, value: Any = None, *, compact: bool = False) -> str:
        """The object (or `value`, one of its fields) as JSON text, every number as it was written."""
        separators = (",", ":") if compact else None
        text = json.dumps(self.fields if value is None else value, ensure_ascii=False, separators=separators)
        placeholder = re.compile('"' + re.escape(self.marker) + '([0-9]+)"')
        return placeholder.sub(lambda match: self.numbers[int(match.group(1))], text)

    @staticmethod
    def is_text(value: Any) -> bool:
        """Whether a field's value is a JSON string (a number's placeholder is not)."""
        return type(value) is str


def read_exact_json_object(data: bytes) -> ExactJsonObject | None:
    """`data` (as json.loads reads bytes) as a JSON object that can be written back exactly, or
    None (not JSON, not an object, or nested deeper than the parser goes)."""
    marker = f"secrets-manager-number-{secrets.token_hex(16)}-"
    numbers: list[str] = []

    def number(text: str) -> _NumberText:
        numbers.append(text)
        return _NumberText(f"{marker}{len(numbers) - 1}")

    try:
        document = json.loads(data, parse_int=number, parse_float=number, parse_constant=number)
    except (ValueError, RecursionError):  # ValueError includes UnicodeDecodeError: not text at all
        return None
    return ExactJsonObject(document, numbers, marker) if isinstance(document, dict) else None


_JSON_LEAD = codecs.BOM_UTF8 + b" \t\r\n"


def read_json_object(data: bytes) -> tuple[dict[str, Any] | None, bool]:
    """A value read as a JSON object (as json.loads reads bytes: UTF-8/16/32, a byte-order mark),
    with its numbers kept as text so none is too long to read, and whether it is one at all:
    (None, True) for an object nested deeper than the parser goes (an opening brace decides).
    Rotation needs to know an object from a plain value before it replaces either."""
    try:
        document = json.loads(data, parse_int=str, parse_float=str, parse_constant=str)
    except RecursionError:
        return None, data.lstrip(_JSON_LEAD).startswith(b"{")
    except ValueError:  # UnicodeDecodeError included: not JSON text at all
        return None, False
    return (document, True) if isinstance(document, dict) else (None, False)
