"""Paging of BatchGetSecrets and ListSecrets (the proto's "Paging"), as AWS pages ListSecrets.

Without it one response held every secret, and gRPC refuses messages over 4 MiB: a caller with
many (or large) secrets got nothing at all. A page holds at most `page_size` secrets, and fewer
once they would make the response larger than `PAGE_BUDGET_BYTES`. An unpaged request (page_size
0, a client from before paging) still gets one answer, unless that answer would be larger than
`UNPAGED_LIMIT_BYTES`: then it is refused (InvalidInputError, saying to set page_size) before any
secret in it is audited as read, as the client would have refused the message anyway.

The token names where the next page starts: after a name (names in sorted order, so secrets added
or removed between pages do not shift the rest), or at a position of the caller's own list of
names. It is bound to what it pages: a keyed MAC (under the store's audit key, so every replica of
one store accepts it) over the method, the caller's identity, the request's other fields and the
place. A token sent with another request, by another caller, forged, or from before tokens were
bound is refused, saying to start again without page_token. The only name a token holds is the
last one its page covered, which that caller was shown (or, deleted meanwhile, could have been).
"""

from __future__ import annotations

import bisect
import json
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from secrets_manager.errors import InvalidInputError
from secrets_manager.store.names import validate_name

PAGE_BUDGET_BYTES = 2 * 1024 * 1024  # half of gRPC's default 4 MiB message limit
# gRPC's default limit on a message a client receives (grpc.max_receive_message_length): an
# unpaged answer larger than this would reach the client as RESOURCE_EXHAUSTED, with no hint.
UNPAGED_LIMIT_BYTES = 4 * 1024 * 1024
MAX_PAGE_SIZE = 1000
_AFTER = "after:"
_AT = "at:"
_MAC_CHARS = 24  # hex characters of the MAC kept in a token (96 bits)

T = TypeVar("T")


class TokenBinding:
    """What a page token may be sent back with: `method`, the caller and the request's fields.

    `mac` is a keyed MAC shared by every replica (the server's: audit.page_token_mac, under the
    store's audit key with a label of its own); tokens carry a prefix of its hex digest.
    `accepted(data, reload)`, if given, is every MAC a token of this binding may carry (the
    server's: under each audit key the store holds, so a token survives an `audit rotate-key`
    between two pages; with `reload`, the keys read again, once a token matched none)."""

    def __init__(
        self,
        mac: Callable[[bytes], str],
        method: str,
        identity: str,
        accepted: Callable[[bytes, bool], list[str]] | None = None,
        **request: object,
    ) -> None:
        self._mac = mac
        self._accepted = accepted
        fields = sorted(request.items())
        self._request = json.dumps([method, identity, fields], separators=(",", ":"), ensure_ascii=True)

    def sign(self, place: str) -> str:
        return self._mac(self._signed(place))[:_MAC_CHARS]

    def token(self, place: str) -> str:
        # The MAC first: a server from before tokens were bound refuses this token as invalid
        # (were the place first, it could read `after:NAME.MAC` as a name and skip a few names).
        return f"{self.sign(place)}.{place}"

    def place(self, token: str) -> str:
        """The place `token` names, if this binding issued it; else InvalidInputError."""
        mac, dot, place = token.partition(".")
        if not dot:
            raise _bad_token()
        if secrets.compare_digest(mac.encode(), self.sign(place).encode()):
            return place
        if self._accepted is not None:
            data = self._signed(place)
            for reload in (False, True):
                if any(
                    secrets.compare_digest(mac.encode(), each[:_MAC_CHARS].encode())
                    for each in self._accepted(data, reload)
                ):
                    return place
        raise _bad_token()

    def _signed(self, place: str) -> bytes:
        return f"{self._request}\x00{place}".encode()


