"""`Credentials`: what `get_credentials()` returns, a read-only snapshot of secret values by name.

A snapshot, not a live view: the values in one `Credentials` come from one cache generation and do
not change under the caller. Each secret is written and refreshed on its own, so two secrets
changed one after the other (an API key, then its secret) can be seen one old and one new; keep
values that must change together in one secret (a JSON object: `rotate NAME#field` rotates one
field of it), as AWS keeps a database's user and password. Ask the client again (a cache hit
costs well under a microsecond) to see newer values.

Its `repr` and `str` show names only; the values are `SecretValue`s, redacted until revealed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, NoReturn

from secrets_manager.values import SecretValue

if TYPE_CHECKING:
    from secrets_manager.otp import OneTimeCode


def drop_tracebacks(error: BaseException) -> None:
    """Remove the traceback of `error` and of every exception chained to it: an error the SDK
    raises leaves without its own frames, whose locals may hold values. A context hidden by
    `raise ... from None` goes too: it is never shown, yet it was kept, and one such as a
    UnicodeDecodeError holds the whole value it failed on (`.object`, and its repr)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        link.__traceback__ = None
        if link.__suppress_context__:
            link.__context__ = None
        pending += [link.__cause__, link.__context__]


class AmbiguousNameError(KeyError):
    """A short name that more than one full name ends in."""


SHOWN_NAMES = 5  # names a missing name's message lists of those held


class _NotHeld(KeyError):
    """A name these credentials do not hold. `args` is the name alone, as a dict's KeyError; the
    message says what they hold: a service asking for another's secret (`creds["DB_PASSWORD"]`
    in market-connector) saw only `KeyError: 'DB_PASSWORD'`, nothing that pointed at the policy."""

    def __init__(self, name: object, held: tuple[str, ...] = ()) -> None:
        super().__init__(name)
        self.held = held

    def __str__(self) -> str:
        name = self.args[0]
        how = "" if isinstance(name, str) and "/" in name else ", by full name or as the last part of one"
        shown = ", ".join(self.held[:SHOWN_NAMES])
        more = f", and {len(self.held) - SHOWN_NAMES} more" if len(self.held) > SHOWN_NAMES else ""
        return (
            f"{name!r} is not in these credentials{how}; they hold {len(self.held)}: {shown}{more} "
            "('secrets-manager policy explain' shows what the policy grants this identity)"
        )


class Credentials(Mapping[str, SecretValue]):
    """Secret values by name (`creds["auth/DB_PASSWORD"].reveal_text()`), read-only.

    A name without a namespace that is not a key itself finds the one secret whose name ends in
    it: `creds["BINANCE_API_KEY"]` is `market-connector/BINANCE_API_KEY` if no other secret here
    ends in BINANCE_API_KEY (the seed's `creds.get("BINANCE_API_KEY")`). If two do, it is a
    KeyError that names both: never a guess between them. Iteration shows the full names."""

    __slots__ = ("_clock", "_short", "_stale", "_stale_since", "_values")

    def __init__(
        self,
        values: Mapping[str, SecretValue],
        *,
        stale: bool = False,
        stale_since: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._values = dict(values)
        self._stale = stale
        # Names served stale, and since when on `clock`; with `stale` and none given, all of them.
        if stale_since is None:
            stale_since = dict.fromkeys(self._values, clock()) if stale else {}
        self._stale_since = dict(stale_since)
        self._clock = clock
        self._short: dict[str, list[str]] | None = None  # built on the first short-name lookup

    @property
    def stale(self) -> bool:
        """True when some of these values are served stale: no service could be reached (all of
        them), or a value known to have changed could not be fetched again yet (that one); the
        last good values, within the client's stale-if-error bound. `stale_names` says which."""
        return self._stale

    @property
    def stale_names(self) -> frozenset[str]:
        """The names (as keys here) whose values are served stale; empty when none is."""
        return frozenset(self._stale_since)

    def staleness(self, name: str) -> float | None:
        """None if the value of `name` is fresh (the service vouched for it within the TTL, or
        the watch stream would have said it changed); else for how many seconds it has been
        served without that (since the outage began, or the first failed re-fetch of it), now.
        KeyError for a name not here, as `creds[name]`; a short name works as there."""
        full = name if name in self._values else self._full_name(name)
        since = self._stale_since.get(full)
        return None if since is None else max(0.0, self._clock() - since)

    def __getitem__(self, name: str) -> SecretValue:
        value = self._values.get(name)
        if value is not None:
            return value
        return self._values[self._full_name(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        if name in self._values:
            return True
        return isinstance(name, str) and len(self._ending_in(name)) == 1

    def _ending_in(self, name: str) -> list[str]:
        """The full names whose last part is `name` (a namespaced `name` is only itself)."""
        short = self._short
        if short is None:  # not on every snapshot: most callers use full names
            short = {}
            for full in self._values:
                namespace, _, rest = full.rpartition("/")
                if namespace:
                    short.setdefault(rest, []).append(full)
            self._short = short  # whole, once built: a snapshot may be shared between threads
        if not isinstance(name, str) or "/" in name:  # a key that is no name is missing, as in a dict
            return []
        return short.get(name, [])

    def _full_name(self, name: str) -> str:
        """The one full name that ends in `name` (KeyError if none, or several)."""
        matches = self._ending_in(name)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise AmbiguousNameError(
                f"{name!r} is ambiguous here: {', '.join(sorted(matches))}; use the full name"
            )
        if not self._values:  # a typo in the prefix, or a policy that grants nothing under it
            raise KeyError(
                f"{name}: these credentials are empty (no secret under the prefix asked for that this "
                "identity may read; 'secrets-manager policy explain' shows what the policy grants)"
            )
        raise _NotHeld(name, tuple(sorted(self._values)))

    def get(self, name: str, default: SecretValue | None = None) -> SecretValue | None:  # type: ignore[override]
        """Like dict.get, except that an ambiguous short name raises (it is a bug, not absence)."""
        try:
            return self[name]
        except AmbiguousNameError:
            raise
        except KeyError:
            return default

    def totp(self, name: str) -> OneTimeCode:
        """The current TOTP code of the seed at `name` (an otpauth://totp/ URI or a base32 setup
        key), for a broker's or exchange's automated login: `creds.totp("BROKER_TOTP").reveal()`;
        `.valid_for` says how many seconds it has left. NotATotpSeedError if it holds none."""
        from secrets_manager.otp import one_time_code  # pyotp: only for services that use codes

        try:
            return one_time_code(self[name], name=name)
        except Exception as exc:
            error = exc
        # Raised without the frames below: their locals hold the value (the parser's text of
        # it), and error trackers such as Sentry show every frame's locals (as _client's errors).
        drop_tracebacks(error)
        raise error

    def __repr__(self) -> str:  # names only, never a value (nor how stale: it changes as it is read)
        stale = ", stale=True" if self._stale else ""
        return f"Credentials({sorted(self._values)!r}{stale})"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> NoReturn:
        raise TypeError("Credentials cannot be pickled")
