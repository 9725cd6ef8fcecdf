"""`Credentials`: what `get_credentials()` returns, a read-only snapshot of secret values by name.

A snapshot, not a live view: the values in one `Credentials` come from one cache generation, so
an API key and its secret rotated together are never seen one old and one new. Ask the client
again (a cache hit costs well under a microsecond) to see newer values.

Its `repr` and `str` show names only; the values are `SecretValue`s, redacted until revealed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NoReturn

from secrets_manager.values import SecretValue


class Credentials(Mapping[str, SecretValue]):
    """Secret values by name (`creds["auth/DB_PASSWORD"].reveal_text()`), read-only."""

    __slots__ = ("_stale", "_values")

    def __init__(self, values: Mapping[str, SecretValue], *, stale: bool = False) -> None:
        self._values = dict(values)
        self._stale = stale

    @property
    def stale(self) -> bool:
        """True when no service could be reached and these are the last good values, served
        within the client's stale-if-error bound."""
        return self._stale

    def __getitem__(self, name: str) -> SecretValue:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __repr__(self) -> str:
        stale = ", stale=True" if self._stale else ""
        return f"Credentials({sorted(self._values)!r}{stale})"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> NoReturn:
        raise TypeError("Credentials cannot be pickled")