class Page:
    """One page of an answer: which names it starts at, and whether another page follows."""

    def __init__(self, page_size: int, token: str, *, by_position: bool, binding: TokenBinding) -> None:
        self._size = min(page_size, MAX_PAGE_SIZE)  # 0: an unpaged request (every secret at once)
        self._binding = binding
        self._by_position = by_position
        self._count = 0
        self._bytes = 0
        self._last: str | None = None
        self._next_position = 0
        self._more = False
        # Checked now, so a token of another request costs no read of the store.
        place = binding.place(token) if token else ""
        self._begin = self._position(place) if by_position else 0
        self._after = None if by_position else self._name_after(place)

    def start(self, names: Sequence[str]) -> Iterator[str]:
        """The names this page may hold, in order, from the token's place on."""
        if self._by_position:
            if self._begin > len(names):
                raise _bad_token()
            self._next_position = self._begin
            yield from names[self._begin :]
            return
        yield from self.start_sorted(sorted(names), str)

    def start_sorted(self, items: Sequence[T], name: Callable[[T], str]) -> Iterator[T]:
        """The items (sorted by `name`, as the store lists them) this page may hold, in order, from
        the token's place on: found by bisection, so a page costs its own items, not the list's."""
        if self._by_position:
            raise TypeError("start_sorted pages by name; use start for a list of names")
        begin = 0 if self._after is None else bisect.bisect_right(items, self._after, key=name)
        for index in range(begin, len(items)):
            yield items[index]

    def has_room(self) -> bool:
        """Whether another secret may go in by count; False means another page follows."""
        if self._size and self._count >= self._size:
            self._more = True
            return False
        return True

    def room(self) -> int | None:
        """How many more secrets may go in by count (None: no count limit, an unpaged answer)."""
        return self._size - self._count if self._size else None

    def fits(self, name: str, size: int) -> bool:
        """Take `name` (its message is `size` bytes) unless it would burst the byte budget; the
        first secret of a page always fits. False means another page follows. In an unpaged
        answer, a secret that would make it larger than `UNPAGED_LIMIT_BYTES` is InvalidInputError
        (nothing of it was sent: the caller must page)."""
        if not self._size:
            self._bytes += _framed(size)
            if self._bytes > UNPAGED_LIMIT_BYTES:
                raise InvalidInputError(
                    "the answer would be larger than gRPC's 4 MiB message limit, which clients "
                    "refuse to receive: set page_size (e.g. 100) and send each next_page_token "
                    "back until it is empty (the bundled CLI and SDK do)"
                )
        elif self._count and self._bytes + size > PAGE_BUDGET_BYTES:
            self._more = True
            return False
        else:
            self._bytes += size
        self._count += 1
        self._last = name
        self._next_position += 1
        return True

    def skipped(self, name: str) -> None:
        """`name` vanished between list and read: the next page starts after it all the same."""
        self._last = name
        self._next_position += 1

    def next_token(self) -> str:
        if not (self._size and self._more):
            return ""
        if self._by_position:
            return self._binding.token(f"{_AT}{self._next_position}")
        if self._last is not None:
            return self._binding.token(f"{_AFTER}{self._last}")
        return self._binding.token(f"{_AFTER}{self._after}") if self._after is not None else ""

    @staticmethod
    def _position(place: str) -> int:
        if not place:
            return 0
        digits = place.removeprefix(_AT)
        if not place.startswith(_AT) or not digits.isascii() or not digits.isdigit() or len(digits) > 9:
            raise _bad_token()
        return int(digits)

    @staticmethod
    def _name_after(place: str) -> str | None:
        if not place:
            return None
        if not place.startswith(_AFTER):
            raise _bad_token()
        try:
            return validate_name(place.removeprefix(_AFTER))
        except InvalidInputError:
            raise _bad_token() from None


def _framed(size: int) -> int:
    """Bytes a message of `size` bytes takes as an element of a response's field 1 (`secrets`):
    its tag, its length as a varint, and itself."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def _bad_token() -> InvalidInputError:
    return InvalidInputError(
        "invalid page_token: it was not issued for this request (another prefix, names list or "
        "caller, or a server before an upgrade): send the request again without page_token to "
        "start from the first page, then send each next_page_token back with the same request"
    )
